"""Tag freshness (SPEC §13): the Cache-Control countdown and revalidation of stale tags."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import requests
import responses
from flask import Flask

from app import create_app, freshness, metrics, ratelimit
from app.config import AUTHENTICATED, TRANSPARENT, Config
from app.oci import MANIFEST, Target
from app.storage import ObjectMeta, keys, put
from app.storage.fs import FilesystemStorage
from app.upstream import ClientHeaders

REG, NAME = "registry.test", "org/app"
UP = f"https://{REG}/v2/{NAME}/manifests"
OCI = "application/vnd.oci.image.manifest.v1+json"


def _manifest(label: str) -> tuple[bytes, str]:
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI, "annotations": {"l": label}}).encode()
    return body, "sha256:" + hashlib.sha256(body).hexdigest()


OLD, OLD_DIGEST = _manifest("old")
NEW, NEW_DIGEST = _manifest("new")


def _target(reference: str) -> Target:
    return Target(registry=REG, name=NAME, kind=MANIFEST, reference=reference, client_name=NAME)


def _meta(stored_at: float) -> ObjectMeta:
    return ObjectMeta(OLD_DIGEST, len(OLD), OCI, stored_at=stored_at)


CONFIG = Config(proxy_mode=TRANSPARENT, tag_ttl=600, latest_ttl=60)


def test_tags_count_down_from_when_they_were_stored() -> None:
    assert freshness.cache_control(_target("v1"), _meta(1000), CONFIG, now=1000) == (
        "public, max-age=600"
    )
    assert freshness.cache_control(_target("v1"), _meta(1000), CONFIG, now=1250.5) == (
        "public, max-age=350"
    )
    assert freshness.cache_control(_target("latest"), _meta(1000), CONFIG, now=1010) == (
        "public, max-age=50"
    )
    assert freshness.cache_control(_target("v1"), _meta(1000), CONFIG, now=9999) == (
        "public, max-age=0"
    )


def test_digests_stay_immutable() -> None:
    digest = _target(OLD_DIGEST)
    assert freshness.cache_control(digest, _meta(0), CONFIG, now=1e10) == (
        "public, max-age=31536000, immutable"
    )
    assert not freshness.is_stale(digest, _meta(0), CONFIG, now=1e10)


def test_stale_exactly_at_the_ttl() -> None:
    assert not freshness.is_stale(_target("v1"), _meta(1000), CONFIG, now=1599.9)
    assert freshness.is_stale(_target("v1"), _meta(1000), CONFIG, now=1600)
    assert freshness.is_stale(_target("latest"), _meta(1000), CONFIG, now=1060)


def test_default_ttls_are_the_section_6_values() -> None:
    config = Config(proxy_mode=TRANSPARENT)
    assert freshness.cache_control(_target("v1"), _meta(5), config, now=5) == (
        "public, max-age=2419200"
    )
    assert freshness.cache_control(_target("latest"), _meta(5), config, now=5) == (
        "public, max-age=3600"
    )


# -- revalidation in the app, upstream mocked -------------------------------------------------


@pytest.fixture
def mock() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def _headers(digest: str, body: bytes) -> dict[str, str]:
    return {"Content-Type": OCI, "Content-Length": str(len(body)), "Docker-Content-Digest": digest}


def _app(tmp_path: Path, mode: str = TRANSPARENT, **settings: object) -> Flask:
    config = Config(
        proxy_mode=mode,
        storage_backend="fs",
        fs_root=str(tmp_path / "c"),
        upstream_registry=REG,
        spool_dir=str(tmp_path / "spool"),
        **settings,  # type: ignore[arg-type]
    )
    return create_app(config)


def _age(app: Flask, seconds: float) -> None:
    """Make the cached v1 look as if it was stored seconds earlier."""
    storage = app.extensions["oci_proxy"].storage
    key = keys.manifest(REG, NAME, "v1")
    meta = storage.stat(key)
    storage.update_meta(key, replace(meta, stored_at=meta.stored_at - seconds))


def _get(app: Flask) -> tuple[int, str, str]:
    return _get_with_age(app)[:3]


def _get_with_age(app: Flask) -> tuple[int, str, str, str | None]:
    response = app.test_client().get(f"/v2/{NAME}/manifests/v1")  # no Accept: writes the tag
    response.get_data()  # read the body as a client does (a miss is stored as it ends)
    try:
        return (
            response.status_code,
            response.headers.get("Docker-Content-Digest", ""),
            response.headers.get("Cache-Control", ""),
            response.headers.get("Age"),
        )
    finally:
        response.close()


def _count(result: str) -> float:
    return metrics.REVALIDATIONS.labels(result)._value.get()


def _prime(app: Flask, mock: responses.RequestsMock) -> None:
    mock.get(f"{UP}/v1", body=OLD, headers=_headers(OLD_DIGEST, OLD))
    assert _get(app)[1] == OLD_DIGEST
    _age(app, 28 * 86400 + 5)


def test_stale_unchanged_tag_is_refreshed_and_served_from_cache(
    tmp_path: Path, mock: responses.RequestsMock
) -> None:
    app = _app(tmp_path)
    _prime(app, mock)
    mock.head(f"{UP}/v1", headers=_headers(OLD_DIGEST, OLD))
    before = _count(freshness.UNCHANGED)
    status, digest, cache_control = _get(app)
    assert (status, digest) == (200, OLD_DIGEST)
    assert cache_control == "public, max-age=2419200", "stored_at was refreshed"
    assert [c.request.method for c in mock.calls] == ["GET", "HEAD"]
    assert _count(freshness.UNCHANGED) == before + 1
    _get(app)
    assert len(mock.calls) == 2, "fresh again: no more upstream requests"


def test_stale_moved_tag_is_fetched_and_replaced(
    tmp_path: Path, mock: responses.RequestsMock
) -> None:
    app = _app(tmp_path)
    _prime(app, mock)
    mock.head(f"{UP}/v1", headers=_headers(NEW_DIGEST, NEW))
    mock.replace(responses.GET, f"{UP}/v1", body=NEW, headers=_headers(NEW_DIGEST, NEW))
    assert _get(app)[1] == NEW_DIGEST
    assert [c.request.method for c in mock.calls] == ["GET", "HEAD", "GET"]
    status, digest, _ = _get(app)
    assert (status, digest, len(mock.calls)) == (200, NEW_DIGEST, 3), "the new one is cached"


def test_stale_tag_is_served_when_upstream_is_unreachable(
    tmp_path: Path, mock: responses.RequestsMock
) -> None:
    app = _app(tmp_path)
    _prime(app, mock)
    mock.head(f"{UP}/v1", body=requests.ConnectionError("connection refused"))
    before = _count(freshness.STALE_SERVED)
    status, digest, cache_control = _get(app)
    assert (status, digest, cache_control) == (200, OLD_DIGEST, "public, max-age=0")
    assert _count(freshness.STALE_SERVED) == before + 1


def test_authenticated_mode_refreshes_an_unchanged_stale_tag_on_its_check(
    tmp_path: Path, mock: responses.RequestsMock
) -> None:
    app = _app(tmp_path, AUTHENTICATED)
    _prime(app, mock)
    mock.head(f"{UP}/v1", headers=_headers(OLD_DIGEST, OLD))
    assert _get(app)[2] == "public, max-age=2419200"
    mock.replace(responses.HEAD, f"{UP}/v1", body=requests.ConnectionError("down"))
    assert _get(app)[0] == 502, "authenticated mode never serves without upstream (§5)"


def test_refresh_rewrites_only_the_sidecar(tmp_path: Path) -> None:
    """SPEC §15: refreshing a tag's freshness rewrites only its timestamp, never its data."""
    from app.freshness import refresh

    storage = FilesystemStorage(str(tmp_path / "cache"))
    key = keys.manifest(REG, NAME, "v1")
    data = b'{"schemaVersion":2}'
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    old = ObjectMeta(digest, len(data), OCI, stored_at=1000.0, sources=(f"{REG}/{NAME}",))
    put(storage, key, [data], old)
    data_file = storage.path(keys.data(key, digest))
    before = os.stat(data_file)
    fresh = refresh(storage, key, old)
    assert fresh.stored_at > 1000.0
    assert storage.stat(key) == fresh == replace(old, stored_at=fresh.stored_at)
    after = os.stat(data_file)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # Refreshing a digest the cache no longer holds changes nothing.
    gone = replace(old, digest="sha256:" + "0" * 64)
    refresh(storage, key, gone)
    assert storage.stat(key) == fresh


# -- stale serving (issue 14, item 5) --------------------------------------------------------


def test_classify_maps_every_head_answer_to_one_result() -> None:
    assert freshness.classify(200, True, False) == freshness.UNCHANGED
    assert freshness.classify(200, False, False) == freshness.CHANGED
    assert freshness.classify(404, False, False) == freshness.FORWARDED
    assert freshness.classify(404, False, True) == freshness.STALE_ON_404
    for failure in (None, 429, 500, 502, 503, 504):
        assert freshness.classify(failure, False, False) == freshness.STALE_SERVED
        assert freshness.classify(failure, False, True) == freshness.STALE_SERVED


def test_age_counts_whole_seconds_since_stored_at() -> None:
    assert freshness.age(_meta(1000), now=1000) == ("Age", "0")
    assert freshness.age(_meta(1000), now=1061.9) == ("Age", "61")
    assert freshness.age(_meta(1000), now=900) == ("Age", "0"), "a clock step back: never <0"


@pytest.mark.parametrize("status", [429, 500, 503])
def test_stale_tag_is_served_with_age_when_upstream_answers_an_error(
    tmp_path: Path, mock: responses.RequestsMock, status: int
) -> None:
    app = _app(tmp_path)
    _prime(app, mock)
    mock.head(f"{UP}/v1", status=status)
    before = _count(freshness.STALE_SERVED)
    status_code, digest, cache_control, age = _get_with_age(app)
    assert (status_code, digest, cache_control) == (200, OLD_DIGEST, "public, max-age=0")
    assert age is not None and int(age) >= 28 * 86400
    assert _count(freshness.STALE_SERVED) == before + 1


def test_a_fresh_or_revalidated_answer_has_no_age(
    tmp_path: Path, mock: responses.RequestsMock
) -> None:
    app = _app(tmp_path)
    mock.get(f"{UP}/v1", body=OLD, headers=_headers(OLD_DIGEST, OLD))
    assert _get_with_age(app)[3] is None, "a miss"
    assert _get_with_age(app)[3] is None, "a fresh hit"
    _age(app, 28 * 86400 + 5)
    mock.head(f"{UP}/v1", headers=_headers(OLD_DIGEST, OLD))
    assert _get_with_age(app)[3] is None, "revalidated: fresh again"


def test_404_is_forwarded_unless_serve_stale_on_404(
    tmp_path: Path, mock: responses.RequestsMock
) -> None:
    app = _app(tmp_path / "default")
    _prime(app, mock)
    mock.head(f"{UP}/v1", status=404)
    mock.replace(responses.GET, f"{UP}/v1", status=404, json={"errors": []})
    assert _get(app)[0] == 404, "by default a tag removed upstream is gone"

    mock.replace(responses.GET, f"{UP}/v1", body=OLD, headers=_headers(OLD_DIGEST, OLD))
    app = _app(tmp_path / "opted-in", serve_stale_on_404=True)
    _prime(app, mock)
    before = _count(freshness.STALE_ON_404)
    status, digest, _, age = _get_with_age(app)
    assert (status, digest) == (200, OLD_DIGEST)
    assert age is not None
    assert _count(freshness.STALE_ON_404) == before + 1


def _revalidator(app: Flask):  # type: ignore[no-untyped-def]
    return app.extensions["oci_proxy"].revalidator


def test_background_mode_answers_at_once_then_refreshes(
    tmp_path: Path, mock: responses.RequestsMock
) -> None:
    app = _app(tmp_path, tag_revalidate="background")
    _prime(app, mock)
    mock.head(f"{UP}/v1", headers=_headers(OLD_DIGEST, OLD))
    before = _count(freshness.STALE_WHILE_REVALIDATING)
    status, digest, cache_control, age = _get_with_age(app)
    assert (status, digest, cache_control) == (200, OLD_DIGEST, "public, max-age=0")
    assert age is not None, "the stale copy, at once"
    assert [c.request.method for c in mock.calls] == ["GET"], "no HEAD before the answer"
    assert _count(freshness.STALE_WHILE_REVALIDATING) == before + 1
    _revalidator(app).wait(10)
    assert [c.request.method for c in mock.calls] == ["GET", "HEAD"]
    head = mock.calls[1].request
    assert "application/vnd.oci.image.index.v1+json" in head.headers["Accept"]
    assert _get_with_age(app)[2:] == ("public, max-age=2419200", None), "refreshed"


def test_background_mode_fetches_a_moved_tag_and_drops_a_removed_one(
    tmp_path: Path, mock: responses.RequestsMock
) -> None:
    app = _app(tmp_path, tag_revalidate="background")
    _prime(app, mock)
    mock.head(f"{UP}/v1", headers=_headers(NEW_DIGEST, NEW))
    mock.replace(responses.GET, f"{UP}/v1", body=NEW, headers=_headers(NEW_DIGEST, NEW))
    assert _get(app)[1] == OLD_DIGEST, "the stale copy first"
    _revalidator(app).wait(10)
    assert _get_with_age(app)[1::2] == (NEW_DIGEST, None), "then the new one, fresh"

    _age(app, 28 * 86400 + 5)
    mock.replace(responses.HEAD, f"{UP}/v1", status=404)
    mock.replace(responses.GET, f"{UP}/v1", status=404, json={"errors": []})
    before = _count(freshness.REMOVED)
    assert _get(app)[1] == NEW_DIGEST
    _revalidator(app).wait(10)
    assert _count(freshness.REMOVED) == before + 1
    assert _get(app)[0] == 404, "removed upstream: the next request forwards the 404"


def test_background_revalidation_is_single_flighted(
    tmp_path: Path, mock: responses.RequestsMock
) -> None:
    app = _app(tmp_path, tag_revalidate="background")
    _prime(app, mock)
    mock.head(f"{UP}/v1", headers=_headers(OLD_DIGEST, OLD))
    revalidator = _revalidator(app)
    key = keys.manifest(REG, NAME, "v1")
    meta = app.extensions["oci_proxy"].storage.stat(key)
    client = ClientHeaders()
    first = revalidator.start(_target("v1"), key, meta, client)
    assert first is not None
    assert revalidator.start(_target("v1"), key, meta, client) is None, "one at a time"
    revalidator.wait(10)
    assert [c.request.method for c in mock.calls] == ["GET", "HEAD"]
    assert os.listdir(revalidator.lock_dir) == [], "no lock file left behind"


def test_rate_limit_reserve_serves_stale_without_revalidating(
    tmp_path: Path, mock: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = _app(tmp_path)
    _prime(app, mock)
    monkeypatch.setattr(ratelimit, "reserve_reached", lambda registry: registry == REG)
    before = _count(freshness.RATE_LIMIT_RESERVE)
    status, digest, _, age = _get_with_age(app)
    assert (status, digest) == (200, OLD_DIGEST) and age is not None
    assert [c.request.method for c in mock.calls] == ["GET"], "no upstream request at all"
    assert _count(freshness.RATE_LIMIT_RESERVE) == before + 1


def test_authenticated_mode_ignores_background_and_reserve(
    tmp_path: Path, mock: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """§15: every authenticated hit is checked upstream; down means 502, never stale."""
    app = _app(tmp_path, AUTHENTICATED, tag_revalidate="background", serve_stale_on_404=True)
    _prime(app, mock)
    monkeypatch.setattr(ratelimit, "reserve_reached", lambda registry: True)
    mock.head(f"{UP}/v1", body=requests.ConnectionError("down"))
    assert _get(app)[0] == 502
    mock.replace(responses.HEAD, f"{UP}/v1", status=404)
    mock.replace(responses.GET, f"{UP}/v1", status=404, json={"errors": []})
    assert _get(app)[0] == 404
