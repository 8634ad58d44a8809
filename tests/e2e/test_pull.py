"""Real skopeo and requests pulls through the real proxy, in every addressing form."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.harness import (
    ALIAS,
    PASSWORD,
    USER,
    BuiltImage,
    Registry,
    TokenServer,
    skopeo_pull,
    verify_pulled,
)
from tests.harness.images import EVERY_MANIFEST_TYPE
from tests.harness.proxyproc import ProxyServer

pytestmark = pytest.mark.e2e
ACCEPT = list(EVERY_MANIFEST_TYPE)


def _pull_ok(src: str, dest: Path, image: BuiltImage, creds: str | None = None) -> None:
    proc = skopeo_pull(src, dest, creds=creds)
    assert proc.returncode == 0, proc.stderr
    verify_pulled(dest, image)


def test_skopeo_hostless_cold_then_warm_makes_no_upstream_blob_request(
    make_proxy: Callable[..., ProxyServer],
    upstream: Registry,
    image: BuiltImage,
    tmp_path: Path,
    backend: dict[str, str],
) -> None:
    """Host-less form (Docker's registry-mirrors shape) to UPSTREAM_REGISTRY, on both backends."""
    proxy = make_proxy(
        {"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host, **backend}
    )
    cold = upstream.mark()
    _pull_ok(f"docker://{proxy.host}/e2e/app:v1", tmp_path / "cold", image)
    assert upstream.blob_gets(since=cold), "the cold pull must fetch blobs upstream"
    assert proxy.wait_cached(image.blobs()) == [], "every blob is cached after the cold pull"
    assert proxy.temp_files() == []
    warm = upstream.mark()
    _pull_ok(f"docker://{proxy.host}/e2e/app:v1", tmp_path / "warm", image)
    assert upstream.blob_gets(since=warm) == []


def test_skopeo_path_encoded_with_portless_alias(
    make_proxy: Callable[..., ProxyServer],
    alias_upstream: Registry,
    image: BuiltImage,
    tmp_path: Path,
) -> None:
    """Path-encoded form: proxy/upstream.test/e2e/app:v1, cold then warm."""
    proxy = make_proxy({"INSECURE_REGISTRIES": ALIAS})
    _pull_ok(f"docker://{proxy.host}/{ALIAS}/e2e/app:v1", tmp_path / "cold", image)
    assert proxy.wait_cached(image.blobs()) == []
    warm = alias_upstream.mark()
    _pull_ok(f"docker://{proxy.host}/{ALIAS}/e2e/app:v1", tmp_path / "warm", image)
    assert alias_upstream.blob_gets(since=warm) == []


def _get_all(proxy: ProxyServer, prefix: str, image: BuiltImage, query: str = "") -> None:
    """Fetch the index, every manifest and blob with requests, checking every digest."""
    r = requests.get(
        f"{proxy.url}/v2/{prefix}/manifests/v1{query}",
        headers={"Accept": ", ".join(ACCEPT)},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.headers["Docker-Content-Digest"] == image.ref_digest
    assert r.content == image.top.data
    for digest, blob in {**image.manifests(), **image.blobs()}.items():
        kind = "manifests" if digest in image.manifests() else "blobs"
        r = requests.get(
            f"{proxy.url}/v2/{prefix}/{kind}/{digest}{query}",
            headers={"Accept": ", ".join(ACCEPT)},
            timeout=10,
        )
        assert r.status_code == 200, (digest, r.text)
        assert r.content == blob.data


def test_ns_query_form_and_path_encoded_form_share_one_cache_entry(
    make_proxy: Callable[..., ProxyServer],
    alias_upstream: Registry,
    image: BuiltImage,
    backend: dict[str, str],
) -> None:
    """containerd's ?ns= form and the path-encoded form resolve to the same objects."""
    proxy = make_proxy({"INSECURE_REGISTRIES": ALIAS, **backend})
    _get_all(proxy, "e2e/app", image, f"?ns={ALIAS}")
    assert proxy.wait_cached(image.blobs()) == []
    mark = alias_upstream.mark()
    _get_all(proxy, f"{ALIAS}/e2e/app", image)
    assert alias_upstream.blob_gets(since=mark) == []
    manifest_gets = [e for e in alias_upstream.requests_log(since=mark) if "/manifests/" in e.path]
    assert manifest_gets == [], "tag and digest manifests must be hits after the ?ns= pull"


def test_path_encoded_with_port_by_requests(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, image: BuiltImage
) -> None:
    """Path-encoded with host:port in the path (curl-style clients can use it)."""
    proxy = make_proxy({"INSECURE_REGISTRIES": upstream.host})
    _get_all(proxy, f"{upstream.host}/e2e/app", image)


def test_token_upstream_public_anonymous_private_with_credentials(
    make_proxy: Callable[..., ProxyServer],
    token_upstream: tuple[Registry, TokenServer],
    image: BuiltImage,
    tmp_path: Path,
) -> None:
    """Token auth upstream, host-less: anonymous public pull, private needs credentials."""
    registry, tokens = token_upstream
    proxy = make_proxy(
        {
            "UPSTREAM_REGISTRY": registry.host,
            "INSECURE_REGISTRIES": f"{registry.host},{tokens.url.split('//')[1]}",
        }
    )
    _pull_ok(f"docker://{proxy.host}/public/app:v1", tmp_path / "public", image)
    denied = skopeo_pull(f"docker://{proxy.host}/private/app:v1", tmp_path / "denied")
    assert denied.returncode != 0
    assert "unauthorized" in denied.stderr.lower() or "denied" in denied.stderr.lower()
    _pull_ok(
        f"docker://{proxy.host}/private/app:v1",
        tmp_path / "private",
        image,
        creds=f"{USER}:{PASSWORD}",
    )


def test_tags_list_and_referrers_pass_through(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, image: BuiltImage
) -> None:
    """tags/list (with n) is forwarded uncached; referrers is forwarded too."""
    proxy = make_proxy({"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host})
    r = requests.get(f"{proxy.url}/v2/e2e/app/tags/list?n=10", timeout=10)
    assert r.status_code == 200
    assert json.loads(r.content) == {"name": "e2e/app", "tags": ["v1"]}
    mark = upstream.mark()
    requests.get(f"{proxy.url}/v2/e2e/app/tags/list", timeout=10).raise_for_status()
    upstream.wait_for_requests(lambda es: any("/tags/list" in e.path for e in es), since=mark)
    r = requests.get(
        f"{proxy.url}/v2/e2e/app/referrers/{image.manifest_digests['linux/amd64']}", timeout=10
    )
    # distribution 2.8 predates the referrers API: its answer (404) is forwarded as-is.
    assert r.status_code == 404
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
