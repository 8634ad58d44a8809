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


# -- hostile headers (§15 "Input"): ASCII grammar only, never an exception ------------------------


@pytest.mark.parametrize(
    "header",
    [
        "bytes=²-",  # superscript two: str.isdigit() is True, int() raises
        "bytes=-²",
        "bytes=0-²",
        "bytes=¹-²",
        "bytes=٣-",  # Arabic-Indic three: isdigit() and int() both accept it
        "bytes=-٣",
        "bytes=0-٣",
        "bytes=１-２",  # fullwidth digits
        "bytes=\u00a01-2",  # NO-BREAK SPACE is not OWS
        "bytes=1-2\u2028",
        "ｂytes=1-2",
        "bytes\u3000=1-2",
        "bytes=1_0-20",  # int() accepts underscores
        "bytes=-1_0",
    ],
)
def test_non_ascii_or_non_grammar_ranges_are_ignored(header: str) -> None:
    """Attack: `Range: bytes=²-` made int() raise, a 500; now the whole object is served."""
    assert parse_range(header, 10) is None


def test_huge_first_position_is_unsatisfiable_not_an_error() -> None:
    """Attack: int() refuses more than 4300 digits (ValueError -> 500); such a start is past
    any object, so the answer is 416."""
    with pytest.raises(Unsatisfiable):
        parse_range("bytes=" + "9" * 5000 + "-", 10)


def test_huge_last_position_clamps_to_the_object() -> None:
    assert parse_range("bytes=2-" + "9" * 5000, 10) == ByteRange(2, 9)


def test_huge_suffix_is_the_whole_object() -> None:
    assert parse_range("bytes=-" + "9" * 5000, 10) == ByteRange(0, 9)


def test_leading_zeros_do_not_count_as_magnitude() -> None:
    assert parse_range("bytes=" + "0" * 5000 + "3-" + "0" * 5000 + "4", 10) == ByteRange(3, 4)


@pytest.mark.parametrize("header", ["bytes=\t1-2", "bytes=1\t-\t2 ", " bytes=1-2"])
def test_tabs_and_spaces_are_optional_whitespace(header: str) -> None:
    assert parse_range(header, 10) == ByteRange(1, 2)


def test_no_unicode_digit_or_space_changes_the_answer_or_raises() -> None:
    """Every non-ASCII character str.isdigit()/isspace() accepts, in every position."""
    odd = [
        chr(c)
        for c in range(0x80, 0x110000)
        if chr(c).isdigit() or chr(c).isspace() or chr(c).isdecimal()
    ]
    assert len(odd) > 100
    for c in odd:
        for header in (
            f"bytes={c}-",
            f"bytes=-{c}",
            f"bytes=1-{c}",
            f"bytes={c}1-2",
            f"bytes=1-2{c}",
        ):
            assert parse_range(header, 10) is None, header
