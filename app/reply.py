"""The framework-independent answer the read path returns, and its cache outcomes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

HIT, MISS, REDIRECT, BYPASS = "hit", "miss", "redirect", "bypass"


@dataclass
class Reply:
    """An HTTP answer, independent of the web framework."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: Iterable[bytes] | bytes = b""
    file: BinaryIO | None = None  # positioned at the first byte to send
    length: int | None = None  # bytes of file to send
    outcome: str = BYPASS
