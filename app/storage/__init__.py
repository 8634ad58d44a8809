"""The storage interface shared by the filesystem and S3 backends."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:
    from app.config import Config


class NotFound(Exception):
    """The object is not in the cache (or was never committed)."""


class StoreError(Exception):
    """The backend failed; the caller falls back to upstream or abandons the fill."""


@dataclass(frozen=True)
class ObjectMeta:
    """What the sidecar records about a committed object."""

    digest: str
    size: int
    media_type: str
    headers: tuple[tuple[str, str], ...] = ()
    stored_at: float = field(default_factory=time.time)
    # "registry/repository" pairs through which these bytes were verified (SPEC §15).
    sources: tuple[str, ...] = ()

    def to_json(self) -> bytes:
        """Serialise for the sidecar."""
        return json.dumps(
            {
                "digest": self.digest,
                "size": self.size,
                "media_type": self.media_type,
                "headers": [list(h) for h in self.headers],
                "stored_at": self.stored_at,
                "sources": list(self.sources),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ObjectMeta:
        """Parse a sidecar; a damaged one counts as a missing object."""
        try:
            raw = json.loads(data)
            return cls(
                digest=str(raw["digest"]),
                size=int(raw["size"]),
                media_type=str(raw["media_type"]),
                headers=tuple((str(k), str(v)) for k, v in raw["headers"]),
                stored_at=float(raw["stored_at"]),
                sources=tuple(str(s) for s in raw.get("sources", ())),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise NotFound(f"unreadable sidecar: {exc}") from None


class BlobWriter(Protocol):
    """A pending object: invisible until commit, gone after abort."""

    def write(self, chunk: bytes) -> None:
        """Append bytes; StoreError aborts the write."""
        ...

    def commit(self, meta: ObjectMeta) -> None:
        """Store the data under keys.data(key, meta.digest), then the sidecar, atomically.

        No previous sidecar is removed first; a content-addressed key refuses another digest
        (StoreError, the write aborted).
        """
        ...

    def abort(self) -> None:
        """Drop everything written; idempotent, never raises."""
        ...


class Storage(Protocol):
    """The one storage interface; both backends pass tests/unit/test_storage_contract.py."""

    def stat(self, key: str) -> ObjectMeta:
        """The sidecar of a committed object; NotFound when there is none."""
        ...

    def open(self, key: str, meta: ObjectMeta | None = None) -> BinaryIO:
        """The data meta describes (the sidecar's when None); NotFound if missing or resized."""
        ...

    def writer(self, key: str) -> BlobWriter:
        """Start a write nobody sees until commit."""
        ...

    def update_meta(self, key: str, meta: ObjectMeta) -> None:
        """Replace only the sidecar, atomically; NotFound unless data for meta.digest exists."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object: its sidecar first, then the data it names."""
        ...

    def presign(self, key: str, meta: ObjectMeta) -> str | None:
        """A URL of the data meta describes, or None when the proxy serves it itself."""
        ...


def put(storage: Storage, key: str, chunks: Iterable[bytes], meta: ObjectMeta) -> None:
    """Store already-verified bytes (small objects such as manifests) in one go."""
    writer = storage.writer(key)
    try:
        for chunk in chunks:
            writer.write(chunk)
        writer.commit(meta)
    except BaseException:
        writer.abort()
        raise


def make_storage(config: Config) -> Storage:
    """Build the backend STORAGE_BACKEND names."""
    from app.config import ConfigError

    if config.storage_backend == "fs":
        from app.storage.fs import FilesystemStorage

        return FilesystemStorage(config.fs_root)
    if config.storage_backend == "s3":
        from app.storage.s3 import S3Storage

        return S3Storage.from_config(config)
    raise ConfigError("STORAGE_BACKEND", config.storage_backend, "allowed values are s3, fs")
