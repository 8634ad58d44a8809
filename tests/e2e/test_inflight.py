"""Range and HEAD for a blob that is being downloaded: answered from the flight (issue 12).

A slow upstream keeps one blob in flight while other clients ask for a span of it or its
headers; upstream sees one GET in total, and a flight that fails never yields a short 206.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import requests

from tests.harness.fakeupstream import Behaviour, FakeUpstream, bearer_only
from tests.harness.proxyproc import ProxyServer

pytestmark = pytest.mark.e2e

SIZE = 4 * 1024 * 1024


def _slow_blob(fake: FakeUpstream, repo: str, **behaviour: object) -> tuple[str, bytes]:
    """A 4 MiB blob upstream sends in 64 KiB chunks over about 2.5 s."""
    digest, data = fake.blob(repo, SIZE, chunk=64 * 1024, delay_per_chunk=0.04, **behaviour)
    return digest, data


def _start_full_get(url: str, headers: dict[str, str] | None = None) -> dict[str, object]:
    """A client pulling the whole blob in a thread; returns where its answer will land."""
    out: dict[str, object] = {}

    def pull() -> None:
        try:
            r = requests.get(url, headers=headers or {}, timeout=60)
            out["status"], out["body"] = r.status_code, r.content
        except requests.RequestException as exc:
            out["error"] = exc

    thread = threading.Thread(target=pull)
    thread.start()
    out["thread"] = thread
    return out


def _wait_for_upstream_get(fake: FakeUpstream, digest: str) -> None:
    deadline = time.monotonic() + 10
    while fake.count("GET", digest) == 0:
        assert time.monotonic() < deadline, "the full GET never reached upstream"
        time.sleep(0.02)
    time.sleep(0.2)  # the fetcher has published the head by now


def test_range_and_head_on_an_in_flight_blob_make_no_second_upstream_request(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    digest, data = _slow_blob(fake, "inflight/app")
    proxy = make_proxy({"INSECURE_REGISTRIES": fake.host})
    url = f"{proxy.url}/v2/{fake.host}/inflight/app/blobs/{digest}"
    full = _start_full_get(url)
    _wait_for_upstream_get(fake, digest)

    head = requests.head(url, timeout=30)
    assert head.status_code == 200
    assert head.headers["Content-Length"] == str(SIZE)
    assert head.headers["Docker-Content-Digest"] == digest

    # a span not downloaded yet (the end), one at the start, and a suffix range
    for asked, start, end in [
        ("bytes=3000000-3100000", 3000000, 3100000),
        ("bytes=0-99", 0, 99),
        ("bytes=-100", SIZE - 100, SIZE - 1),
    ]:
        r = requests.get(url, headers={"Range": asked}, timeout=30)
        assert r.status_code == 206, asked
        assert r.headers["Content-Range"] == f"bytes {start}-{end}/{SIZE}"
        assert r.content == data[start : end + 1], asked
    beyond = requests.get(url, headers={"Range": f"bytes={SIZE}-"}, timeout=30)
    assert beyond.status_code == 416
    assert beyond.headers["Content-Range"] == f"bytes */{SIZE}"

    full["thread"].join(timeout=60)  # type: ignore[attr-defined]
    assert full.get("status") == 200 and full.get("body") == data
    assert fake.count("GET", digest) == 1, "every request shared the one download"
    assert fake.count("HEAD", digest) == 0
    assert proxy.wait_cached([digest]) == []


def test_a_range_of_a_flight_that_fails_is_cut_never_a_short_206(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    """Upstream stops after 2 MiB: a span across that point is cut after its first bytes, a
    span beyond it is a 502 error document; neither is ever a complete 206."""
    digest, _ = _slow_blob(fake, "inflight/cut", truncate_at=2 * 1024 * 1024)
    proxy = make_proxy({"INSECURE_REGISTRIES": fake.host})
    url = f"{proxy.url}/v2/{fake.host}/inflight/cut/blobs/{digest}"
    full = _start_full_get(url)
    _wait_for_upstream_get(fake, digest)
    across = _start_full_get(url, {"Range": "bytes=1900000-2200000"})
    beyond = requests.get(url, headers={"Range": "bytes=3000000-3100000"}, timeout=30)
    assert beyond.status_code == 502
    assert beyond.json()["errors"][0]["code"] == "UNAVAILABLE"
    for client in (full, across):
        client["thread"].join(timeout=60)  # type: ignore[attr-defined]
        assert isinstance(client.get("error"), requests.RequestException), client.get("status")
    assert fake.count("GET", digest) == 1
    assert not proxy.is_cached(digest)
    log = proxy.log()
    assert log.count("response cut short") == 2, log[-3000:]  # the full GET and the span
    assert "Traceback" not in log, "one line per cut client, not a traceback"


def test_authenticated_range_needs_the_clients_own_access(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    """Another client's credentials fetch the blob: a Range without them gets upstream's 401,
    not bytes from the flight (§15); with them, a 206 from the flight."""
    digest, data = _slow_blob(fake, "inflight/private")
    path = f"/v2/inflight/private/blobs/{digest}"
    fake.responder = bearer_only(path, "good")
    proxy = make_proxy(
        {
            "UPSTREAM_REGISTRY": fake.host,  # the registry credentials are forwarded to
            "INSECURE_REGISTRIES": fake.host,
            "PROXY_MODE": "authenticated",
        }
    )
    url = f"{proxy.url}{path}"
    full = _start_full_get(url, {"Authorization": "Bearer good"})
    _wait_for_upstream_get(fake, digest)

    stranger = requests.get(url, headers={"Range": "bytes=0-99"}, timeout=30)
    assert stranger.status_code == 401
    assert data[:100] not in stranger.content
    owner = requests.get(
        url, headers={"Range": "bytes=0-99", "Authorization": "Bearer good"}, timeout=30
    )
    assert owner.status_code == 206 and owner.content == data[:100]

    full["thread"].join(timeout=60)  # type: ignore[attr-defined]
    assert full.get("status") == 200 and full.get("body") == data
    gets_with_access = [
        m
        for m, p, h in fake.received
        if m == "GET" and p == path and h.get("Authorization") == "Bearer good"
    ]
    assert len(gets_with_access) == 1, "the entitled Range read the flight"


def test_another_registrys_flight_never_answers_a_range_or_head(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    """Attack: a registry anyone can run streams other bytes under a digest a victim pulls
    from its own registry. While that download runs, the victim's Range and HEAD through
    the real registry must be answered by the real registry, not by the other flight."""
    digest, good = fake.blob("lib/app", 1024 * 1024)
    with FakeUpstream() as evil:
        bad = b"x" * SIZE  # not the digest's bytes, and another length
        evil.routes[f"/v2/lib/app/blobs/{digest}"] = Behaviour(
            body=bad, chunk=64 * 1024, delay_per_chunk=0.04
        )
        proxy = make_proxy({"INSECURE_REGISTRIES": f"{fake.host},{evil.host}"})
        attacker = _start_full_get(f"{proxy.url}/v2/{evil.host}/lib/app/blobs/{digest}")
        _wait_for_upstream_get(evil, digest)
        url = f"{proxy.url}/v2/{fake.host}/lib/app/blobs/{digest}"
        head = requests.head(url, timeout=30)
        assert head.status_code == 200 and head.headers["Content-Length"] == str(len(good))
        r = requests.get(url, headers={"Range": "bytes=0-99"}, timeout=30)
        assert r.status_code in (200, 206)  # the fake registry ignores Range: its whole blob
        assert r.content[:100] == good[:100]
        assert b"x" * 100 not in r.content
        assert fake.count("HEAD", digest) == 1 and fake.count("GET", digest) == 1
        attacker["thread"].join(timeout=60)  # type: ignore[attr-defined]
    assert not proxy.is_cached(digest), "the other bytes never match the digest"
