"""Upstream rate limits (RateLimit-Limit / RateLimit-Remaining, as Docker Hub sends them).

Filled in by the upstream client from every answer; read by the tag freshness code, which
stops revalidating cached tags while a registry's remaining pulls are below the reserve.

State is per worker process: each gunicorn worker learns the figures from the answers it
gets itself. That is enough: every worker's own answers carry the registry's current count
for this cache's address, so a worker that has seen none yet revalidates once and learns it.
Bounded (§15): a hostile registry can only fill its own entry, and at most MAX_REGISTRIES are
kept (the oldest go first).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from app import metrics

log = logging.getLogger("oci_pull_through.ratelimit")
MAX_REGISTRIES = 256
DEFAULT_WINDOW = 3600.0  # a limit without `w=`: assume an hour
MAX_WINDOW = 7 * 86400.0
_FIGURE = re.compile(r"\s*(\d{1,12})\s*(?:;\s*w\s*=\s*(\d{1,9}))?")


@dataclass(frozen=True)
class Budget:
    """What a registry said last: its limit, what remains, and until when that holds."""

    limit: int
    remaining: int
    until: float  # time.monotonic() at which the window resets


_reserve = 0.10
_budgets: dict[str, Budget] = {}
_lock = threading.Lock()


def configure(reserve: float) -> None:
    """RATE_LIMIT_RESERVE, as a fraction of the limit (0 turns the reserve off)."""
    global _reserve
    _reserve = reserve


def parse_figure(value: str | None) -> tuple[int, float | None] | None:
    """`76;w=21600` into (76, 21600.0); None when absent or malformed."""
    if not value:
        return None
    match = _FIGURE.match(value.split(",", 1)[0])
    if match is None:
        return None
    window = float(match.group(2)) if match.group(2) else None
    return int(match.group(1)), window


def observe(registry: str, headers: Mapping[str, str]) -> None:
    """Record one upstream answer's rate-limit headers (no headers: nothing changes)."""
    source = headers.get("docker-ratelimit-source")
    if source:
        metrics.ratelimit_source_seen()
        log.debug("%s counts our pulls against %s", registry, source[:64])
    limit = parse_figure(headers.get("RateLimit-Limit"))
    remaining = parse_figure(headers.get("RateLimit-Remaining"))
    if limit is None or remaining is None or limit[0] <= 0:
        return
    window = next((w for w in (remaining[1], limit[1]) if w is not None), DEFAULT_WINDOW)
    budget = Budget(
        limit[0], min(remaining[0], limit[0]), time.monotonic() + min(window, MAX_WINDOW)
    )
    metrics.ratelimit_observed(registry, budget.limit, budget.remaining)
    with _lock:
        _budgets.pop(registry, None)
        while len(_budgets) >= MAX_REGISTRIES:
            del _budgets[next(iter(_budgets))]
        _budgets[registry] = budget


def reserve_reached(registry: str) -> bool:
    """True while the registry's remaining pulls are below RATE_LIMIT_RESERVE of its limit."""
    with _lock:
        budget = _budgets.get(registry)
    if budget is None or budget.until <= time.monotonic():
        return False
    return budget.remaining < _reserve * budget.limit


def reset() -> None:
    """Forget everything (tests)."""
    with _lock:
        _budgets.clear()
