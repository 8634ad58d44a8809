"""The request log line: one per registry API request, written when the last byte has gone out.

`init_app(app)` wires it once, as WSGI middleware (no Flask here): every request under
`/v2/` gets a RequestRecord in its environ before the app sees it; views and the error
handler fill it in, and the middleware finishes it when the server is done with the body
(its end or its close; for a `wsgi.file_wrapper` body, which the server may send with
sendfile, on its close). A record nothing answered (a routing redirect, an unhandled
exception) has no status and no line; /healthz, /metrics and the peer API have no record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from app import metrics
from app.logfmt import FIELDS

access_log = logging.getLogger("oci_pull_through.access")
ENVIRON_KEY = "oci.record"
REGISTRY_API = "/v2/"  # the token endpoint included
Environ = MutableMapping[str, Any]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _App(Protocol):
    """What init_app needs of a Flask app (no Flask import below the blueprints)."""

    @property
    def config(self) -> Mapping[str, Any]: ...

    def wsgi_app(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]: ...


@dataclass
class RequestRecord:
    """What the log line says about one request; never credentials."""

    method: str
    repository: str = "-"
    kind: str = "-"
    reference: str = "-"
    status: int = 0  # 0: nothing answered, no line
    outcome: str = "-"
    bytes_sent: int = 0
    started: float = field(default_factory=time.monotonic)
    json_format: bool = False
    _done: bool = False

    def finish(self) -> None:
        """Emit the line once."""
        if self._done:
            return
        self._done = True
        duration_ms = (time.monotonic() - self.started) * 1000
        ref = self.reference
        if ":" in ref and len(ref) > 19:
            ref = ref[:19]  # sha256: plus 12 hex digits
        fields = {
            "method": self.method,
            "repository": self.repository,
            "kind": self.kind,
            "reference": ref,
            "status": self.status,
            "cache": self.outcome,
            "bytes": self.bytes_sent,
            "duration_ms": round(duration_ms, 2),
        }
        line = "%s %s %s %s %d %s %dB %.1fms"
        args = (self.method, self.repository, self.kind, ref, self.status, self.outcome)
        # JSON: the same line as the message, its fields as keys (app/logfmt.py).
        extra = {FIELDS: fields} if self.json_format else None
        access_log.info(line, *args, self.bytes_sent, duration_ms, extra=extra)
        metrics.request_finished(self.kind, self.method, self.status, self.outcome, self.bytes_sent)


def record_of(environ: Environ) -> RequestRecord | None:
    """The record init_app's middleware put in this request's environ."""
    return environ.get(ENVIRON_KEY)


def init_app(app: _App) -> None:
    """Log every registry API request once, however its body is sent (call once per app)."""
    logged = RequestLog(app.wsgi_app, json_format=bool(app.config["OCI_LOG_JSON"]))
    app.wsgi_app = logged  # type: ignore[method-assign]  # Flask's documented middleware hook


class RequestLog:
    """WSGI middleware: a record per request, finished when the server is done with the body."""

    def __init__(self, app: WSGIApp, *, json_format: bool) -> None:
        self.app = app
        self.json_format = json_format

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        """Run the app with a fresh record in environ; hand back a body that finishes it."""
        if not str(environ.get("PATH_INFO", "")).startswith(REGISTRY_API):
            return self.app(environ, start_response)
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        record = RequestRecord(method=method, json_format=self.json_format)
        environ[ENVIRON_KEY] = record
        body = self.app(environ, start_response)
        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(file_wrapper, type) and isinstance(body, file_wrapper):
            return _finish_on_close(body, record)  # kept as is: the server may sendfile it
        return _LoggedBody(body, record)


def _answered(record: RequestRecord) -> None:
    if record.status:
        record.finish()


def _finish_on_close(wrapper: Any, record: RequestRecord) -> Any:
    """The server's own file wrapper, logging when the server closes it after the last byte."""
    close = getattr(wrapper, "close", None)

    def finish() -> None:
        try:
            if close is not None:
                close()
        finally:
            _answered(record)

    wrapper.close = finish
    return wrapper


class _LoggedBody:
    """A response body that finishes its record when it runs out or is closed, however early."""

    def __init__(self, body: Iterable[bytes], record: RequestRecord) -> None:
        self._body = body
        self._chunks = iter(body)
        self._record = record

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except StopIteration:
            _answered(self._record)
            raise

    def close(self) -> None:
        """Close the app's body first (it may still mark the record), then log."""
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            _answered(self._record)


def counted(body: Iterable[bytes], record: RequestRecord) -> Iterator[bytes]:
    """Count the bytes of a streamed body; a body cut short is an error in the log."""
    try:
        for chunk in body:
            record.bytes_sent += len(chunk)
            yield chunk
    except (GeneratorExit, OSError):  # the client left, or the source failed (BodyCut)
        record.outcome = "error" if record.outcome == "-" else record.outcome
        raise
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


def read_span(fh: BinaryIO, length: int, record: RequestRecord, block_size: int) -> Iterator[bytes]:
    """Stream length bytes of a file for servers without wsgi.file_wrapper (flask run)."""
    remaining = length
    try:
        while remaining > 0:
            block = fh.read(min(block_size, remaining))
            if not block:
                break
            remaining -= len(block)
            record.bytes_sent += len(block)
            yield block
    finally:
        fh.close()
