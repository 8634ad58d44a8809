"""app/policy.py: the §5 decision tables, §6 cacheability and Cache-Control, header filtering."""

from __future__ import annotations

import pytest

from app.config import AUTHENTICATED, TRANSPARENT, Config
from app.oci import BLOB, MANIFEST, REFERRERS, TAGS, Target
from app.policy import (
    Action,
    cache_control,
    forwardable_headers,
    is_cacheable,
    plan,
    storable_headers,
)

DIGEST = "sha256:" + "12" * 32

# -- plan(): every row of both §5 tables -----------------------------------------------------------

TRANSPARENT_ROWS = [
    # method, hit, cacheable, action
    ("HEAD", True, True, Action.SERVE),
    ("HEAD", True, False, Action.SERVE),
    ("GET", True, True, Action.SERVE),
    ("GET", True, False, Action.SERVE),
    ("HEAD", False, True, Action.FORWARD),
    ("HEAD", False, False, Action.FORWARD),
    ("GET", False, True, Action.FORWARD_AND_FILL),
    ("GET", False, False, Action.FORWARD),
]

AUTHENTICATED_ROWS = [
    ("HEAD", True, True, Action.FORWARD),
    ("HEAD", True, False, Action.FORWARD),
    ("HEAD", False, True, Action.FORWARD),
    ("HEAD", False, False, Action.FORWARD),
    ("GET", True, True, Action.CHECK_THEN_SERVE),
    ("GET", True, False, Action.CHECK_THEN_SERVE),
    ("GET", False, True, Action.FORWARD_AND_FILL),
    ("GET", False, False, Action.FORWARD),
]


@pytest.mark.parametrize(("method", "hit", "cacheable", "expected"), TRANSPARENT_ROWS)
def test_transparent_plan(method: str, hit: bool, cacheable: bool, expected: Action) -> None:
    assert plan(TRANSPARENT, method, hit, cacheable) is expected


@pytest.mark.parametrize(("method", "hit", "cacheable", "expected"), AUTHENTICATED_ROWS)
def test_authenticated_plan(method: str, hit: bool, cacheable: bool, expected: Action) -> None:
    assert plan(AUTHENTICATED, method, hit, cacheable) is expected


def test_authenticated_never_serves_without_an_upstream_check() -> None:
    for method in ("GET", "HEAD"):
        for hit in (True, False):
            for cacheable in (True, False):
                assert plan(AUTHENTICATED, method, hit, cacheable) is not Action.SERVE


# -- is_cacheable ----------------------------------------------------------------------------------


def target(kind: str, reference: str) -> Target:
    return Target("registry.test", "org/app", kind, reference)


def config(**kwargs: bool) -> Config:
    return Config(proxy_mode=TRANSPARENT, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("tags", [True, False])
@pytest.mark.parametrize("latest", [True, False])
def test_blobs_and_digest_manifests_are_always_cacheable(tags: bool, latest: bool) -> None:
    cfg = config(cache_tag_manifests=tags, cache_latest_tag=latest)
    assert is_cacheable(target(BLOB, DIGEST), cfg)
    assert is_cacheable(target(MANIFEST, DIGEST), cfg)


def test_tag_manifest_follows_cache_tag_manifests() -> None:
    assert is_cacheable(target(MANIFEST, "v1"), config())
    assert is_cacheable(target(MANIFEST, "v1"), config(cache_tag_manifests=True))
    assert not is_cacheable(target(MANIFEST, "v1"), config(cache_tag_manifests=False))


def test_latest_needs_both_settings() -> None:
    latest = target(MANIFEST, "latest")
    assert not is_cacheable(latest, config())  # CACHE_LATEST_TAG defaults to false
    assert not is_cacheable(latest, config(cache_tag_manifests=True, cache_latest_tag=False))
    assert not is_cacheable(latest, config(cache_tag_manifests=False, cache_latest_tag=True))
    assert is_cacheable(latest, config(cache_tag_manifests=True, cache_latest_tag=True))


def test_only_the_exact_latest_tag_is_special() -> None:
    assert is_cacheable(target(MANIFEST, "latest-alpine"), config())
    assert is_cacheable(target(MANIFEST, "Latest"), config())


def test_passthrough_endpoints_are_never_cacheable() -> None:
    cfg = config(cache_tag_manifests=True, cache_latest_tag=True)
    assert not is_cacheable(target(TAGS, "list"), cfg)
    assert not is_cacheable(target(REFERRERS, DIGEST), cfg)


# -- Cache-Control (§6) ----------------------------------------------------------------------------


def test_cache_control_values() -> None:
    assert cache_control(target(BLOB, DIGEST)) == "public, max-age=31536000, immutable"
    assert cache_control(target(MANIFEST, DIGEST)) == "public, max-age=31536000, immutable"
    assert cache_control(target(MANIFEST, "v1.2.3")) == "public, max-age=2419200"
    assert cache_control(target(MANIFEST, "latest")) == "public, max-age=3600"


# -- header filtering ------------------------------------------------------------------------------

HOP_BY_HOP = [
    ("Connection", "keep-alive"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Authenticate", "Basic"),
    ("Proxy-Authorization", "Basic eA=="),
    ("TE", "trailers"),
    ("Trailer", "Expires"),
    ("Transfer-Encoding", "chunked"),
    ("Upgrade", "h2c"),
]
END_TO_END = [
    ("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
    ("Content-Length", "1234"),
    ("Docker-Content-Digest", DIGEST),
    ("ETag", f'"{DIGEST}"'),
    ("Accept-Ranges", "bytes"),
]


def names(headers: list[tuple[str, str]]) -> set[str]:
    return {k.lower() for k, _ in headers}


def test_forwardable_drops_hop_by_hop_and_keeps_end_to_end() -> None:
    result = forwardable_headers(HOP_BY_HOP + END_TO_END)
    assert names(result).isdisjoint({k.lower() for k, _ in HOP_BY_HOP})
    for pair in END_TO_END:
        assert pair in result


def test_hop_by_hop_matching_is_case_insensitive() -> None:
    result = forwardable_headers([("transfer-encoding", "chunked"), ("CONNECTION", "close")])
    assert result == []


def test_headers_named_in_connection_are_dropped() -> None:
    headers = [
        ("Connection", "X-Internal, x-trace"),
        ("X-Internal", "1"),
        ("X-Trace", "abc"),
        ("X-Kept", "yes"),
    ]
    assert forwardable_headers(headers) == [("X-Kept", "yes")]
    assert storable_headers(headers) == [("X-Kept", "yes")]


def test_forwardable_keeps_per_user_headers_for_this_client() -> None:
    headers = [("WWW-Authenticate", 'Bearer realm="https://auth.test/token"'), ("Set-Cookie", "a")]
    assert forwardable_headers(headers) == headers


def test_storable_never_keeps_per_user_headers() -> None:
    headers = [
        ("Set-Cookie", "session=1"),
        ("set-cookie", "other=2"),
        ("WWW-Authenticate", "Bearer realm=x"),
        ("Authorization", "Bearer t"),
        *END_TO_END,
    ]
    result = storable_headers(headers)
    assert names(result).isdisjoint({"set-cookie", "www-authenticate", "authorization"})
    for pair in END_TO_END:
        assert pair in result


def test_storable_drops_hop_by_hop() -> None:
    assert names(storable_headers(HOP_BY_HOP + END_TO_END)) == names(END_TO_END)


def test_header_order_and_duplicates_preserved() -> None:
    headers = [("Link", "<a>"), ("Content-Type", "x"), ("Link", "<b>")]
    assert forwardable_headers(headers) == headers
    assert storable_headers(headers) == headers
