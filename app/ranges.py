"""Byte ranges of cached blobs (RFC 9110 §14): pure parsing, no I/O."""

from __future__ import annotations

from dataclasses import dataclass


class Unsatisfiable(Exception):
    """The range lies outside the object: answer 416."""


@dataclass(frozen=True)
class ByteRange:
    """An inclusive byte span of an object of known size."""

    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        """Bytes in the span."""
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        """The Content-Range header of a 206 answer."""
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """One satisfiable range, None to serve the whole object, or Unsatisfiable.

    Multiple ranges are answered with the whole object, as RFC 9110 allows.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    if not first:
        if not last.isdigit():
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return ByteRange(max(0, size - suffix), size - 1)
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    start = int(first)
    if last and int(last) < start:
        return None  # syntactically invalid: ignored, the whole object is served
    if start >= size:
        raise Unsatisfiable
    end = int(last) if last else size - 1
    return ByteRange(start, min(end, size - 1))
