"""Anonymous upstream Bearer tokens per (registry, scope): bounded in size and in time (§15)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

MAX_CACHED_TOKENS = 1024


@dataclass
class _Token:
    value: str
    expires_at: float


@dataclass
class TokenCache:
    """Anonymous Bearer tokens per (registry, scope), dropped shortly before they expire.

    Bounded (§15): at most max_entries tokens; expired ones go first, then the oldest.
    """

    margin: float = 10.0
    max_entries: int = MAX_CACHED_TOKENS
    _tokens: dict[tuple[str, str], _Token] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, registry: str, scope: str) -> str | None:
        """A still-valid token, or None."""
        with self._lock:
            token = self._tokens.get((registry, scope))
            if token is None or token.expires_at <= time.monotonic():
                self._tokens.pop((registry, scope), None)
                return None
            return token.value

    def put(self, registry: str, scope: str, value: str, expires_in: float) -> None:
        """Remember a token for its lifetime less the safety margin."""
        lifetime = max(0.0, expires_in - min(self.margin, expires_in / 2))
        now = time.monotonic()
        with self._lock:
            self._tokens.pop((registry, scope), None)
            if len(self._tokens) >= self.max_entries:
                for key in [k for k, t in self._tokens.items() if t.expires_at <= now]:
                    del self._tokens[key]
            while len(self._tokens) >= self.max_entries:
                del self._tokens[next(iter(self._tokens))]  # the oldest
            self._tokens[(registry, scope)] = _Token(value, now + lifetime)

    def __len__(self) -> int:
        return len(self._tokens)

    def drop(self, registry: str, scope: str) -> None:
        """Forget a token upstream rejected."""
        with self._lock:
            self._tokens.pop((registry, scope), None)
