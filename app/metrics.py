"""Prometheus metrics (SPEC §13): one place that names them, one function per event.

Under gunicorn, gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before the workers fork,
so prometheus-client keeps every worker's figures in that directory and /metrics sums
them. Without it (flask run, unit tests) the figures are this process's own.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

# Our own registry, not prometheus-client's global one: no process or platform collectors
# (meaningless summed across workers) and no clash when tests build several apps.
REGISTRY = CollectorRegistry(auto_describe=True)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter(
    "oci_requests",
    "Registry requests answered, by kind, method, status and cache outcome.",
    ["kind", "method", "status", "cache"],
    registry=REGISTRY,
)
SERVED_BYTES = Counter(
    "oci_served_bytes",
    "Body bytes delivered to clients, by source: cache, redirect (presigned S3) or upstream.",
    ["source"],
    registry=REGISTRY,
)
UPSTREAM_REQUESTS = Counter(
    "oci_upstream_requests",
    "Requests sent upstream, by registry and status (error: no answer).",
    ["registry", "status"],
    registry=REGISTRY,
)
UPSTREAM_LATENCY = Histogram(
    "oci_upstream_request_duration_seconds",
    "Time until upstream's response headers arrived, by registry and status.",
    ["registry", "status"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "oci_transfers_in_flight",
    "Upstream blob downloads in progress (one per object per instance).",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
COALESCED = Counter(
    "oci_coalesced_followers",
    "Blob requests that followed another request's download instead of fetching again.",
    registry=REGISTRY,
)
PREFETCHED_BYTES = Counter(
    "oci_prefetched_bytes",
    "Bytes of blobs downloaded and committed because their manifest was fetched (prefetch).",
    registry=REGISTRY,
)
PREFETCH_UNUSED = Counter(
    "oci_prefetch_unused",
    "Prefetched blobs that no client asked for within 10 minutes.",
    registry=REGISTRY,
)
COMMITS = Counter(
    "oci_cache_commits", "Objects committed to the cache, by kind.", ["kind"], registry=REGISTRY
)
ABORTS = Counter(
    "oci_cache_aborts",
    "Cache fills abandoned, by kind and reason (digest mismatch, truncated, store error, "
    "store too slow, client gone).",
    ["kind", "reason"],
    registry=REGISTRY,
)
REVALIDATIONS = Counter(
    "oci_tag_revalidations",
    "Stale tag manifests revalidated upstream, by result (unchanged, changed, stale served, "
    "forwarded).",
    ["result"],
    registry=REGISTRY,
)
FS_CACHE_BYTES = Gauge(
    "oci_fs_cache_bytes",
    "Bytes of committed objects in the filesystem cache, at the last scan.",
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
FS_CACHE_LIMIT = Gauge(
    "oci_fs_cache_limit_bytes",
    "FS_MAX_BYTES (0 when unbounded).",
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
EVICTED = Counter(
    "oci_cache_evicted_objects",
    "Objects evicted from the filesystem cache to stay under FS_MAX_BYTES.",
    registry=REGISTRY,
)
EVICTED_BYTES = Counter(
    "oci_cache_evicted_bytes", "Bytes evicted from the filesystem cache.", registry=REGISTRY
)

PEER_FETCHES = Counter(
    "oci_peer_fetches",
    "Misses asked of the owning replica, by outcome (ok, forwarded, cached, unreachable, "
    "refused, truncated, digest mismatch).",
    ["outcome"],
    registry=REGISTRY,
)
PEER_BYTES = Counter(
    "oci_peer_bytes", "Body bytes received from owning replicas.", registry=REGISTRY
)
PEER_FALLBACKS = Counter(
    "oci_peer_fallbacks",
    "Misses fetched upstream by this replica because the owning replica failed.",
    registry=REGISTRY,
)
PEER_REQUESTS = Counter(
    "oci_peer_requests",
    "Requests on the internal peer endpoint, by outcome (served, refused).",
    ["outcome"],
    registry=REGISTRY,
)

_SOURCES = {"hit": "cache", "redirect": "redirect", "miss": "upstream", "bypass": "upstream"}
_COMMITTED = "committed"


def request_finished(kind: str, method: str, status: int, outcome: str, sent: int) -> None:
    """Count one answered registry request and the body bytes the proxy itself delivered."""
    REQUESTS.labels(kind, method, str(status), outcome).inc()
    source = _SOURCES.get(outcome)
    if source is not None and source != "redirect" and sent:
        SERVED_BYTES.labels(source).inc(sent)


def redirected(size: int) -> None:
    """A hit answered with a presigned URL: the store delivers size bytes instead of us."""
    SERVED_BYTES.labels("redirect").inc(size)


OTHER = "other"
_known_registries: frozenset[str] = frozenset()


def know_registries(registries: Iterable[str]) -> None:
    """The registries the configuration names: the only ones that become label values."""
    global _known_registries
    _known_registries = frozenset(r for r in registries if "*" not in r)


def registry_label(registry: str) -> str:
    """A client chooses the registry it names; labels must not grow with its choices (§15)."""
    return registry if registry in _known_registries else OTHER


def upstream_answered(registry: str, status: int | str, seconds: float) -> None:
    """Count one upstream request and how long its headers took."""
    label = registry_label(registry)
    UPSTREAM_REQUESTS.labels(label, str(status)).inc()
    UPSTREAM_LATENCY.labels(label, str(status)).observe(seconds)


def fill_finished(kind: str, outcome: str) -> None:
    """Count a cache fill: committed, or aborted with the tee's reason."""
    if outcome == _COMMITTED:
        COMMITS.labels(kind).inc()
    else:
        ABORTS.labels(kind, outcome).inc()


def render(multiproc_dir: str | None) -> tuple[bytes, str]:
    """The exposition text and its content type: every worker's figures when multiprocess."""
    registry = REGISTRY
    if multiproc_dir:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=multiproc_dir)
    return generate_latest(registry), CONTENT_TYPE_LATEST


UPSTREAM_RETRIES = Counter(
    "oci_upstream_retries",
    "Upstream requests sent again before any body byte, by reason (connect, 502, 503, 504, 429).",
    ["reason"],
    registry=REGISTRY,
)


def upstream_retried(reason: str) -> None:
    """Count one retry; the reason is a status code or `connect`, never a client's choice."""
    UPSTREAM_RETRIES.labels(reason).inc()


RATELIMIT_LIMIT = Gauge(
    "oci_upstream_ratelimit_limit",
    "RateLimit-Limit of the registry's last answer (pulls per window).",
    ["registry"],
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
RATELIMIT_REMAINING = Gauge(
    "oci_upstream_ratelimit_remaining",
    "RateLimit-Remaining of the registry's last answer.",
    ["registry"],
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
RATELIMIT_SOURCES = Counter(
    "oci_upstream_ratelimit_source_answers",
    "Upstream answers carrying docker-ratelimit-source (the address is logged at debug only).",
    registry=REGISTRY,
)


def ratelimit_observed(registry: str, limit: int, remaining: int) -> None:
    """An upstream's rate-limit figures, under registry_label (§15: no client-chosen label)."""
    label = registry_label(registry)
    RATELIMIT_LIMIT.labels(label).set(limit)
    RATELIMIT_REMAINING.labels(label).set(remaining)


def ratelimit_source_seen() -> None:
    """Count an answer that said which address upstream counts our pulls against."""
    RATELIMIT_SOURCES.inc()
