"""Registry errors: each code tied to its HTTP status, rendered as the OCI error body."""

from __future__ import annotations

import json
from typing import Any


class BodyCut(ConnectionAbortedError):
    """A response whose status line is sent cannot be completed (its source failed): the
    server closes the connection, and logs one line, not a traceback per client. An OSError,
    so gunicorn hands it to app.worker.Worker instead of logging it itself."""


class RegistryError(Exception):
    """An error the proxy answers itself, in the OCI error format."""

    status = 500
    code = "UNKNOWN"

    def __init__(
        self,
        message: str,
        detail: Any = None,
        *,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code

    def body(self) -> bytes:
        """The OCI error body clients parse to show the reason."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode()


class NameInvalid(RegistryError):
    status, code = 400, "NAME_INVALID"


class TagInvalid(RegistryError):
    status, code = 400, "TAG_INVALID"


class DigestInvalid(RegistryError):
    status, code = 400, "DIGEST_INVALID"


class Denied(RegistryError):
    status, code = 403, "DENIED"


class TooManyScopes(RegistryError):
    """A token request past the §15 bounds (scopes, registries): refused before any I/O."""

    status, code = 400, "DENIED"


class Unsupported(RegistryError):
    status, code = 405, "UNSUPPORTED"


class NotFoundError(RegistryError):
    status, code = 404, "NOT_FOUND"


class BlobUnknown(RegistryError):
    status, code = 404, "BLOB_UNKNOWN"


class ManifestUnknown(RegistryError):
    status, code = 404, "MANIFEST_UNKNOWN"


class UpstreamUnavailable(RegistryError):
    """Upstream could not be reached or did not answer in time."""

    status, code = 502, "UNAVAILABLE"

    def __init__(self, registry: str, cause: str) -> None:
        super().__init__(f"upstream registry {registry} unreachable: {cause}")
        self.registry = registry
