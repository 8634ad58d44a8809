"""Answering from the cache: replayed headers, byte ranges, presigned redirects."""

from __future__ import annotations

import logging
from dataclasses import replace

from app import freshness, metrics, policy
from app.config import Config
from app.oci import BLOB, Target
from app.ranges import Unsatisfiable, parse_range
from app.reply import HIT, REDIRECT, Reply
from app.storage import NotFound, ObjectMeta, Storage, StoreError
from app.upstream import ClientHeaders

log = logging.getLogger("oci_pull_through.proxy")

_REPLAYED_BY_US = frozenset(
    {"content-length", "content-range", "accept-ranges", "cache-control", "docker-content-digest"}
)


def replay_headers(target: Target, meta: ObjectMeta, config: Config) -> list[tuple[str, str]]:
    """Stored upstream headers (the §15 allowlist, also for sidecars written before it) plus
    ours: type, length, digest, freshness, ranges."""
    headers = [
        (k, v)
        for k, v in policy.registry_headers(target.kind, meta.headers)
        if k.lower() not in _REPLAYED_BY_US and k.lower() != "content-type"
    ]
    headers += [
        ("Content-Type", policy.media_type(target.kind, meta.media_type)),
        ("Content-Length", str(meta.size)),
        ("Docker-Content-Digest", meta.digest),
        ("Cache-Control", freshness.cache_control(target, meta, config)),
    ]
    if target.kind == BLOB:
        headers.append(("Accept-Ranges", "bytes"))
    return headers


def manifest_from_cache(
    storage: Storage, config: Config, target: Target, key: str, meta: ObjectMeta, method: str
) -> Reply | None:
    """A cached manifest, or None when it cannot be read (the caller goes upstream)."""
    try:
        with storage.open(key, meta) as fh:
            data = fh.read() if method == "GET" else b""
    except (NotFound, StoreError) as exc:
        log.warning("cached manifest %s unreadable (%s); going upstream", key, exc)
        return None
    return Reply(200, replay_headers(target, meta, config), data, outcome=HIT)


def blob_from_cache(
    storage: Storage,
    config: Config,
    target: Target,
    key: str,
    meta: ObjectMeta,
    method: str,
    client: ClientHeaders,
) -> Reply | None:
    """A cached blob: 307 to S3, or a file span with Range support; None to go upstream."""
    headers = replay_headers(target, meta, config)
    try:
        shown = replace(meta, media_type=policy.media_type(target.kind, meta.media_type))
        url = storage.presign(key, shown) if method == "GET" else None  # HEAD: sidecar
    except StoreError as exc:
        log.warning("presigning %s failed (%s); going upstream", key, exc)
        return None
    if url is not None:
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        metrics.redirected(meta.size)
        return Reply(307, [*headers, ("Location", url), ("Content-Length", "0")], outcome=REDIRECT)
    use_range = client.range and (
        not client.if_range or client.if_range.strip('"') in (meta.digest, _etag(meta))
    )
    try:
        span = parse_range(client.range if use_range else None, meta.size)
    except Unsatisfiable:
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        return Reply(
            416,
            [*headers, ("Content-Range", f"bytes */{meta.size}"), ("Content-Length", "0")],
            outcome=HIT,
        )
    if method == "HEAD":
        return Reply(200, headers, outcome=HIT)
    start, length = (0, None) if span is None else (span.start, span.length)
    try:
        fh = storage.open(key, meta, start, length)  # S3: fetches only the span
    except (NotFound, StoreError) as exc:
        log.warning("cached blob %s unreadable (%s); going upstream", key, exc)
        return None
    if span is None:
        return Reply(200, headers, file=fh, length=meta.size, outcome=HIT)
    headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
    headers += [
        ("Content-Range", span.content_range(meta.size)),
        ("Content-Length", str(span.length)),
    ]
    return Reply(206, headers, file=fh, length=span.length, outcome=HIT)


def _etag(meta: ObjectMeta) -> str | None:
    for k, v in meta.headers:
        if k.lower() == "etag":
            return v.strip('"')
    return None
