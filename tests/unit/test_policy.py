"""app/policy.py: the §5 decision tables, §6 cacheability and Cache-Control, header filtering."""

from __future__ import annotations

import pytest

from app.config import AUTHENTICATED, TRANSPARENT, Config
from app.oci import BLOB, MANIFEST, REFERRERS, TAGS, Target
from app.policy import (
    Action,
    forwardable_headers,
    is_cacheable,
    may_write_tag,
    media_type,
    plan,
    registry_headers,
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


def test_forwardable_keeps_per_user_headers_for_this_client() -> None:
    headers = [("WWW-Authenticate", 'Bearer realm="https://auth.test/token"'), ("Set-Cookie", "a")]
    assert forwardable_headers(headers) == headers


# -- §15 replayed headers: a fixed allowlist -------------------------------------------------------

HOSTILE = [
    ("Set-Cookie", "session=1"),
    ("WWW-Authenticate", "Bearer realm=x"),
    ("Authorization", "Bearer t"),
    ("Content-Encoding", "gzip"),
    ("Content-Disposition", "attachment; filename=x.html"),
    ("Refresh", "0; url=http://evil.example/"),
    ("Link", "<http://evil.example/>"),
    ("X-Anything", "1"),
    ("Docker-Distribution-API-Version", "registry/2.0"),
]


@pytest.mark.parametrize("kind", [BLOB, MANIFEST])
def test_only_registry_headers_are_kept(kind: str) -> None:
    kept = registry_headers(kind, HOSTILE + HOP_BY_HOP + END_TO_END)
    assert names(kept) == {"content-type", "docker-content-digest", "etag", "accept-ranges"}
    assert ("ETag", f'"{DIGEST}"') in kept


def test_lengths_are_kept_only_when_asked() -> None:
    headers = [("Content-Length", "5"), ("Content-Range", "bytes 0-4/10")]
    assert names(registry_headers(BLOB, headers)) == {"content-type"}
    assert names(registry_headers(BLOB, headers, lengths=True)) == {
        "content-type",
        "content-length",
        "content-range",
    }


def test_registry_headers_of_manifests_only() -> None:
    headers = [("OCI-Subject", DIGEST), ("Docker-Content-Digest", DIGEST), ("X-Other", "1")]
    assert names(registry_headers(MANIFEST, headers)) == {
        "oci-subject",
        "docker-content-digest",
        "content-type",
    }
    assert names(registry_headers(BLOB, headers)) == {"docker-content-digest", "content-type"}


def test_header_values_with_control_characters_are_dropped() -> None:
    assert names(registry_headers(BLOB, [("ETag", "a\x00b")])) == {"content-type"}


@pytest.mark.parametrize(
    ("kind", "value", "shown"),
    [
        (BLOB, "application/vnd.oci.image.layer.v1.tar+gzip", None),
        (BLOB, "application/vnd.docker.image.rootfs.diff.tar.gzip", None),
        (BLOB, "application/vnd.oci.image.config.v1+json", None),
        (BLOB, "application/octet-stream", None),
        (BLOB, "text/html", "application/octet-stream"),
        (BLOB, "application/javascript", "application/octet-stream"),
        (BLOB, "application/vnd.oci.image.layer.v1.tar; charset=x<script>", None),
        (BLOB, None, "application/octet-stream"),
        (MANIFEST, "application/vnd.oci.image.index.v1+json", None),
        (MANIFEST, "application/vnd.docker.distribution.manifest.v1+prettyjws", None),
        (MANIFEST, "application/json", None),
        (MANIFEST, "text/html", "application/octet-stream"),
        (MANIFEST, "image/svg+xml", "application/octet-stream"),
    ],
)
def test_media_type_is_a_registry_type(kind: str, value: str | None, shown: str | None) -> None:
    expected = shown or (value or "").split(";")[0]
    assert media_type(kind, value) == expected
    assert dict(registry_headers(kind, [("Content-Type", value or "")]))["Content-Type"] == expected


# -- §15 tags: only a client taking every index and image manifest type writes a tag ----------

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.mark.parametrize(
    ("accept", "allowed"),
    [
        ([], True),
        (["*/*"], True),
        (["application/*"], True),
        ([f"{OCI_INDEX}, {OCI_MANIFEST}"], False),  # a Docker list could be narrowed
        ([DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST], True),  # as skopeo sends
        ([DOCKER_LIST, DOCKER_MANIFEST], False),  # an OCI index could be narrowed for it
        ([f"{DOCKER_LIST}, {OCI_MANIFEST}"], False),
        ([DOCKER_MANIFEST], False),  # distribution answers with one platform
        ([OCI_MANIFEST, DOCKER_MANIFEST], False),
        ([OCI_INDEX], False),
        ([f"{OCI_INDEX}, {OCI_MANIFEST};q=0"], False),
        ([f"*/*, {OCI_INDEX};q=0"], False),
    ],
)
def test_may_write_tag(accept: list[str], allowed: bool) -> None:
    assert may_write_tag(accept) is allowed
