"""FS_MAX_BYTES and `gc` on the real server: LRU eviction, never under a reader (SPEC §13)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.harness.fakeupstream import Behaviour, FakeUpstream
from tests.harness.proxyproc import REPO_ROOT, ProxyServer
from tests.harness.scrape import metric

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


def _blob(fake: FakeUpstream, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    fake.routes[f"/v2/ev/repo/blobs/{digest}"] = Behaviour(
        body=data, headers={"Docker-Content-Digest": digest}
    )
    return digest, data


def _pull(proxy: ProxyServer, digest: str, data: bytes) -> None:
    with requests.get(f"{proxy.url}/v2/ev/repo/blobs/{digest}", timeout=60) as r:
        assert r.status_code == 200 and r.content == data


def _proxy(make_proxy: Callable[..., ProxyServer], fake: FakeUpstream, **env: str) -> ProxyServer:
    return make_proxy({"UPSTREAM_REGISTRY": fake.host, "INSECURE_REGISTRIES": fake.host, **env})


def _gc(proxy: ProxyServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in proxy.env.items() if k != "FS_MAX_BYTES"}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "gc", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_filling_past_the_bound_evicts_the_least_recently_used(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    a, b, c, d = (_blob(fake, MiB) for _ in range(4))
    proxy = _proxy(make_proxy, fake, FS_MAX_BYTES=str(int(3.5 * MiB)))
    for digest, data in (a, b, c):
        _pull(proxy, digest, data)
        assert proxy.wait_cached([digest]) == []
        time.sleep(0.05)
    _pull(proxy, *a)  # a hit: a is now the most recently used of the three
    time.sleep(3)  # the workers write remembered hits every 2 s
    assert [proxy.is_cached(x[0]) for x in (a, b, c)] == [True, True, True]
    _pull(proxy, *d)  # past 3.5 MiB: evict down to 3.15 MiB, i.e. the one LRU object
    deadline = time.monotonic() + 20
    while proxy.is_cached(b[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not proxy.is_cached(b[0]), "b was the least recently used"
    assert not proxy.cached_blob(b[0]).exists(), "data and sidecar both go"
    assert [proxy.is_cached(x[0]) for x in (a, c, d)] == [True, True, True]
    assert metric(proxy, "oci_cache_evicted_objects_total") == 1
    assert 3 * MiB <= metric(proxy, "oci_fs_cache_bytes") <= 3.15 * MiB
    _pull(proxy, *b)
    assert fake.count("GET", b[0]) == 2, "an evicted object is fetched again"
    assert fake.count("GET", a[0]) == 1


def test_a_download_in_progress_survives_gc_choosing_its_object(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    big, small = _blob(fake, 48 * MiB), _blob(fake, MiB)
    proxy = _proxy(make_proxy, fake)
    for digest, data in (big, small):
        _pull(proxy, digest, data)
    assert proxy.wait_cached([big[0], small[0]]) == []

    dry = _gc(proxy, "--max-bytes", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would evict 2 objects" in dry.stdout and proxy.is_cached(big[0])

    hasher = hashlib.sha256()
    with requests.get(f"{proxy.url}/v2/ev/repo/blobs/{big[0]}", stream=True, timeout=60) as r:
        assert r.status_code == 200
        hasher.update(r.raw.read(MiB))  # the hit is being served from the cached file
        swept = _gc(proxy, "--max-bytes", "1")
        assert swept.returncode == 0, swept.stderr
        assert "evicted 1 objects" in swept.stdout and "1 in use kept" in swept.stdout
        assert proxy.is_cached(big[0]) and not proxy.is_cached(small[0])
        for chunk in r.iter_content(MiB):
            hasher.update(chunk)
    assert "sha256:" + hasher.hexdigest() == big[0], "the download completed correctly"
    assert fake.count("GET", big[0]) == 1

    deadline = time.monotonic() + 10  # the server closes the file just after the last byte
    while True:
        again = _gc(proxy, "--max-bytes", "1")
        if "evicted 1 objects" in again.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "evicted 1 objects" in again.stdout, again.stdout
    assert not proxy.is_cached(big[0])


def test_gc_needs_a_bound(make_proxy: Callable[..., ProxyServer], fake: FakeUpstream) -> None:
    proxy = _proxy(make_proxy, fake)
    result = _gc(proxy)
    assert result.returncode == 1 and "FS_MAX_BYTES" in result.stderr
