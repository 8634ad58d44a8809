"""Hours of mixed traffic (issue 16): does anything grow or leak?

Starts a fake upstream and the proxy (gunicorn, 2 workers, filesystem backend) on 127.0.0.1
and drives a mix for --minutes (default 30): cache hits, cold misses (new blobs every time),
tag and digest manifests, token requests, slow clients reading a blob at 512 KiB/s, clients
that stop reading, and upstream errors (500s and truncated bodies). Every minute it prints,
per process, RSS and open descriptors, the worker's connection figures from /metrics
(`oci_connections`: connections = greenlets serving clients; `oci_transfers_in_flight`:
fetcher greenlets), error counts and p50/p99 latency of the quick requests.

    .venv/bin/python bench/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import re
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # app and tests.harness
from tests.harness.fakeupstream import Behaviour, FakeUpstream  # noqa: E402
from tests.harness.proxyproc import ProxyServer  # noqa: E402

MiB = 1024 * 1024
MT = "application/vnd.oci.image.manifest.v1+json"
REPO = "soak/app"
COLD_KEPT = 64


class Upstream:
    """The fake registry: fixed blobs and manifests, new blobs on demand, failing paths."""

    def __init__(self) -> None:
        self.fake = FakeUpstream()
        self.hot = [self._blob(os.urandom(256 * 1024)) for _ in range(8)]
        self.big = self._blob(os.urandom(8 * MiB))
        manifest = json.dumps({"schemaVersion": 2, "mediaType": MT, "layers": []}).encode()
        self.manifest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        headers = {"Content-Type": MT, "Docker-Content-Digest": self.manifest}
        for ref in (self.manifest, "v1"):
            self.fake.routes[f"/v2/{REPO}/manifests/{ref}"] = Behaviour(
                body=manifest, headers=headers
            )
        self.cold = 0
        self._cold_routes: collections.deque[str] = collections.deque()
        self.fake.responder = self._respond

    def _blob(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.fake.routes[f"/v2/{REPO}/blobs/{digest}"] = Behaviour(body=data)
        return digest

    def new_cold(self) -> str:
        """A digest upstream will serve (1 MiB, generated from the digest's seed).

        Only the last COLD_KEPT stay routed: the driver itself must not grow for the whole
        run (a first 30-minute run grew this process to 23 GiB and starved the machine).
        """
        self.cold += 1
        seed = f"cold-{self.cold}-{time.time()}".encode()
        data = hashlib.sha256(seed).digest() * (MiB // 32)
        digest = self._blob(data)
        self._cold_routes.append(f"/v2/{REPO}/blobs/{digest}")
        while len(self._cold_routes) > COLD_KEPT:
            self.fake.routes.pop(self._cold_routes.popleft(), None)
        return digest

    def forget_requests(self) -> None:
        """Drop the fake upstream's request records (kept for tests, unbounded here)."""
        del self.fake.requests[:]
        del self.fake.received[:]

    def _respond(self, method: str, path: str, headers: dict[str, str]) -> Behaviour | None:
        if "/err500/" in path:
            return Behaviour(status=500, body=b'{"errors":[]}')
        if "/truncated/" in path:
            return Behaviour(body=b"x" * MiB, truncate_at=100_000)
        return None


def driver_rss_mib() -> int:
    """This load driver's own RSS: it must stay flat too, or the figures above mean little."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return -1


class Stats:
    """Latencies and outcomes per minute, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.counts: collections.Counter[str] = collections.Counter()

    def record(self, kind: str, seconds: float | None, ok: bool) -> None:
        with self.lock:
            self.counts[f"{kind} {'ok' if ok else 'FAIL'}"] += 1
            if seconds is not None and ok:
                self.latencies.append(seconds)

    def take(self) -> tuple[list[float], collections.Counter[str]]:
        with self.lock:
            taken = self.latencies, self.counts
            self.latencies, self.counts = [], collections.Counter()
            return taken


def client(proxy: ProxyServer, up: Upstream, stats: Stats, stop: threading.Event) -> None:
    """One client thread: a weighted mix of quick requests."""
    session = requests.Session()
    base = f"{proxy.url}/v2/{REPO}"
    ops = ["hit"] * 6 + ["manifest", "tag", "token", "miss", "error"]
    while not stop.is_set():
        op = random.choice(ops)
        start = time.perf_counter()
        try:
            if op == "hit":
                r = session.get(f"{base}/blobs/{random.choice(up.hot)}", timeout=30)
                ok = r.status_code == 200
            elif op == "manifest":
                r = session.get(f"{base}/manifests/{up.manifest}", headers={"Accept": MT})
                ok = r.status_code == 200
            elif op == "tag":
                r = session.get(f"{base}/manifests/v1", headers={"Accept": MT}, timeout=30)
                ok = r.status_code == 200
            elif op == "token":
                r = session.get(f"{proxy.url}/v2/token?scope=repository:{REPO}:pull", timeout=30)
                ok = r.status_code == 200 and "token" in r.json()
            elif op == "miss":
                digest = up.new_cold()
                r = session.get(f"{base}/blobs/{digest}", timeout=60)
                ok = r.status_code == 200 and hashlib.sha256(r.content).hexdigest() in digest
            else:
                bad = "err500" if random.random() < 0.5 else "truncated"
                digest = "sha256:" + hashlib.sha256(os.urandom(8)).hexdigest()
                try:
                    r = session.get(f"{proxy.url}/v2/soak/{bad}/blobs/{digest}", timeout=30)
                    ok = r.status_code >= 500 or len(r.content) < MiB  # an error, never a 200
                    ok = ok and r.status_code != 200
                except requests.RequestException:
                    ok = True  # a cut response is the right answer to a truncated upstream
                    session = requests.Session()
            stats.record(op, time.perf_counter() - start, ok)
        except requests.RequestException:
            stats.record(op, None, False)
            session = requests.Session()


def slow_client(proxy: ProxyServer, up: Upstream, stats: Stats, stop: threading.Event) -> None:
    """Reads the 8 MiB blob at about 512 KiB/s; every other one stops reading half-way."""
    path = f"/v2/{REPO}/blobs/{up.big}"
    stall = False
    while not stop.is_set():
        stall = not stall
        try:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=120) as s:
                request = f"GET {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n"
                s.sendall(request.encode())
                got = 0
                while got < 8 * MiB and not stop.is_set():
                    piece = s.recv(64 * 1024)
                    if not piece:
                        break
                    got += len(piece)
                    if stall and got > 4 * MiB:
                        stop.wait(5)  # holds its slot without reading, then hangs up
                        break
                    time.sleep(0.125)
            stats.record("slow" + (" stalled" if stall else ""), None, True)
        except OSError:
            stats.record("slow", None, False)


def proc_figures(proxy: ProxyServer) -> str:
    """RSS (MiB) and open descriptors of the master and each worker."""
    assert proxy.proc is not None
    cells = []
    for name, pid in [("master", proxy.proc.pid)] + [
        (f"w{i}", p) for i, p in enumerate(proxy.worker_pids())
    ]:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            cells.append(f"{name} {rss:.0f}M/{fds}fd")
        except (OSError, AttributeError):
            cells.append(f"{name} gone")
    return " ".join(cells)


def gauges(proxy: ProxyServer) -> str:
    """Connections and transfers in flight, from /metrics."""
    try:
        text = requests.get(f"{proxy.url}/metrics", timeout=10).text
    except requests.RequestException:
        return "metrics unavailable"
    found = {}
    for m in re.finditer(r'^oci_connections\{state="([^"]+)"\} ([\d.e+]+)$', text, re.M):
        found[m.group(1)] = float(m.group(2))
    flights = re.search(r"^oci_transfers_in_flight ([\d.e+]+)$", text, re.M)
    return (
        f"conns {found.get('open', 0):.0f} (waiting {found.get('waiting', 0):.0f}, "
        f"evicted {found.get('evicted', 0):.0f}, send-timeouts {found.get('send timeout', 0):.0f})"
        f" flights {float(flights.group(1)) if flights else 0:.0f}"
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--slow", type=int, default=6)
    args = parser.parse_args()
    up = Upstream()
    up.fake.start()
    work = Path(tempfile.mkdtemp(prefix="oci-soak-"))
    env = {
        "UPSTREAM_REGISTRY": up.fake.host,
        "INSECURE_REGISTRIES": up.fake.host,
        "LOG_LEVEL": "warn",
        "FS_MAX_BYTES": "256Mi",  # misses never stop: eviction keeps the disk bounded
        "SEND_TIMEOUT": "3",
        "PREFETCH_CONCURRENCY": "0",
    }
    proxy = ProxyServer(work, env).start()
    stats, stop = Stats(), threading.Event()
    threads = [
        threading.Thread(target=client, args=(proxy, up, stats, stop), daemon=True)
        for _ in range(args.clients)
    ] + [
        threading.Thread(target=slow_client, args=(proxy, up, stats, stop), daemon=True)
        for _ in range(args.slow)
    ]
    for t in threads:
        t.start()
    print(f"soak: {args.minutes:g} min, {args.clients} clients, {args.slow} slow clients, {work}")
    start = time.monotonic()
    minute = 0
    try:
        while time.monotonic() - start < args.minutes * 60:
            minute += 1
            time.sleep(max(0.0, start + minute * 60 - time.monotonic()))
            latencies, counts = stats.take()
            up.forget_requests()
            fails = sum(n for k, n in counts.items() if k.endswith("FAIL"))
            print(
                f"min {minute:3d} | {proc_figures(proxy)} | {gauges(proxy)} | "
                f"{sum(counts.values())} req, {fails} errors | "
                f"p50 {pct(latencies, 0.5):.1f} ms p99 {pct(latencies, 0.99):.1f} ms | "
                f"driver {driver_rss_mib()}M",
                flush=True,
            )
            if fails:
                print("      failures:", {k: n for k, n in counts.items() if "FAIL" in k})
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
        proxy.stop()
        up.fake.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
