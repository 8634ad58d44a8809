"""app/ranges.py: parse_range for the Range header of cached blob hits."""

from __future__ import annotations

import pytest

from app.ranges import ByteRange, Unsatisfiable, parse_range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-0", 10, ByteRange(0, 0)),
        ("bytes=0-9", 10, ByteRange(0, 9)),
        ("bytes=2-5", 10, ByteRange(2, 5)),
        ("bytes=5-", 10, ByteRange(5, 9)),  # open-ended
        ("bytes=9-", 10, ByteRange(9, 9)),
        ("bytes=-3", 10, ByteRange(7, 9)),  # suffix
        ("bytes=-10", 10, ByteRange(0, 9)),
        ("bytes=-100", 10, ByteRange(0, 9)),  # suffix longer than the object
        ("bytes=3-100", 10, ByteRange(3, 9)),  # end beyond the object clamps
        ("BYTES = 1-2", 10, ByteRange(1, 2)),
        ("bytes= 1 - 2 ", 10, ByteRange(1, 2)),
    ],
)
def test_satisfiable_ranges(header: str, size: int, expected: ByteRange) -> None:
    assert parse_range(header, size) == expected


def test_length_and_content_range() -> None:
    span = parse_range("bytes=2-5", 10)
    assert span is not None
    assert span.length == 4
    assert span.content_range(10) == "bytes 2-5/10"


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=10-", 10),  # open-ended, start == size (a resume of a complete download)
        ("bytes=11-", 10),
        ("bytes=10-20", 10),
        ("bytes=100-200", 10),
        ("bytes=-0", 10),  # empty suffix
        ("bytes=0-", 0),  # no first-pos is below the length of an empty object
        ("bytes=0-0", 0),
    ],
)
def test_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, size)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "bytes=0-1,4-5",  # multiple ranges: whole object
        "bytes=0-1, 100-",
        "items=0-1",
        "bytes=",
        "bytes=-",
        "bytes=abc",
        "bytes=a-b",
        "bytes=1-a",
        "bytes=-a",
        "bytes=5-2",  # end before start: syntactically invalid, ignored
        "bytes=--1",
        "bytes 0-1",
        "bytes=+1-2",
    ],
)
def test_ignored_headers_serve_whole_object(header: str | None) -> None:
    assert parse_range(header, 10) is None
