"""Byte ranges of cached blobs (RFC 9110 §14): pure parsing, no I/O."""

from __future__ import annotations

import re
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


# RFC 9110 §14.1.1 with OWS (space, tab) around each token: ASCII only, so Unicode digits
# (superscripts, Arabic-Indic, fullwidth) and Unicode spaces never reach int().
_RANGE_RE = re.compile(
    r"[ \t]*bytes[ \t]*=[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*", re.ASCII | re.IGNORECASE
)
_MAX_DIGITS = 18  # anything longer is beyond any object (and int() refuses > 4300 digits)
_BEYOND = 10**_MAX_DIGITS


def _position(digits: str) -> int:
    """An ASCII digit string's value, saturated at _BEYOND so no length of input can fail."""
    digits = digits.lstrip("0") or "0"
    return _BEYOND if len(digits) > _MAX_DIGITS else int(digits)


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """One satisfiable range, None to serve the whole object, or Unsatisfiable.

    Multiple ranges, and anything outside the ASCII grammar, are answered with the whole
    object, as RFC 9110 allows; no header value makes this raise anything else.
    """
    if not header:
        return None
    match = _RANGE_RE.fullmatch(header)
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        suffix = _position(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return ByteRange(max(0, size - suffix), size - 1)
    start = _position(first)
    if last and _position(last) < start:
        return None  # syntactically invalid: ignored, the whole object is served
    if start >= size:
        raise Unsatisfiable
    end = _position(last) if last else size - 1
    return ByteRange(start, min(end, size - 1))
