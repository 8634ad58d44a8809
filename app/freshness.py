"""Tag freshness (SPEC §13): how long a cached tag is trusted, and revalidating it when stale.

A tag manifest is fresh for TAG_TTL (LATEST_TTL for `latest`) from its sidecar's
stored_at. A stale one is checked with an upstream HEAD: the same Docker-Content-Digest
refreshes stored_at and serves the cache, a new one refetches, a 404 is forwarded (or,
with SERVE_STALE_ON_404, the stale copy served), and an unreachable, timed-out, 429 or
5xx upstream in transparent mode serves the stale copy. Stale answers carry Age.
Authenticated mode never comes here: it checks every hit upstream (§5, §15).
Background revalidation and the rate-limit reserve are app/revalidate.py's.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from app import metrics
from app.errors import UpstreamUnavailable
from app.oci import BLOB, Target
from app.policy import IMMUTABLE, Action
from app.storage import NotFound, ObjectMeta, Storage, StoreError

if TYPE_CHECKING:
    from app.config import Config
    from app.fetch import Fetcher
    from app.upstream import ClientHeaders

log = logging.getLogger("oci_pull_through.freshness")

UNCHANGED, CHANGED, STALE_SERVED, FORWARDED = "unchanged", "changed", "stale served", "forwarded"
STALE_ON_404 = "stale on 404"  # upstream lost the tag; SERVE_STALE_ON_404 keeps serving it
STALE_WHILE_REVALIDATING = "stale revalidating"  # TAG_REVALIDATE=background: answered at once
RATE_LIMIT_RESERVE = "rate limit reserve"  # not revalidated: upstream's pulls are kept in reserve
REMOVED = "removed"  # background: upstream answered 404, the tag's entry is dropped
FAILED = "failed"  # background: upstream failed; the copy stays, stale
RESULTS = (
    UNCHANGED,
    CHANGED,
    STALE_SERVED,
    FORWARDED,
    STALE_ON_404,
    STALE_WHILE_REVALIDATING,
    RATE_LIMIT_RESERVE,
    REMOVED,
    FAILED,
)


def ttl(target: Target, config: Config) -> float | None:
    """Seconds a cached manifest stays fresh; None for immutable objects (digests, blobs)."""
    if target.kind == BLOB or target.is_digest:
        return None
    return config.latest_ttl if target.reference == "latest" else config.tag_ttl


def remaining(target: Target, meta: ObjectMeta, config: Config, now: float | None = None) -> int:
    """Whole seconds of freshness left (0 when stale); immutable objects never go stale."""
    period = ttl(target, config)
    if period is None:
        return 31536000
    age = (time.time() if now is None else now) - meta.stored_at
    return max(0, math.ceil(period - max(0.0, age)))


def is_stale(target: Target, meta: ObjectMeta, config: Config, now: float | None = None) -> bool:
    """A tag manifest older than its TTL must be revalidated before it is served."""
    period = ttl(target, config)
    if period is None:
        return False
    return (time.time() if now is None else now) - meta.stored_at >= period


def cache_control(
    target: Target, meta: ObjectMeta, config: Config, now: float | None = None
) -> str:
    """Cache-Control of a cached object: immutable, or the tag's remaining freshness."""
    if ttl(target, config) is None:
        return IMMUTABLE
    return f"public, max-age={remaining(target, meta, config, now)}"


def refresh(storage: Storage, key: str, meta: ObjectMeta) -> ObjectMeta:
    """Restart a tag's freshness: rewrite only its sidecar's stored_at (SPEC §15), not the data."""
    fresh = replace(meta, stored_at=time.time())
    try:
        storage.update_meta(key, fresh)
    except (NotFound, StoreError, OSError) as exc:
        log.warning("refreshing %s failed: %s", key, exc)
    return fresh


def classify(status: int | None, same_digest: bool, stale_on_404: bool) -> str:
    """What a stale tag's HEAD answer means (None: unreachable or timed out), as a result."""
    if status == 200:
        return UNCHANGED if same_digest else CHANGED
    if status == 404:
        return STALE_ON_404 if stale_on_404 else FORWARDED
    return STALE_SERVED  # 429, 5xx or any other failure: the cached copy beats no answer


def age(meta: ObjectMeta, now: float | None = None) -> tuple[str, str]:
    """The Age header of a stale answer: whole seconds since the tag was stored (RFC 9111)."""
    seconds = (time.time() if now is None else now) - meta.stored_at
    return ("Age", str(max(0, int(seconds))))


def served_stale(target: Target, result: str, why: str, level: int = logging.WARNING) -> None:
    """Every stale answer is logged and counted, whatever the reason."""
    log.log(level, "tag %s is stale and %s; serving the cached copy", target.reference, why)
    metrics.REVALIDATIONS.labels(result).inc()


def head(
    fetcher: Fetcher, target: Target, client: ClientHeaders
) -> tuple[int | None, str | None, str]:
    """The upstream HEAD of a tag: status (None when unreachable), digest, and why it failed."""
    try:
        check = fetcher.send("HEAD", target, client)
    except UpstreamUnavailable as exc:
        return None, None, str(exc)
    check.close()
    return check.status_code, check.headers.get("Docker-Content-Digest"), ""


def revalidate(
    fetcher: Fetcher, target: Target, key: str, meta: ObjectMeta, client: ClientHeaders
) -> tuple[Action, ObjectMeta, bool]:
    """HEAD upstream for a stale tag (transparent mode): what to do, the meta to serve, and
    whether that answer is stale (it then carries Age)."""
    status, digest, failure = head(fetcher, target, client)
    result = classify(status, digest == meta.digest, fetcher.config.serve_stale_on_404)
    if result == UNCHANGED:
        metrics.REVALIDATIONS.labels(UNCHANGED).inc()
        return Action.SERVE, refresh(fetcher.storage, key, meta), False
    if result in (CHANGED, FORWARDED):
        # Moved (or removed) upstream: fetch it and replace the cached copy, or forward the 404.
        metrics.REVALIDATIONS.labels(result).inc()
        return Action.FORWARD_AND_FILL, meta, False
    served_stale(target, result, failure or f"upstream answered {status} to its HEAD")
    return Action.SERVE, meta, True


def checked(
    fetcher: Fetcher, target: Target, key: str, meta: ObjectMeta, upstream_digest: str | None
) -> ObjectMeta:
    """Authenticated mode already HEADs every hit (§5): a stale, unchanged tag is refreshed."""
    if upstream_digest == meta.digest and is_stale(target, meta, fetcher.config):
        metrics.REVALIDATIONS.labels(UNCHANGED).inc()
        return refresh(fetcher.storage, key, meta)
    return meta
