"""Upstream rate limits (RateLimit-Limit / RateLimit-Remaining, as Docker Hub sends them).

Filled in by the upstream client from every answer; read by the tag freshness code, which
stops revalidating cached tags while a registry's remaining pulls are below the reserve.
"""

from __future__ import annotations


def reserve_reached(registry: str) -> bool:
    """True while the registry's remaining pulls are below RATE_LIMIT_RESERVE of its limit."""
    return False
