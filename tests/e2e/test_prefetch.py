"""Manifest-triggered prefetch against a real registry: blobs fetched before they are asked for."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

import pytest
import requests

from tests.harness import BuiltImage, Registry
from tests.harness.fakeupstream import Behaviour, FakeUpstream
from tests.harness.images import MT_OCI_MANIFEST
from tests.harness.proxyproc import ProxyServer

pytestmark = pytest.mark.e2e


def _blob_gets(registry: Registry, mark: int, digests: list[str]) -> list[str]:
    return [
        e.path.rsplit("/", 1)[-1]
        for e in registry.requests_log(since=mark)
        if e.method == "GET" and e.path.rsplit("/", 1)[-1] in digests
    ]


def test_image_manifest_get_prefetches_its_config_and_layers(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, image: BuiltImage
) -> None:
    proxy = make_proxy({"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host})
    platform = image.platform("linux/amd64")
    blobs = [b.digest for b in platform.blobs()]
    mark = upstream.mark()
    r = requests.get(
        f"{proxy.url}/v2/e2e/app/manifests/{platform.manifest_digest}",
        headers={"Accept": MT_OCI_MANIFEST},
        timeout=10,
    )
    assert r.status_code == 200
    assert proxy.wait_cached(blobs, timeout=15) == [], "prefetched without being asked"
    assert sorted(_blob_gets(upstream, mark, blobs)) == sorted(blobs), "one GET each"
    mark = upstream.mark()
    for blob in platform.blobs():
        r = requests.get(f"{proxy.url}/v2/e2e/app/blobs/{blob.digest}", timeout=10)
        assert r.status_code == 200 and r.content == blob.data
    assert _blob_gets(upstream, mark, blobs) == [], "the client's requests were hits"
    text = requests.get(f"{proxy.url}/metrics", timeout=10).text
    prefetched = sum(b.size for b in platform.blobs())
    assert f"oci_prefetched_bytes_total {float(prefetched)}" in text


@pytest.mark.parametrize("how", ["HEAD", "disabled"])
def test_head_or_zero_concurrency_prefetches_nothing(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, image: BuiltImage, how: str
) -> None:
    env = {"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host}
    if how == "disabled":
        env["PREFETCH_CONCURRENCY"] = "0"
    proxy = make_proxy(env)
    platform = image.platform("linux/arm64")
    blobs = [b.digest for b in platform.blobs()]
    mark = upstream.mark()
    r = requests.request(
        "HEAD" if how == "HEAD" else "GET",
        f"{proxy.url}/v2/e2e/app/manifests/{platform.manifest_digest}",
        headers={"Accept": MT_OCI_MANIFEST},
        timeout=10,
    )
    assert r.status_code == 200
    time.sleep(1.5)
    assert _blob_gets(upstream, mark, blobs) == []
    assert not any(proxy.is_cached(d) for d in blobs)


def test_the_clients_blob_request_joins_the_prefetch_in_flight(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    """A slow layer: the client asks while the prefetch is still downloading; one GET."""
    layer_digest, layer = fake.blob("slow/app", 4 * 1024 * 1024, chunk=64 * 1024)
    fake.routes[f"/v2/slow/app/blobs/{layer_digest}"].delay_per_chunk = 0.02  # ~1.3 s
    config = b'{"architecture":"amd64","os":"linux"}'
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    fake.routes[f"/v2/slow/app/blobs/{config_digest}"] = Behaviour(body=config)
    doc = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": len(layer),
            }
        ],
    }
    manifest = json.dumps(doc).encode()
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    fake.routes[f"/v2/slow/app/manifests/{digest}"] = Behaviour(
        body=manifest, headers={"Content-Type": MT_OCI_MANIFEST, "Docker-Content-Digest": digest}
    )
    proxy = make_proxy({"INSECURE_REGISTRIES": fake.host})
    base = f"{proxy.url}/v2/{fake.host}/slow/app"
    assert requests.get(f"{base}/manifests/{digest}", timeout=10).status_code == 200
    deadline = time.monotonic() + 5
    while fake.count("GET", layer_digest) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    r = requests.get(f"{base}/blobs/{layer_digest}", timeout=30)
    assert r.status_code == 200 and r.content == layer
    assert fake.count("GET", layer_digest) == 1, "joined the prefetch's download"
    assert proxy.wait_cached([layer_digest, config_digest]) == []
