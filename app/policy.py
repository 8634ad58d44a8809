"""The caching policy: what is cached, for how long, and what each proxy mode does (SPEC §5, §6).

Pure decisions, no I/O: every row of the §5 tables is one branch of plan().
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from app.config import AUTHENTICATED, Config
from app.oci import BLOB, MANIFEST, Target

IMMUTABLE = "public, max-age=31536000, immutable"
TAG_MAX_AGE = "public, max-age=2419200"
LATEST_MAX_AGE = "public, max-age=3600"

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
PER_USER = frozenset({"set-cookie", "www-authenticate", "authorization"})
# Set by whichever server answers; replaying upstream's copy would duplicate or lie.
SERVER_OWNED = frozenset({"date", "server", "docker-distribution-api-version"})


class Action(Enum):
    """What to do with one request, decided before any I/O."""

    SERVE = "serve from cache"
    CHECK_THEN_SERVE = "HEAD upstream with the client's credentials, then serve from cache"
    FORWARD = "forward upstream, do not cache"
    FORWARD_AND_FILL = "forward upstream and tee the body into the cache"


def plan(mode: str, method: str, hit: bool, cacheable: bool) -> Action:
    """The §5 tables: one decision per (mode, method, cache state)."""
    if mode == AUTHENTICATED:
        if method == "HEAD":
            return Action.FORWARD
        if hit:
            return Action.CHECK_THEN_SERVE
        return Action.FORWARD_AND_FILL if cacheable else Action.FORWARD
    if hit:
        return Action.SERVE
    if method == "GET" and cacheable:
        return Action.FORWARD_AND_FILL
    return Action.FORWARD


def is_cacheable(target: Target, config: Config) -> bool:
    """Blobs and digest manifests always; tags per CACHE_TAG_MANIFESTS and CACHE_LATEST_TAG."""
    if target.kind == BLOB:
        return True
    if target.kind != MANIFEST:
        return False
    if target.is_digest:
        return True
    if not config.cache_tag_manifests:
        return False
    return target.reference != "latest" or config.cache_latest_tag


def cache_control(target: Target) -> str:
    """The Cache-Control of a response served from cache (§6)."""
    if target.kind == BLOB or target.is_digest:
        return IMMUTABLE
    return LATEST_MAX_AGE if target.reference == "latest" else TAG_MAX_AGE


def forwardable_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Upstream headers a WSGI response may carry: no hop-by-hop ones, nor any Connection names."""
    pairs = list(headers)
    named = {
        token.strip().lower()
        for key, value in pairs
        if key.lower() == "connection"
        for token in value.split(",")
    }
    return [
        (k, v)
        for k, v in pairs
        if k.lower() not in HOP_BY_HOP and k.lower() not in named and k.lower() not in SERVER_OWNED
    ]


def storable_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers safe to store and replay to every client: no hop-by-hop, no per-user ones."""
    return [
        (k, v)
        for k, v in forwardable_headers(headers)
        if k.lower() not in PER_USER and k.lower() != "cache-control"
    ]
