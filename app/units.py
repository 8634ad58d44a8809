"""Human units in the configuration: durations (30s, 10m, 28d) and byte sizes (50Gi, 2G)."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)b?\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as 90, 30s, 10m, 6h, 28d or 2w; ValueError otherwise."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    return float(match.group(1)) * _SECONDS[match.group(2).lower()]


def parse_bytes(text: str) -> int:
    """Bytes in a size such as 1048576, 500M, 50Gi or 2TB (K/M/G = 1000^n, Ki/Mi/Gi = 1024^n)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r}")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    if binary and not unit:
        raise ValueError(f"not a size: {text!r}")
    return int(float(number) * base ** _POWERS[unit.lower()])


def format_bytes(size: int) -> str:
    """A short human figure for listings: 1.5 MiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
