"""The request log line: one per request, written when the last byte has gone out."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from app import metrics
from app.logfmt import FIELDS

access_log = logging.getLogger("oci_pull_through.access")


@dataclass
class RequestRecord:
    """What the log line says about one request; never credentials."""

    method: str
    repository: str = "-"
    kind: str = "-"
    reference: str = "-"
    status: int = 0
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


def counted(body: Iterable[bytes], record: RequestRecord) -> Iterator[bytes]:
    """Count the bytes of a streamed body and log when it ends, however it ends."""
    try:
        for chunk in body:
            record.bytes_sent += len(chunk)
            yield chunk
    except GeneratorExit:
        record.outcome = "error" if record.outcome == "-" else record.outcome
        raise
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
        record.finish()


def wrap_file(base: type, fh: BinaryIO, record: RequestRecord, block_size: int) -> object:
    """Wrap a file in the server's own wsgi.file_wrapper (so it uses sendfile), logging on close."""
    wrapper = base(fh, block_size)

    def close() -> None:
        try:
            fh.close()
        finally:
            record.finish()

    wrapper.close = close  # the server calls close() after the last byte went out
    return wrapper


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
        record.finish()
