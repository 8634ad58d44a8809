"""Hostile and greedy clients (issue 16): unfinished headers, full slots, stalled readers,
many cold downloads at once, a full spool. Everything on 127.0.0.1, bounded in count and time;
timings are asserted only with generous margins."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.harness.fakeupstream import Behaviour, FakeUpstream
from tests.harness.hostile import rss_kib
from tests.harness.proxyproc import ProxyServer

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024
HALF_HEADER = b"GET /v2/ HTTP/1.1\r\nHost: cache\r\nUser-Agent: slow"


def _env(fake: FakeUpstream, **extra: str) -> dict[str, str]:
    return {
        "UPSTREAM_REGISTRY": fake.host,
        "INSECURE_REGISTRIES": fake.host,
        "PREFETCH_CONCURRENCY": "0",
        **extra,
    }


def _raise_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def _open_half_headers(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(HALF_HEADER)
        s.setblocking(False)
        socks.append(s)
    return socks


def _close_times(socks: list[socket.socket], start: float, limit: float) -> list[float]:
    """Seconds from start until each socket saw the server close it (inf if it did not)."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    closed: dict[int, float] = {}
    deadline = time.monotonic() + limit
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.2):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(4096)
            except (ConnectionResetError, BlockingIOError) as exc:
                data = b"" if isinstance(exc, ConnectionResetError) else b"x"
            if not data:
                closed[s.fileno()] = time.monotonic() - start
                sel.unregister(s)
    sel.close()
    return [closed.get(s.fileno(), float("inf")) for s in socks]


def _open_files(pid: int) -> list[str]:
    """The files (paths) a process holds open."""
    links = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            links.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    return sorted(link for link in links if link.startswith("/"))


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_unfinished_headers_do_not_stop_a_pull_and_are_closed(
    fake: FakeUpstream, make_proxy: Callable[..., ProxyServer]
) -> None:
    """3,000 connections that never finish their headers: a pull still works, and the server
    closes every one of them after HEADER_TIMEOUT (not before, and not never)."""
    _raise_fd_limit(8000)
    digest, data = fake.blob("e2e/app", 2 * MiB)
    proxy = make_proxy(_env(fake, HEADER_TIMEOUT="2", WORKER_CONNECTIONS="4000"))
    workers = proxy.worker_pids()
    fds_before = sum(_open_fds(pid) for pid in workers)
    start = time.monotonic()
    socks = _open_half_headers(proxy.port, 3000)
    opened = time.monotonic() - start
    try:
        r = requests.get(f"{proxy.url}/v2/e2e/app/blobs/{digest}", timeout=10)
        assert r.status_code == 200 and r.content == data
        assert requests.get(f"{proxy.url}/healthz", timeout=5).text == "ok"
        times = _close_times(socks, start, limit=30)
    finally:
        for s in socks:
            s.close()
    print(f"opened 3000 in {opened:.1f}s; closed after {min(times):.1f}..{max(times):.1f}s")
    assert max(times) < opened + 2 + 8, "a connection with unfinished headers was held"
    assert sorted(times)[len(times) // 2] >= 1.5, "closed before HEADER_TIMEOUT"
    deadline = time.monotonic() + 10
    while sum(_open_fds(pid) for pid in workers) > fds_before + 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sum(_open_fds(pid) for pid in workers) <= fds_before + 20, "descriptors not released"


def test_idle_keepalive_connection_is_closed(
    fake: FakeUpstream, make_proxy: Callable[..., ProxyServer]
) -> None:
    """After an answer, a connection that sends nothing more is closed after KEEPALIVE_TIMEOUT."""
    proxy = make_proxy(_env(fake, KEEPALIVE_TIMEOUT="1.5", WEB_CONCURRENCY="1"))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: cache\r\n\r\n")
        answer = b""
        while not answer.endswith(b"\r\n\r\nok"):
            piece = s.recv(4096)
            assert piece, answer
            answer += piece
        assert answer.startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        assert s.recv(4096) == b""
        assert 1.0 <= time.monotonic() - start <= 6.0


def _stalled_reader(port: int, path: str) -> socket.socket:
    """A client that asks for path, takes the first bytes, and then reads nothing more."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: cache\r\n\r\n".encode())
    assert s.recv(1024).startswith(b"HTTP/1.1 200")
    return s


def test_full_slots_leave_healthz_answering(
    fake: FakeUpstream, make_proxy: Callable[..., ProxyServer]
) -> None:
    """Slots full of waiting connections: the longest waiting is closed for a newcomer. Slots
    full of answers in progress: /healthz still answers, other requests get 503 + Retry-After,
    and service comes back when the slots free up."""
    digest, data = fake.blob("e2e/app", 32 * MiB)
    proxy = make_proxy(_env(fake, WEB_CONCURRENCY="1", WORKER_CONNECTIONS="8"))
    path = f"/v2/e2e/app/blobs/{digest}"
    assert requests.get(proxy.url + path, timeout=20).content == data
    assert proxy.wait_cached([digest]) == []

    waiting = _open_half_headers(proxy.port, 8)
    time.sleep(0.5)
    r = requests.get(f"{proxy.url}/v2/", headers={"Authorization": "Bearer x"}, timeout=5)
    assert r.status_code == 200
    assert _close_times(waiting[:1], time.monotonic(), limit=5)[0] < 5, "oldest not closed"
    for s in waiting:
        s.close()

    busy = [_stalled_reader(proxy.port, path) for _ in range(8)]
    try:
        time.sleep(0.5)
        start = time.monotonic()
        health = requests.get(f"{proxy.url}/healthz", timeout=5)
        assert health.status_code == 200 and health.text == "ok"
        assert time.monotonic() - start < 3
        r = requests.get(f"{proxy.url}/v2/", timeout=5)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert "UNAVAILABLE" in r.text
    finally:
        for s in busy:
            s.close()
    time.sleep(1.0)
    assert requests.get(proxy.url + path, timeout=20).content == data


def test_stalled_reader_is_cut_and_the_blob_still_commits(
    fake: FakeUpstream, make_proxy: Callable[..., ProxyServer]
) -> None:
    """A client that stops reading mid-download is cut after SEND_TIMEOUT; the download goes
    on for the flight's other reader, commits, and the next client gets a hit."""
    digest, data = fake.blob("e2e/app", 40 * MiB, chunk=MiB, delay_per_chunk=0.1)  # ~4 s
    proxy = make_proxy(_env(fake, SEND_TIMEOUT="2"))
    path = f"/v2/e2e/app/blobs/{digest}"
    stalled = _stalled_reader(proxy.port, path)
    stalled_at = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        other = pool.submit(requests.get, proxy.url + path, timeout=60)
        cut_after = float("inf")
        while time.monotonic() - stalled_at < 20:
            if "SEND_TIMEOUT" in proxy.log():  # the worker's line for the cut
                cut_after = time.monotonic() - stalled_at
                break
            time.sleep(0.1)
        r = other.result()
    received = 0
    try:
        while piece := stalled.recv(MiB):
            received += len(piece)
    except ConnectionResetError:
        pass
    stalled.close()
    print(f"stalled reader cut after {cut_after:.1f}s, {received} bytes buffered")
    assert 2.0 <= cut_after < 15, "a stalled reader was not cut after SEND_TIMEOUT"
    assert received < len(data)
    assert r.status_code == 200 and r.content == data
    assert proxy.wait_cached([digest], timeout=10) == []
    r = requests.get(proxy.url + path, timeout=20)
    assert r.status_code == 200 and r.content == data
    assert fake.count("GET", digest) == 1


def _distinct_blob(index: int, size: int) -> tuple[bytes, Callable[[], Iterator[bytes]], str]:
    """A blob generated as it is sent: a 64 KiB random block of its own, repeated."""
    block = hashlib.sha256(b"%d" % index).digest() * 2048
    count = size // len(block)

    def stream() -> Iterator[bytes]:
        for _ in range(count):
            yield block

    hasher = hashlib.sha256()
    for piece in stream():
        hasher.update(piece)
    return block, stream, "sha256:" + hasher.hexdigest()


class _RssPeak:
    """The largest summed RSS of the proxy's workers, sampled every 50 ms."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(rss_kib(pid) for pid in self.pids))
            time.sleep(0.05)

    def __enter__(self) -> _RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_hundred_cold_blobs_at_once(
    fake: FakeUpstream, make_proxy: Callable[..., ProxyServer], tmp_path: Path
) -> None:
    """100 distinct cold 4 MiB blobs requested at once: all intact and committed, worker RSS
    stays under a stated bound, the spool empties and descriptors are released."""
    size, count = 4 * MiB, 100
    blobs = []
    for i in range(count):
        _, stream, digest = _distinct_blob(i, size)
        fake.routes[f"/v2/e2e/many/blobs/{digest}"] = Behaviour(
            stream=stream, stream_length=size, headers={"Content-Length": str(size)}
        )
        blobs.append(digest)
    proxy = make_proxy(_env(fake, SPOOL_DIR=str(tmp_path / "spool")))
    workers = proxy.worker_pids()
    rss_before = sum(rss_kib(pid) for pid in workers)
    fds_before = sum(_open_fds(pid) for pid in workers)

    def pull(digest: str) -> bool:
        with requests.get(f"{proxy.url}/v2/e2e/many/blobs/{digest}", stream=True, timeout=60) as r:
            hasher = hashlib.sha256()
            for piece in r.iter_content(MiB):
                hasher.update(piece)
            return r.status_code == 200 and "sha256:" + hasher.hexdigest() == digest

    with _RssPeak(workers) as rss, concurrent.futures.ThreadPoolExecutor(count) as pool:
        results = list(pool.map(pull, blobs))
    assert all(results), f"{results.count(False)} blobs arrived damaged"
    assert proxy.wait_cached(blobs, timeout=30) == []
    assert [p.name for p in (tmp_path / "spool").iterdir() if "." in p.name[40:]] == []
    grown = (rss.peak - rss_before) / 1024
    print(f"RSS of the workers: {rss_before / 1024:.0f} MiB before, peak {rss.peak / 1024:.0f}")
    # The bound: flight.RECENT_BUDGET (32 MiB) per worker for chunks kept for local readers,
    # plus buffers per download in progress; 400 MiB of blobs pass through at once.
    assert grown < 200, f"workers grew {grown:.0f} MiB for 100 concurrent cold blobs"

    def held() -> list[str]:  # spool and store files (the metrics files stay open)
        return [
            f
            for pid in workers
            for f in _open_files(pid)
            if f.startswith(str(tmp_path)) and not f.endswith(".log")
        ]

    deadline = time.monotonic() + 10
    while held() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert held() == []
    # Sockets left: at most the upstream keep-alive pool (64 per worker, app/upstream.py).
    assert sum(_open_fds(pid) for pid in workers) <= fds_before + 64 * len(workers)


def test_full_spool_streams_a_miss_through(
    fake: FakeUpstream, make_proxy: Callable[..., ProxyServer]
) -> None:
    """Past SPOOL_MAX_BYTES a new miss is streamed through uncached (intact), not refused;
    once the spool drains, misses are cached again."""
    slow, slow_data = fake.blob("e2e/app", 24 * MiB, chunk=MiB, delay_per_chunk=0.15)  # ~3.6 s
    other, other_data = fake.blob("e2e/app", 6 * MiB)
    proxy = make_proxy(_env(fake, SPOOL_MAX_BYTES="8Mi"))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(requests.get, f"{proxy.url}/v2/e2e/app/blobs/{slow}", timeout=60)
        time.sleep(1.8)  # about 12 MiB of the slow blob are spooled by now
        r = requests.get(f"{proxy.url}/v2/e2e/app/blobs/{other}", timeout=30)
        assert r.status_code == 200 and r.content == other_data
        assert not proxy.is_cached(other), "streamed through, not spooled"
        assert first.result().content == slow_data
    assert proxy.wait_cached([slow]) == []
    r = requests.get(f"{proxy.url}/v2/e2e/app/blobs/{other}", timeout=30)
    assert r.content == other_data
    assert proxy.wait_cached([other]) == [], "the spool had room again: cached"
    metrics = requests.get(f"{proxy.url}/metrics", timeout=5).text
    assert 'oci_cache_aborts_total{kind="blob",reason="spool full"} 1.0' in metrics


def test_slow_readers_do_not_slow_others(
    fake: FakeUpstream, make_proxy: Callable[..., ProxyServer]
) -> None:
    """500 clients holding a cached blob's answer without reading it: other clients' hits
    (blob, manifest-sized, /healthz) still come back at once."""
    _raise_fd_limit(4000)
    big, _ = fake.blob("e2e/app", 16 * MiB)
    small, small_data = fake.blob("e2e/app", 256 * 1024)
    proxy = make_proxy(_env(fake))
    for digest in (big, small):
        requests.get(f"{proxy.url}/v2/e2e/app/blobs/{digest}", timeout=20).raise_for_status()
    assert proxy.wait_cached([big, small]) == []
    slow = [_stalled_reader(proxy.port, f"/v2/e2e/app/blobs/{big}") for _ in range(500)]
    try:
        times = []
        with requests.Session() as session:
            for _ in range(20):
                start = time.monotonic()
                r = session.get(f"{proxy.url}/v2/e2e/app/blobs/{small}", timeout=10)
                assert r.status_code == 200 and r.content == small_data
                assert session.get(f"{proxy.url}/healthz", timeout=10).text == "ok"
                times.append(time.monotonic() - start)
        print(f"hits beside 500 stalled readers: median {sorted(times)[10] * 1000:.0f} ms")
        assert max(times) < 2.0, times
    finally:
        for s in slow:
            s.close()
