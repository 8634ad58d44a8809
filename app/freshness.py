"""Tag freshness (SPEC §13): how long a cached tag is trusted, and revalidating it when stale.

A tag manifest is fresh for TAG_TTL (LATEST_TTL for `latest`) from its sidecar's
stored_at. A stale one is checked with an upstream HEAD: the same Docker-Content-Digest
refreshes stored_at and serves the cache, a new one refetches, and an unreachable
upstream in transparent mode serves the stale copy.
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


def revalidate(
    fetcher: Fetcher, target: Target, key: str, meta: ObjectMeta, client: ClientHeaders
) -> tuple[Action, ObjectMeta]:
    """HEAD upstream for a stale tag (transparent mode): what to do, and the meta to serve."""
    try:
        check = fetcher.send("HEAD", target, client)
    except UpstreamUnavailable as exc:
        log.warning("tag %s is stale and %s; serving the cached copy", target.reference, exc)
        metrics.REVALIDATIONS.labels(STALE_SERVED).inc()
        return Action.SERVE, meta
    check.close()
    upstream_digest = check.headers.get("Docker-Content-Digest")
    if check.status_code == 200 and upstream_digest == meta.digest:
        metrics.REVALIDATIONS.labels(UNCHANGED).inc()
        return Action.SERVE, refresh(fetcher.storage, key, meta)
    if check.status_code == 200 or check.status_code == 404:
        # Moved (or removed) upstream: fetch it and replace the cached copy, or forward the 404.
        metrics.REVALIDATIONS.labels(CHANGED if check.status_code == 200 else FORWARDED).inc()
        return Action.FORWARD_AND_FILL, meta
    log.warning(
        "tag %s is stale; upstream answered %d to its HEAD; serving the cached copy",
        target.reference,
        check.status_code,
    )
    metrics.REVALIDATIONS.labels(STALE_SERVED).inc()
    return Action.SERVE, meta


def checked(
    fetcher: Fetcher, target: Target, key: str, meta: ObjectMeta, upstream_digest: str | None
) -> ObjectMeta:
    """Authenticated mode already HEADs every hit (§5): a stale, unchanged tag is refreshed."""
    if upstream_digest == meta.digest and is_stale(target, meta, fetcher.config):
        metrics.REVALIDATIONS.labels(UNCHANGED).inc()
        return refresh(fetcher.storage, key, meta)
    return meta
