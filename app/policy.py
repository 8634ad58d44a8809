"""The caching policy: what is cached, for how long, and what each proxy mode does (SPEC §5, §6).

Pure decisions, no I/O: every row of the §5 tables is one branch of plan().
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import Enum

from app.config import AUTHENTICATED, Config
from app.oci import BLOB, MANIFEST, Target, accepts

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


# §15 "Replayed headers": only the registry's own headers reach a client of a 2xx answer.
_REGISTRY_HEADERS = frozenset(
    {"content-type", "docker-content-digest", "etag", "last-modified", "accept-ranges"}
)
_LENGTH_HEADERS = frozenset({"content-length", "content-range"})
_NOT_REPLAYED = frozenset({"docker-distribution-api-version", "docker-ratelimit-source"})
_BLOB_TYPE = re.compile(r"application/(octet-stream|vnd\.(oci|docker|cncf)\.[a-z0-9][a-z0-9.+_-]*)")
_MANIFEST_TYPE = re.compile(r"application/(json|vnd\.[a-z0-9][a-z0-9.+_-]*)")
_SAFE_VALUE = re.compile(r"[\x20-\x7e]*")
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
IMAGE_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)


def media_type(kind: str, value: str | None) -> str:
    """The Content-Type a cached object may carry: a registry type, else octet-stream."""
    shown = (value or "").split(";")[0].strip().lower()
    pattern = _BLOB_TYPE if kind == BLOB else _MANIFEST_TYPE
    return shown if pattern.fullmatch(shown) else "application/octet-stream"


def registry_headers(
    kind: str, headers: Iterable[tuple[str, str]], *, lengths: bool = False
) -> list[tuple[str, str]]:
    """The upstream headers any client may see with a blob or manifest (§15 allowlist).

    Content-Type is narrowed to a registry media type; lengths keeps Content-Length and
    Content-Range for answers streamed straight from upstream.
    """
    kept: list[tuple[str, str]] = []
    for key, value in headers:
        name = key.lower()
        if name in _NOT_REPLAYED or not _SAFE_VALUE.fullmatch(value):
            continue
        if name == "content-type":
            kept.append(("Content-Type", media_type(kind, value)))
        elif (
            name in _REGISTRY_HEADERS
            or (lengths and name in _LENGTH_HEADERS)
            or (kind == MANIFEST and name.startswith(("oci-", "docker-")))
        ):
            kept.append((key, value))
    if not any(k.lower() == "content-type" for k, _ in kept):
        kept.append(("Content-Type", media_type(kind, None)))
    return kept


def may_write_tag(accept_values: Iterable[str]) -> bool:
    """Only an answer to a client that takes every index and image manifest type is the tag's.

    A narrower Accept lets a registry pick one platform, or one format, for that client
    (§15 "Tags"); such an answer is stored by digest only.
    """
    values = list(accept_values)
    return all(accepts(values, t) for t in (*INDEX_TYPES, *IMAGE_TYPES))
