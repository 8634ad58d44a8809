"""Single flight across the gunicorn workers of one instance (app/flight.py)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

import pytest
import requests

from tests.harness.fakeupstream import Behaviour, FakeUpstream
from tests.harness.proxyproc import ProxyServer

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024


def _blob(fake: FakeUpstream, size: int, **behaviour: object) -> tuple[str, bytes]:
    return fake.blob("co/repo", size, **behaviour)


def _proxy(make_proxy: Callable[..., ProxyServer], fake: FakeUpstream) -> ProxyServer:
    return make_proxy(
        {"UPSTREAM_REGISTRY": fake.host, "INSECURE_REGISTRIES": fake.host, "WEB_CONCURRENCY": "2"}
    )


def _get_many(url: str, count: int) -> list[tuple[int, bytes] | Exception]:
    results: list[tuple[int, bytes] | Exception] = [Exception("not run")] * count

    def one(i: int) -> None:
        try:
            with requests.get(url, timeout=60) as r:
                results[i] = (r.status_code, r.content)
        except requests.RequestException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    return results


def test_twenty_concurrent_cold_gets_make_one_upstream_request(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    digest, data = _blob(fake, 8 * MiB, chunk=256 * 1024, delay_per_chunk=0.02)
    proxy = _proxy(make_proxy, fake)
    results = _get_many(f"{proxy.url}/v2/co/repo/blobs/{digest}", 20)
    assert all(r == (200, data) for r in results), [
        r if isinstance(r, Exception) else (r[0], len(r[1])) for r in results
    ]
    assert fake.count("GET", digest) == 1
    assert proxy.wait_cached([digest]) == []


def test_late_joiner_gets_what_has_arrived_at_once(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    digest, data = _blob(fake, 4 * MiB, chunk=256 * 1024, delay_per_chunk=0.15)
    proxy = _proxy(make_proxy, fake)
    url = f"{proxy.url}/v2/co/repo/blobs/{digest}"
    first = threading.Thread(target=lambda: requests.get(url, timeout=60).content)
    first.start()
    time.sleep(1.2)  # about half the body has arrived upstream-side
    started = time.monotonic()
    with requests.get(url, stream=True, timeout=60) as r:
        head = r.raw.read(MiB)
        early = time.monotonic() - started
        rest = r.raw.read()
    first.join(timeout=30)
    assert head + rest == data
    assert early < 0.5, f"a late joiner waited {early:.2f}s for bytes already received"
    assert fake.count("GET", digest) == 1


def test_leader_failure_fails_every_follower_cleanly_and_next_request_starts_afresh(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    digest, data = _blob(fake, 4 * MiB, chunk=256 * 1024, delay_per_chunk=0.05, truncate_at=3 * MiB)
    proxy = _proxy(make_proxy, fake)
    url = f"{proxy.url}/v2/co/repo/blobs/{digest}"
    results = _get_many(url, 6)
    assert all(isinstance(r, requests.RequestException) for r in results), [
        r if isinstance(r, Exception) else (r[0], len(r[1])) for r in results
    ]
    assert fake.count("GET", digest) == 1
    assert not proxy.is_cached(digest)
    fake.routes[f"/v2/co/repo/blobs/{digest}"] = Behaviour(body=data)
    with requests.get(url, timeout=30) as r:
        assert r.status_code == 200 and r.content == data
    assert fake.count("GET", digest) == 2


def test_upstream_errors_reach_every_follower(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    digest = "sha256:" + "b" * 64
    fake.routes[f"/v2/co/repo/blobs/{digest}"] = Behaviour(
        status=404, body=b'{"errors":[{"code":"BLOB_UNKNOWN"}]}', stall_before_headers=0.5
    )
    proxy = _proxy(make_proxy, fake)
    results = _get_many(f"{proxy.url}/v2/co/repo/blobs/{digest}", 5)
    assert all(r == (404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}') for r in results), results


def test_concurrent_cold_manifest_requests_make_one_upstream_request(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    body = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    fake.routes["/v2/co/repo/manifests/v1"] = Behaviour(
        body=body,
        stall_before_headers=0.5,
        headers={
            "Content-Type": "application/vnd.oci.image.manifest.v1+json",
            "Docker-Content-Digest": digest,
        },
    )
    proxy = _proxy(make_proxy, fake)
    results = _get_many(f"{proxy.url}/v2/co/repo/manifests/v1", 10)
    assert all(r == (200, body) for r in results), results
    assert fake.count("GET", "/manifests/v1") == 1
    with requests.get(f"{proxy.url}/v2/co/repo/manifests/{digest}", timeout=10) as r:
        assert r.status_code == 200 and r.content == body
    assert fake.count("GET", f"/manifests/{digest}") == 0, "stored under its digest too"


def test_concurrent_narrow_accept_tag_requests_all_succeed(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    """A narrow Accept's answer is never the tag's entry (SPEC §15), so every such request
    is a miss through a very short flight; a client that keeps arriving as a flight ends
    is answered from upstream on its own, never with a 502."""
    digest, data = fake.manifest("co/app", "v1", "narrow")
    proxy = make_proxy({"INSECURE_REGISTRIES": fake.host})
    url = f"{proxy.url}/v2/{fake.host}/co/app/manifests/v1"
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    answers: list[tuple[int, bytes]] = []

    def client() -> None:
        with requests.Session() as session:
            for _ in range(40):
                r = session.get(url, headers=accept, timeout=30)
                answers.append((r.status_code, r.content))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(answers) == 320
    assert [status for status, _ in answers if status != 200] == []
    assert all(body == data for _, body in answers)
