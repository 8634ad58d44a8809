"""Tag freshness against the real upstream registry: TAG_TTL, revalidation, serve-stale (§13)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.harness import Registry, build_image
from tests.harness.images import EVERY_MANIFEST_TYPE
from tests.harness.proxyproc import ProxyServer
from tests.harness.scrape import metric

pytestmark = pytest.mark.e2e
TTL = 6.0
ACCEPT = {"Accept": ", ".join(EVERY_MANIFEST_TYPE)}
TAG_PATH = "/v2/fresh/app/manifests/v1"


def _get(proxy: ProxyServer) -> requests.Response:
    r = requests.get(f"{proxy.url}{TAG_PATH}", headers=ACCEPT, timeout=30)
    assert r.status_code == 200, r.text
    return r


def _max_age(r: requests.Response) -> int:
    return int(r.headers["Cache-Control"].removeprefix("public, max-age="))


def test_tag_moves_after_its_ttl_and_is_served_stale_when_upstream_is_down(
    make_proxy: Callable[..., ProxyServer], tmp_path: Path
) -> None:
    one = {"platforms": ("linux/amd64",), "layer_sizes": (2048,)}
    first = build_image(tmp_path / "first", "v1", **one)  # type: ignore[arg-type]
    second = build_image(tmp_path / "second", "v1", **one)  # type: ignore[arg-type]
    assert first.ref_digest != second.ref_digest
    with Registry(tmp_path / "registry") as registry:
        first.push(f"docker://{registry.host}/fresh/app:v1")
        proxy = make_proxy(
            {
                "UPSTREAM_REGISTRY": registry.host,
                "INSECURE_REGISTRIES": registry.host,
                "TAG_TTL": f"{TTL:.0f}s",
            }
        )
        r = _get(proxy)
        cached_at = time.monotonic()
        assert r.headers["Docker-Content-Digest"] == first.ref_digest
        second.push(f"docker://{registry.host}/fresh/app:v1")  # upstream moves the tag
        mark = registry.mark()

        r = _get(proxy)
        assert time.monotonic() - cached_at < TTL, "the machine was too slow for this TTL"
        assert r.headers["Docker-Content-Digest"] == first.ref_digest, "fresh: the cached one"
        assert 0 <= _max_age(r) <= TTL, "Cache-Control counts down from TAG_TTL"
        assert registry.requests_log(since=mark) == [], "no upstream request while fresh"

        time.sleep(max(0.0, cached_at + TTL + 0.5 - time.monotonic()))
        r = _get(proxy)
        assert r.headers["Docker-Content-Digest"] == second.ref_digest, "stale: the new one"
        refreshed_at = time.monotonic()
        entries = registry.wait_for_requests(
            lambda es: any(e.method == "GET" and e.path == TAG_PATH for e in es), since=mark
        )
        assert [(e.method, e.path) for e in entries][:2] == [("HEAD", TAG_PATH), ("GET", TAG_PATH)]
        assert metric(proxy, "oci_tag_revalidations_total", result="changed") == 1
        r = _get(proxy)
        assert r.headers["Docker-Content-Digest"] == second.ref_digest
        assert _max_age(r) > TTL - 3, "the replacement is fresh again"

    # upstream stopped: transparent mode serves the stale copy, logs and counts it
    time.sleep(max(0.0, refreshed_at + TTL + 0.5 - time.monotonic()))
    r = _get(proxy)
    assert r.headers["Docker-Content-Digest"] == second.ref_digest
    assert _max_age(r) == 0
    assert r.content == second.top.data
    assert metric(proxy, "oci_tag_revalidations_total", result="stale served") == 1
    assert "is stale and" in proxy.log() and "serving the cached copy" in proxy.log()


def test_unchanged_tag_is_revalidated_with_a_head_and_kept(
    make_proxy: Callable[..., ProxyServer], tmp_path: Path
) -> None:
    image = build_image(tmp_path / "img", "v1", platforms=("linux/amd64",), layer_sizes=(1024,))
    with Registry(tmp_path / "registry") as registry:
        image.push(f"docker://{registry.host}/fresh/app:v1")
        proxy = make_proxy(
            {
                "UPSTREAM_REGISTRY": registry.host,
                "INSECURE_REGISTRIES": registry.host,
                "TAG_TTL": "2s",
            }
        )
        _get(proxy)
        time.sleep(2.5)
        mark = registry.mark()
        r = _get(proxy)
        assert r.headers["Docker-Content-Digest"] == image.ref_digest
        assert _max_age(r) >= 1, "refreshed: stored_at restarted"
        entries = registry.wait_for_requests(lambda es: len(es) >= 1, since=mark)
        assert [(e.method, e.path) for e in entries] == [("HEAD", TAG_PATH)], "no GET: kept"
        assert metric(proxy, "oci_tag_revalidations_total", result="unchanged") == 1
