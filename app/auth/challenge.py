"""What each upstream asks for: its /v2/ answer, learned once and kept briefly (bounded)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from app import wwwauth
from app.auth import Scheme
from app.errors import UpstreamUnavailable
from app.upstream import ClientHeaders, Upstream

MAX_CHALLENGES = 1024


@dataclass(frozen=True)
class Challenge:
    """An upstream's auth scheme; realm and service for Bearer."""

    scheme: Scheme
    realm: str = ""
    service: str = ""


def parse_challenge(status: int, header: str | Sequence[str] | None) -> Challenge | None:
    """Challenge of a /v2/ answer: 200 means no auth; None when the answer is unusable.

    Every WWW-Authenticate header and every challenge in each is considered; Bearer wins.
    """
    if status == 200:
        return Challenge(Scheme.NONE)
    if status != 401:
        return None
    values = [header] if isinstance(header, str) else list(header or ())
    challenges = wwwauth.parse_all(values)
    bearer = wwwauth.bearer(challenges)
    if bearer is not None:
        return Challenge(Scheme.BEARER, bearer["realm"], bearer.get("service", ""))
    if wwwauth.offers_basic(challenges):
        return Challenge(Scheme.BASIC)
    return None


@dataclass
class ChallengeCache:
    """Upstream challenges per registry for ttl seconds (no credentials are ever kept here).

    Bounded (§15): at most max_entries registries; expired ones go first, then the oldest.
    """

    upstream: Upstream
    ttl: float = 60.0
    max_entries: int = MAX_CHALLENGES
    _known: dict[str, tuple[Challenge, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, registry: str) -> Challenge:
        """The registry's challenge; raises UpstreamUnavailable or Denied."""
        with self._lock:
            known = self._known.get(registry)
            if known is not None and known[1] <= time.monotonic():
                del self._known[registry]
                known = None
        if known is not None:
            return known[0]
        response = self.upstream.send("GET", registry, "/v2/", ClientHeaders(), token_dance=False)
        with response:
            challenge = parse_challenge(response.status_code, wwwauth.header_values(response))
        if challenge is None:
            raise UpstreamUnavailable(registry, f"/v2/ answered {response.status_code}")
        self._remember(registry, challenge)
        return challenge

    def _remember(self, registry: str, challenge: Challenge) -> None:
        now = time.monotonic()
        with self._lock:
            self._known.pop(registry, None)
            if len(self._known) >= self.max_entries:
                for key in [k for k, (_, until) in self._known.items() if until <= now]:
                    del self._known[key]
            while len(self._known) >= self.max_entries:
                del self._known[next(iter(self._known))]  # the oldest
            self._known[registry] = (challenge, now + self.ttl)

    def __len__(self) -> int:
        return len(self._known)
