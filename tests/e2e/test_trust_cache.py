"""SPEC §15 attacks on what the cache serves: each test reproduces one against the real proxy.

A private blob read through a registry the attacker runs, a narrow Accept replacing a
multi-arch tag, hostile upstream headers replayed to everyone, the allowlist skipped on
hits, and unbounded upstream bodies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.harness import PASSWORD, USER, BuiltImage, Registry, TokenServer, build_image
from tests.harness.fakeupstream import Behaviour, FakeUpstream
from tests.harness.hostile import MIB, Answer, HostileUpstream, rss_kib
from tests.harness.proxyproc import ProxyServer

pytestmark = pytest.mark.e2e

MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LIST_CAPABLE = f"{MT_OCI_INDEX}, {MT_DOCKER_LIST}, {MT_OCI_MANIFEST}, {MT_DOCKER_MANIFEST}"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def secret_upstream(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Registry, TokenServer, BuiltImage]]:
    """A token-auth registry whose private/secret image only alice may pull."""
    work = tmp_path_factory.mktemp("secret-upstream")
    image = build_image(work / "layout", "v1", platforms=("linux/amd64",), layer_sizes=(70_000,))
    tokens = TokenServer(
        work / "tokens", users={USER: PASSWORD}, acl={USER: {"*": ["*"]}}, anonymous_pull=[]
    )
    with tokens, Registry(work / "registry", auth="token", token_server=tokens) as registry:
        image.push(f"docker://{registry.host}/private/secret:v1", creds=f"{USER}:{PASSWORD}")
        yield registry, tokens, image


def _alice(tokens: TokenServer, repo: str) -> dict[str, str]:
    r = requests.get(
        tokens.realm,
        params={"service": tokens.service, "scope": f"repository:{repo}:pull"},
        auth=(USER, PASSWORD),
        timeout=10,
    )
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['token']}"}


# -- 1. a cached private blob through a registry the attacker runs ---------------------------


@pytest.mark.parametrize("form", ["path", "ns"])
def test_authenticated_private_blob_is_not_served_through_another_registry(
    make_proxy: Callable[..., ProxyServer],
    secret_upstream: tuple[Registry, TokenServer, BuiltImage],
    fake: FakeUpstream,
    backend: dict[str, str],
    form: str,
) -> None:
    """The attacker's registry says HEAD 200 for any digest; the proxy must not answer with
    the private bytes it cached for alice (whole, ranged, or as an S3 redirect)."""
    registry, tokens, image = secret_upstream
    token_host = tokens.url.split("//", 1)[1]
    proxy = make_proxy(
        {
            **backend,
            "PROXY_MODE": "authenticated",
            "UPSTREAM_REGISTRY": registry.host,
            "INSECURE_REGISTRIES": f"{registry.host},{token_host},{fake.host}",
        }
    )
    layer = image.platform("linux/amd64").layers[-1].digest
    secret = image.all_blobs()[layer].data
    r = requests.get(
        f"{proxy.url}/v2/private/secret/blobs/{layer}",
        headers=_alice(tokens, "private/secret"),
        timeout=10,
    )
    assert r.status_code == 200 and r.content == secret
    assert proxy.wait_cached([layer]) == []

    decoy = b"the attacker's own bytes"
    fake.routes[f"/v2/x/y/blobs/{layer}"] = Behaviour(body=decoy)
    if form == "path":
        url, params = f"{proxy.url}/v2/{fake.host}/x/y/blobs/{layer}", {}
    else:
        url, params = f"{proxy.url}/v2/x/y/blobs/{layer}", {"ns": fake.host}
    for headers in ({}, {"Range": "bytes=0-99"}, {"Range": "bytes=100-"}):
        r = requests.get(url, params=params, headers=headers, timeout=10)
        assert secret[:100] not in r.content and secret[100:200] not in r.content, headers
        assert r.content == decoy, "the named upstream's own answer, not the cache"
    # Another repository of the real registry that alice's token does not cover.
    r = requests.get(f"{proxy.url}/v2/public/other/blobs/{layer}", timeout=10)
    assert r.status_code in (401, 404) and secret not in r.content
    # Alice through the source repository is still served from the cache.
    mark = registry.mark()
    r = requests.get(
        f"{proxy.url}/v2/private/secret/blobs/{layer}",
        headers=_alice(tokens, "private/secret"),
        timeout=10,
    )
    assert r.status_code == 200 and r.content == secret
    log = registry.wait_for_requests(
        lambda es: any(e.method == "HEAD" and layer in e.path for e in es), since=mark
    )
    assert [e for e in log if e.method == "GET" and layer in e.path] == []


def test_authenticated_other_source_is_fetched_and_verified_before_it_counts(
    make_proxy: Callable[..., ProxyServer],
    secret_upstream: tuple[Registry, TokenServer, BuiltImage],
    fake: FakeUpstream,
) -> None:
    """A registry that really has the bytes becomes a source only after a verified fetch."""
    registry, tokens, image = secret_upstream
    token_host = tokens.url.split("//", 1)[1]
    proxy = make_proxy(
        {
            "PROXY_MODE": "authenticated",
            "UPSTREAM_REGISTRY": registry.host,
            "INSECURE_REGISTRIES": f"{registry.host},{token_host},{fake.host}",
        }
    )
    layer = image.platform("linux/amd64").layers[-1].digest
    secret = image.all_blobs()[layer].data
    alice = _alice(tokens, "private/secret")
    r = requests.get(f"{proxy.url}/v2/private/secret/blobs/{layer}", headers=alice, timeout=10)
    assert r.status_code == 200
    assert proxy.wait_cached([layer]) == []
    fake.routes[f"/v2/mirror/copy/blobs/{layer}"] = Behaviour(body=secret)
    url = f"{proxy.url}/v2/{fake.host}/mirror/copy/blobs/{layer}"
    assert requests.get(url, timeout=10).content == secret
    assert fake.count("GET", layer) == 1, "fetched from the named upstream, not the cache"
    deadline = time.monotonic() + 5
    while fake.count("GET", layer) == 1 and time.monotonic() < deadline:
        assert requests.get(url, timeout=10).content == secret
        if fake.count("GET", layer) == 1:
            break
        time.sleep(0.2)
    before = fake.count("GET", layer)
    assert requests.get(url, timeout=10).content == secret
    assert fake.count("GET", layer) == before, "now a verified source: served from cache"
    assert fake.count("HEAD", layer) >= 1, "after its own upstream check"


# -- 2. one narrow Accept replaces a cached multi-arch tag -----------------------------------


def _upload(registry: Registry, repo: str, data: bytes) -> str:
    digest = _digest(data)
    r = requests.post(f"{registry.url}/v2/{repo}/blobs/uploads/", timeout=10)
    assert r.status_code == 202, r.text
    location = r.headers["Location"]
    if location.startswith("/"):
        location = registry.url + location
    sep = "&" if "?" in location else "?"
    r = requests.put(f"{location}{sep}digest={digest}", data=data, timeout=10)
    assert r.status_code == 201, r.text
    return digest


def _put_manifest(registry: Registry, repo: str, ref: str, data: bytes, media_type: str) -> None:
    r = requests.put(
        f"{registry.url}/v2/{repo}/manifests/{ref}",
        data=data,
        headers={"Content-Type": media_type},
        timeout=10,
    )
    assert r.status_code == 201, r.text


def push_docker_list(registry: Registry, repo: str, tag: str) -> dict[str, bytes]:
    """A Docker manifest list for linux/amd64 and linux/arm64, pushed with the registry API."""
    manifests: dict[str, bytes] = {}
    entries = []
    for arch in ("amd64", "arm64"):
        layer = os.urandom(2048)
        config = json.dumps(
            {"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MT_DOCKER_MANIFEST,
                "config": {
                    "mediaType": MT_DOCKER_CONFIG,
                    "size": len(config),
                    "digest": _upload(registry, repo, config),
                },
                "layers": [
                    {
                        "mediaType": MT_DOCKER_LAYER,
                        "size": len(layer),
                        "digest": _upload(registry, repo, layer),
                    }
                ],
            }
        ).encode()
        _put_manifest(registry, repo, _digest(manifest), manifest, MT_DOCKER_MANIFEST)
        manifests[arch] = manifest
        entries.append(
            {
                "mediaType": MT_DOCKER_MANIFEST,
                "size": len(manifest),
                "digest": _digest(manifest),
                "platform": {"architecture": arch, "os": "linux"},
            }
        )
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": MT_DOCKER_LIST, "manifests": entries}
    ).encode()
    _put_manifest(registry, repo, tag, index, MT_DOCKER_LIST)
    manifests["list"] = index
    return manifests


def test_narrow_accept_never_replaces_a_multi_arch_tag(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, backend: dict[str, str]
) -> None:
    """distribution answers a list-less client with the amd64 manifest; that answer must not
    become what list-capable clients (arm64 nodes too) get for the tag."""
    pushed = push_docker_list(upstream, "e2e/multi", "v1")
    proxy = make_proxy(
        {**backend, "UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host}
    )
    url = f"{proxy.url}/v2/e2e/multi/manifests/v1"
    narrow = requests.get(url, headers={"Accept": MT_DOCKER_MANIFEST}, timeout=10)
    assert narrow.status_code == 200 and narrow.content == pushed["amd64"], "the rewrite"
    # The narrow answer is still a hit by digest.
    mark = upstream.mark()
    r = requests.get(f"{proxy.url}/v2/e2e/multi/manifests/{_digest(pushed['amd64'])}", timeout=10)
    assert r.status_code == 200 and r.content == pushed["amd64"]
    for accept in ([LIST_CAPABLE], [MT_DOCKER_LIST, MT_DOCKER_MANIFEST], []):
        headers = {"Accept": ", ".join(accept)} if accept else {}
        r = requests.get(url, headers=headers, timeout=10)
        assert r.status_code == 200 and r.content == pushed["list"], accept
        assert r.headers["Content-Type"] == MT_DOCKER_LIST
    log = upstream.requests_log(since=mark)
    assert [e for e in log if e.method == "GET" and e.path.endswith(_digest(pushed["amd64"]))] == []
    # The full answer is now the tag's entry: served from cache, narrow clients included
    # only where its type is acceptable to them.
    mark = upstream.mark()
    r = requests.get(url, headers={"Accept": LIST_CAPABLE}, timeout=10)
    assert r.content == pushed["list"]
    r = requests.get(url, headers={"Accept": MT_DOCKER_MANIFEST}, timeout=10)
    assert r.content == pushed["amd64"]
    gets = [e for e in upstream.requests_log(since=mark) if e.method == "GET"]
    assert len(gets) == 1, "only the narrow request went upstream again"


# -- 3. blob headers of one upstream replayed to clients of another --------------------------

HOSTILE_HEADERS = {
    "Content-Type": "text/html",
    "Content-Encoding": "gzip",
    "Content-Disposition": "attachment; filename=evil.html",
    "Refresh": "0; url=http://evil.example/",
    "Link": "<http://evil.example/>; rel=preload",
    "Set-Cookie": "session=stolen",
    "X-Evil": "1",
}
NEVER = {k.lower() for k in HOSTILE_HEADERS} - {"content-type"}


def test_hostile_upstream_headers_are_never_replayed(
    make_proxy: Callable[..., ProxyServer],
    fake: FakeUpstream,
    upstream: Registry,
    image: BuiltImage,
    backend: dict[str, str],
) -> None:
    """The first registry to fill a digest does not decide the headers others get."""
    layer = image.platform("linux/amd64").layers[-1].digest
    data = image.all_blobs()[layer].data
    fake.routes[f"/v2/evil/app/blobs/{layer}"] = Behaviour(
        body=data, headers={**HOSTILE_HEADERS, "Docker-Content-Digest": layer}
    )
    proxy = make_proxy(
        {
            **backend,
            "S3_REDIRECT": "false",
            "UPSTREAM_REGISTRY": upstream.host,
            "INSECURE_REGISTRIES": f"{upstream.host},{fake.host}",
        }
    )
    first = requests.get(f"{proxy.url}/v2/{fake.host}/evil/app/blobs/{layer}", timeout=10)
    assert first.status_code == 200 and first.content == data
    assert proxy.wait_cached([layer]) == []
    for url in (
        f"{proxy.url}/v2/{fake.host}/evil/app/blobs/{layer}",
        f"{proxy.url}/v2/e2e/app/blobs/{layer}",
    ):
        r = requests.get(url, timeout=10)
        assert r.status_code == 200 and r.content == data
        present = {k.lower() for k in r.headers}
        assert present & NEVER == set(), url
        assert r.headers["Content-Type"] == "application/octet-stream"
        assert r.headers["Docker-Content-Digest"] == layer
    assert {k.lower() for k in first.headers} & NEVER == set()
    assert first.headers["Content-Type"] == "application/octet-stream"


def test_hostile_manifest_headers_are_never_replayed(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST}).encode()
    digest = _digest(manifest)
    fake.routes["/v2/evil/app/manifests/v1"] = Behaviour(
        body=manifest,
        headers={
            **HOSTILE_HEADERS,
            "Content-Type": MT_OCI_MANIFEST,
            "Docker-Content-Digest": digest,
            "OCI-Subject": "sha256:" + "1" * 64,
        },
    )
    proxy = make_proxy({"INSECURE_REGISTRIES": fake.host})
    url = f"{proxy.url}/v2/{fake.host}/evil/app/manifests/v1"
    for _ in range(2):  # miss, then hit
        r = requests.get(url, headers={"Accept": LIST_CAPABLE}, timeout=10)
        assert r.status_code == 200 and r.content == manifest
        assert {k.lower() for k in r.headers} & NEVER == set()
        assert r.headers["Content-Type"] == MT_OCI_MANIFEST
        assert r.headers["OCI-Subject"] == "sha256:" + "1" * 64
    assert fake.count("GET", "/manifests/v1") == 1


# -- 5. ALLOWED_REGISTRIES on cache hits -------------------------------------------------------


def test_allowlist_is_checked_before_the_cache(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, image: BuiltImage
) -> None:
    proxy = make_proxy(
        {
            "UPSTREAM_REGISTRY": upstream.host,
            "INSECURE_REGISTRIES": upstream.host,
            "ALLOWED_REGISTRIES": upstream.host,
        }
    )
    layer = image.platform("linux/amd64").layers[-1].digest
    assert requests.get(f"{proxy.url}/v2/e2e/app/blobs/{layer}", timeout=10).status_code == 200
    assert proxy.wait_cached([layer]) == []
    for url, params in (
        (f"{proxy.url}/v2/other.example/e2e/app/blobs/{layer}", {}),
        (f"{proxy.url}/v2/e2e/app/blobs/{layer}", {"ns": "other.example"}),
        (f"{proxy.url}/v2/other.example/e2e/app/manifests/{image.ref_digest}", {}),
    ):
        for method in ("GET", "HEAD"):
            r = requests.request(method, url, params=params, timeout=10)
            assert r.status_code == 403, (method, url, params)
            if method == "GET":
                assert r.json()["errors"][0]["code"] == "DENIED"


# -- 7. bounded work per request ----------------------------------------------------------------


def _workers_rss(proxy: ProxyServer) -> int:
    return sum(rss_kib(pid) for pid in proxy.worker_pids())


def test_hostile_bodies_leave_memory_unchanged(make_proxy: Callable[..., ProxyServer]) -> None:
    """A chunked 300 MiB manifest claiming 100 bytes, and a 300 MiB error body: clean 502s,
    and the workers' RSS grows by less than 16 MiB."""
    with HostileUpstream() as hostile:
        hostile.answers["/v2/x/y/manifests/big"] = Answer(
            headers={
                "Content-Type": MT_OCI_MANIFEST,
                "Content-Length": "100",
                "Docker-Content-Digest": "sha256:" + "2" * 64,
            },
            size=300 * MIB,
            chunked=True,
        )
        hostile.answers["/v2/x/y/manifests/huge"] = Answer(
            headers={"Content-Type": MT_OCI_MANIFEST}, size=300 * MIB
        )
        hostile.answers["/v2/x/y/blobs/" + "sha256:" + "3" * 64] = Answer(
            status=404, headers={"Content-Type": "application/json"}, size=300 * MIB
        )
        hostile.answers["/v2/x/y/manifests/small"] = Answer(
            headers={"Content-Type": MT_OCI_MANIFEST}, size=10
        )
        proxy = make_proxy({"INSECURE_REGISTRIES": hostile.host, "WEB_CONCURRENCY": "1"})
        base = f"{proxy.url}/v2/{hostile.host}/x/y"
        for _ in range(3):  # warm up imports and pools
            requests.get(f"{base}/manifests/small", timeout=10)
        before = _workers_rss(proxy)
        for path in ("manifests/big", "manifests/huge", "blobs/sha256:" + "3" * 64):
            r = requests.get(f"{base}/{path}", timeout=60)
            assert r.status_code == 502, (path, r.status_code)
            assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
            assert len(r.content) < 4096
        grown = _workers_rss(proxy) - before
        assert grown < 16 * 1024, f"workers grew by {grown} KiB"


def test_manifest_fetch_is_abandoned_when_every_client_left(
    make_proxy: Callable[..., ProxyServer],
) -> None:
    with HostileUpstream() as hostile:
        hostile.answers["/v2/x/y/manifests/slow"] = Answer(
            headers={"Content-Type": MT_OCI_MANIFEST}, size=2 * MIB, chunk=4096, delay=0.05
        )  # 512 chunks: about 26 s
        proxy = make_proxy({"INSECURE_REGISTRIES": hostile.host})
        with pytest.raises(requests.Timeout):
            requests.get(f"{proxy.url}/v2/{hostile.host}/x/y/manifests/slow", timeout=1.5)
        deadline = time.monotonic() + 10
        while not hostile.finished and time.monotonic() < deadline:
            time.sleep(0.2)
        assert hostile.finished, f"the download went on after the client left: {proxy.log()}"
        path, sent, completed = hostile.finished[0]
        assert not completed and sent < 2 * MIB


def test_metric_labels_never_carry_a_client_chosen_registry(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, image: BuiltImage
) -> None:
    proxy = make_proxy({"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host})
    layer = image.platform("linux/amd64").layers[-1].digest
    assert requests.get(f"{proxy.url}/v2/e2e/app/blobs/{layer}", timeout=10).status_code == 200
    for n in range(3):
        requests.get(f"{proxy.url}/v2/chosen-label-{n}.invalid/x/manifests/v1", timeout=10)
    text = requests.get(f"{proxy.url}/metrics", timeout=10).text
    assert "chosen-label" not in text
    assert re.search(r'registry="other"', text)
    assert f'registry="{upstream.host}"' in text
