#!/usr/bin/env python3
"""Side-by-side benchmark of oci-pull-through (X) against U, P and N, all on loopback.

U: the upstream docker-registry, directly.   P: the same binary as a pull-through cache.
N: nginx serving X's cached blob file with sendfile (the practical limit for a hit).
Every figure is a median of alternating repetitions, reported as a ratio. See bench/README.md.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repository root: app and tests.harness

from tests.harness import Registry, build_image  # noqa: E402
from tests.harness.containerd import Containerd  # noqa: E402
from tests.harness.ports import free_port  # noqa: E402
from tests.harness.proxyproc import ProxyServer  # noqa: E402
from tests.harness.seaweed import SeaweedFS  # noqa: E402

MiB = 1024 * 1024
# Every index and image manifest type, as skopeo, containerd and Docker send: only such a
# request's answer becomes a tag's cache entry (SPEC §15), so the tag rows measure hits.
ACCEPT = (
    "application/vnd.oci.image.index.v1+json,"
    "application/vnd.oci.image.manifest.v1+json,"
    "application/vnd.docker.distribution.manifest.list.v2+json,"
    "application/vnd.docker.distribution.manifest.v2+json"
)


@dataclass
class Sizes:
    big: int
    mid: int
    reps: int
    wrk_seconds: int
    huge: int  # for the RSS check; 0 skips it


QUICK = Sizes(big=64 * MiB, mid=16 * MiB, reps=3, wrk_seconds=4, huge=0)
FULL = Sizes(big=256 * MiB, mid=64 * MiB, reps=5, wrk_seconds=20, huge=1024 * MiB)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def curl(url: str, expect_size: int, headers: tuple[str, ...] = ()) -> float:
    """One GET with curl (redirects followed); returns seconds, checking status and size."""
    args = [
        "curl",
        "-s",
        "-L",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download} %{time_total}",
    ]
    for header in headers:
        args += ["-H", header]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=600).stdout.split()
    status, size, seconds = int(out[0]), int(out[1]), float(out[2])
    if status != 200 or size != expect_size:
        raise RuntimeError(f"GET {url}: status {status}, {size} bytes (wanted {expect_size})")
    return seconds


def parallel(url: str, count: int, expect_size: int) -> float:
    """count concurrent curls; returns the wall time until the last finished."""
    start = time.perf_counter()
    errors: list[Exception] = []

    def one() -> None:
        try:
            curl(url, expect_size)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes; PSS shares each page among the processes mapping
    it, so the forked workers' common pages are not counted twice."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    rss = re.search(r"^Rss:\s+(\d+) kB", rollup, re.M)
    pss = re.search(r"^Pss:\s+(\d+) kB", rollup, re.M)
    return (int(rss.group(1)) * 1024 if rss else 0, int(pss.group(1)) * 1024 if pss else 0)


class RssSampler:
    """Peaks of the summed RSS and PSS of a process tree, sampled every 20 ms."""

    def __init__(self, root_pid: int | Callable[[], int]) -> None:
        self.root = root_pid  # a callable for a server that restarts (P after clear_p)
        self.peak = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def processes(self) -> list[tuple[int, int, int]]:
        """(pid, RSS, PSS) of the root process and its children, now."""
        root = self.root() if callable(self.root) else self.root
        pids = [root]
        children = subprocess.run(["pgrep", "-P", str(root)], capture_output=True, text=True)
        pids += [int(p) for p in children.stdout.split()]
        return [(pid, *_memory(pid)) for pid in pids]

    def current(self) -> int:
        """Resident bytes of the root process and its children, now."""
        return sum(rss for _, rss, _ in self.processes())

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.processes()
            self.peak = max(self.peak, sum(rss for _, rss, _ in now))
            self.peak_pss = max(self.peak_pss, sum(pss for _, _, pss in now))
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def per_process(sampler: RssSampler) -> str:
    """RSS/PSS in MiB of each process of a tree, the root first."""
    return " ".join(f"{rss / MiB:.0f}/{pss / MiB:.0f}" for _, rss, pss in sampler.processes())


class Nginx:
    """Debian's nginx serving a directory with sendfile, as the ceiling for a cached hit."""

    def __init__(self, work: Path, root: Path) -> None:
        self.port = free_port()
        work.mkdir(parents=True, exist_ok=True)
        conf = work / "nginx.conf"
        conf.write_text(f"""
user root;
worker_processes auto;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  client_body_temp_path {work}/body;
  proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fastcgi;
  uwsgi_temp_path {work}/uwsgi;
  scgi_temp_path {work}/scgi;
  server {{
    listen 127.0.0.1:{self.port};
    root {root};
    location / {{ default_type application/octet-stream; }}
  }}
}}
""")
        self.proc = subprocess.Popen(
            ["nginx", "-c", str(conf), "-p", str(work)], stderr=subprocess.DEVNULL
        )
        time.sleep(0.5)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        self.proc.wait(timeout=10)


def wrk(url: str, seconds: int, accept: str) -> tuple[float, float]:
    """Requests per second and p99 latency (ms) at concurrency 32."""
    out = subprocess.run(
        ["wrk", "-t2", "-c32", f"-d{seconds}s", "--latency", "-H", f"Accept: {accept}", url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert p99, out
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"wrk {url}: {non2xx.group(1)} failed responses\n{out}")
    return rps, float(p99.group(1)) * scale


_WRK_P999 = """done = function(summary, latency, requests)
  io.write(string.format("p99.9 %d\\n", latency:percentile(99.9)))
end
"""


def wrk_latency(url: str, seconds: int, accept: str) -> tuple[float, float, float, float]:
    """req/s and p50, p99, p99.9 latency (ms) with wrk -t2 -c32 as fast as it goes."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(_WRK_P999)
        script.flush()
        out = subprocess.run(
            ["wrk", "-t2", "-c32", f"-d{seconds}s", "--latency", "-s", script.name]
            + ["-H", f"Accept: {accept}", url],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        ).stdout
    if re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise RuntimeError(f"wrk {url}: failed responses\n{out}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    figures = []
    for pct in ("50", "99"):
        m = re.search(pct + r"%\s+([\d.]+)(us|ms|s)", out)
        assert m, out
        figures.append(float(m.group(1)) * scale[m.group(2)])
    p999 = re.search(r"p99.9 (\d+)", out)
    assert p999, out
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return rps, figures[0], figures[1], int(p999.group(1)) / 1000.0


def hey_latency(url: str, seconds: int, accept: str, conns: int = 50) -> tuple[float, ...]:
    """req/s and p50, p99, p99.9 latency (ms) with hey -c conns as fast as it goes (every
    request's time from hey's CSV: its summary stops at p99)."""
    out = subprocess.run(
        ["hey", "-z", f"{seconds}s", "-c", str(conns), "-o", "csv", "-H", f"Accept: {accept}", url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    rows = [line.split(",") for line in out.splitlines()[1:] if line]
    times = sorted(float(r[0]) * 1000 for r in rows if r[6] == "200")
    if len(times) < len(rows) or not times:
        raise RuntimeError(f"hey {url}: {len(rows) - len(times)} failed of {len(rows)}")
    last = max(float(r[7]) + float(r[0]) for r in rows)

    def pct(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))]

    return len(times) / last, pct(0.50), pct(0.99), pct(0.999)


def latency_cells(figures: tuple[float, ...]) -> str:
    """req/s and p50 / p99 / p99.9 in one table cell."""
    rps, p50, p99, p999 = figures
    return f"{rps:.0f}/s {p50:.1f}/{p99:.1f}/{p999:.1f}"


def client_gets(registry: Registry, since: int, digest: str) -> int:
    """GETs of digest that reached U on behalf of curl: P's own background fetches send
    Go's user agent, while X forwards the client's, so each is counted for its own run."""
    return sum(
        1
        for line in registry.log_text(since).splitlines()
        if "GET /v2/" in line and digest in line and "curl/" in line
    )


def hey_p99(url: str, seconds: int, accept: str, rate: float) -> float:
    """p99 latency (ms) at a fixed total request rate with 32 connections (hey -q)."""
    per_worker = max(1.0, rate / 32)
    out = subprocess.run(
        [
            "hey",
            "-z",
            f"{seconds}s",
            "-c",
            "32",
            "-q",
            f"{per_worker:.2f}",
            "-H",
            f"Accept: {accept}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    match = re.search(r"99%+ in ([\d.]+) secs", out)
    if not match or "[200]" not in out:
        raise RuntimeError(f"hey {url}:\n{out}")
    return float(match.group(1)) * 1000


def median_of(reps: int, *runs: Callable[[], float]) -> list[float]:
    """Alternate the runs rep by rep (A B C A B C ...) and return each one's median."""
    samples: list[list[float]] = [[] for _ in runs]
    for _ in range(reps):
        for i, run in enumerate(runs):
            samples[i].append(run())
    return [statistics.median(s) for s in samples]


class Bench:
    """Owns every server of one benchmark run."""

    def __init__(self, sizes: Sizes, work: Path) -> None:
        self.s = sizes
        self.work = work
        self.rows: list[tuple[str, str, str, str, str]] = []

    def row(self, figure: str, ours: str, reference: str, ratio: str, target: str) -> None:
        self.rows.append((figure, ours, reference, ratio, target))

    def setup(self) -> None:
        s = self.s
        log("starting U and pushing test images")
        self.u = Registry(self.work / "u").start()
        layouts = self.work / "layouts"
        big = build_image(
            layouts / "big",
            "v1",
            platforms=("linux/amd64",),
            layer_sizes=(s.big,),
            compression="none",
        )
        mid = build_image(
            layouts / "mid",
            "v1",
            platforms=("linux/amd64",),
            layer_sizes=(s.mid,),
            compression="none",
        )
        three = build_image(
            layouts / "three",
            "v1",
            platforms=("linux/amd64",),
            layer_sizes=(s.mid // 2, s.mid // 4, s.mid // 8),
            compression="none",
        )
        self.images = {"big": big, "mid": mid, "three": three}
        for name, image in self.images.items():
            image.push(f"docker://{self.u.host}/bench/{name}:v1")
        if s.huge:
            huge = build_image(
                layouts / "huge",
                "v1",
                platforms=("linux/amd64",),
                layer_sizes=(s.huge,),
                compression="none",
            )
            huge.push(f"docker://{self.u.host}/bench/huge:v1")
            self.images["huge"] = huge
        self.p = Registry(self.work / "p", extra_config={"proxy": {"remoteurl": self.u.url}})
        self.p.start()
        self.x = ProxyServer(
            self.work / "x",
            {
                "UPSTREAM_REGISTRY": self.u.host,
                "INSECURE_REGISTRIES": self.u.host,
                "LOG_LEVEL": "info",
                "SPOOL_DIR": str(self.work / "x-spool"),
            },
        )
        self.x.start()
        self.n = Nginx(self.work / "n", self.x.fs_root)

    def teardown(self) -> None:
        for stop in (self.n.stop, self.x.stop, self.p.stop, self.u.stop):
            try:
                stop()
            except Exception as exc:  # noqa: BLE001
                log(f"teardown: {exc}")

    def layer(self, name: str) -> tuple[str, int]:
        blob = self.images[name].platform("linux/amd64").layers[0]
        return blob.digest, blob.size

    def url(self, server: str, name: str, digest: str) -> str:
        base = {"x": self.x.url, "p": self.p.url, "u": self.u.url}[server]
        return f"{base}/v2/bench/{name}/blobs/{digest}"

    def clear_x(self) -> None:
        shutil.rmtree(self.x.fs_root / "blobs", ignore_errors=True)
        shutil.rmtree(self.x.fs_root / "manifests", ignore_errors=True)

    def clear_p(self) -> None:
        self.p.stop()
        shutil.rmtree(self.p.storage_dir, ignore_errors=True)
        self.p.start()

    def warm_blobs(self) -> None:
        s = self.s
        for name in ("big", "mid"):
            digest, size = self.layer(name)
            for server in ("x", "p"):
                curl(self.url(server, name, digest), size)
            if self.x.wait_cached([digest], timeout=30):
                raise RuntimeError(f"X did not cache {digest}:\n{self.x.log()[-3000:]}")
        digest, size = self.layer("big")
        nginx = f"http://127.0.0.1:{self.n.port}/blobs/sha256/{digest.split(':')[1]}"
        x, n, p, u = median_of(
            s.reps,
            lambda: curl(self.url("x", "big", digest), size),
            lambda: curl(nginx, size),
            lambda: curl(self.url("p", "big", digest), size),
            lambda: curl(self.url("u", "big", digest), size),
        )
        mb = size / MiB
        self.row(
            f"warm blob {mb:.0f} MiB, 1 client (MiB/s)",
            f"{mb / x:.0f}",
            f"N {mb / n:.0f} | P {mb / p:.0f} | U {mb / u:.0f}",
            f"{n / x:.2f} x N",
            ">= 0.9 x N",
        )
        digest, size = self.layer("mid")
        nginx = f"http://127.0.0.1:{self.n.port}/blobs/sha256/{digest.split(':')[1]}"
        x, n, p = median_of(
            s.reps,
            lambda: parallel(self.url("x", "mid", digest), 16, size),
            lambda: parallel(nginx, 16, size),
            lambda: parallel(self.url("p", "mid", digest), 16, size),
        )
        mb = 16 * size / MiB
        self.row(
            f"warm blob {size // MiB} MiB, 16 clients (MiB/s)",
            f"{mb / x:.0f}",
            f"N {mb / n:.0f} | P {mb / p:.0f}",
            f"{n / x:.2f} x N",
            ">= 0.9 x N",
        )

    def cold_blobs(self) -> None:
        s = self.s
        digest, size = self.layer("big")
        x_gets: list[int] = []

        def x_cold() -> float:
            self.clear_x()
            time.sleep(0.5)  # let earlier runs' access-log lines land before the mark
            mark = self.u.mark()
            seconds = curl(self.url("x", "big", digest), size)
            time.sleep(0.3)
            x_gets.append(client_gets(self.u, mark, digest))
            return seconds

        def p_cold() -> float:
            self.clear_p()
            return curl(self.url("p", "big", digest), size)

        with RssSampler(self.x.proc.pid) as rss:  # type: ignore[union-attr]
            base = rss.current()
            x, u, p = median_of(
                s.reps, x_cold, lambda: curl(self.url("u", "big", digest), size), p_cold
            )
        mb = size / MiB
        self.row(
            f"cold blob {mb:.0f} MiB (MiB/s)",
            f"{mb / x:.0f}",
            f"U {mb / u:.0f} | P {mb / p:.0f}",
            f"{u / x:.2f} x U",
            ">= 0.85 x U",
        )
        self.row("  upstream GETs per cold GET", f"{max(x_gets)}", "P 1", "", "1")
        self.row(
            f"  RSS growth, cold {mb:.0f} MiB (MiB)",
            f"{(rss.peak - base) / MiB:.1f}",
            "",
            "",
            "< 64",
        )

        digest, size = self.layer("mid")
        counts: dict[str, list[int]] = {"x": [], "p": []}

        def herd(server: str) -> Callable[[], float]:
            def run() -> float:
                self.clear_x() if server == "x" else self.clear_p()
                time.sleep(0.5)
                mark = self.u.mark()
                seconds = parallel(self.url(server, "mid", digest), 20, size)
                time.sleep(0.5)
                counts[server].append(
                    len([e for e in self.u.blob_gets(since=mark) if digest in e.path])
                )
                return seconds

            return run

        x, p = median_of(s.reps, herd("x"), herd("p"))
        self.row(
            f"20 concurrent cold GETs of {size // MiB} MiB (s)",
            f"{x:.2f}",
            f"P {p:.2f}",
            f"{p / x:.2f} x P speed",
            "",
        )
        self.row("  upstream GETs", f"{max(counts['x'])}", f"P {max(counts['p'])}", "", "exactly 1")

    def huge(self) -> None:
        if not self.s.huge:
            return
        digest, size = self.layer("huge")
        for label, clients in (("cold 1 GiB", 1), ("20 coalesced followers of 1 GiB", 20)):
            self.clear_x()
            with RssSampler(self.x.proc.pid) as rss:  # type: ignore[union-attr]
                base = rss.current()
                parallel(self.url("x", "huge", digest), clients, size)
            self.row(
                f"  RSS growth, {label} (MiB)", f"{(rss.peak - base) / MiB:.1f}", "", "", "< 64"
            )
        self.clear_x()

    def manifests(self) -> None:
        s = self.s
        image = self.images["three"]
        digest = image.manifest_digest
        for server in ("x", "p"):
            base = {"x": self.x.url, "p": self.p.url}[server]
            for ref in ("v1", digest):
                curl(
                    f"{base}/v2/bench/three/manifests/{ref}",
                    image.manifest.size,
                    (f"Accept: {ACCEPT}",),
                )
        results = {}
        for label, ref in (("digest", digest), ("tag", "v1")):
            x = wrk(f"{self.x.url}/v2/bench/three/manifests/{ref}", s.wrk_seconds, ACCEPT)
            p = wrk(f"{self.p.url}/v2/bench/three/manifests/{ref}", s.wrk_seconds, ACCEPT)
            results[label] = (x, p)
            self.row(
                f"warm manifest by {label} (req/s)",
                f"{x[0]:.0f}",
                f"P {p[0]:.0f}",
                f"{x[0] / p[0]:.2f} x P",
                ">= 1.0 x P",
            )
            self.row(
                f"  p99 by {label}, saturated (ms)", f"{x[1]:.1f}", f"P {p[1]:.1f}", "", "<= P"
            )
            # Fairness (issue 16): p50/p99/p99.9 next to req/s, under wrk and hey, X, P and U.
            for tool, measure in (("wrk -c32", wrk_latency), ("hey -c50", hey_latency)):
                figs = {
                    name: measure(f"{base}/v2/bench/three/manifests/{ref}", s.wrk_seconds, ACCEPT)
                    for name, base in (("X", self.x.url), ("P", self.p.url), ("U", self.u.url))
                }
                self.row(
                    f"  {tool} by {label}: req/s p50/p99/p99.9 (ms)",
                    latency_cells(figs["X"]),
                    f"P {latency_cells(figs['P'])}; U {latency_cells(figs['U'])}",
                    f"p99 {figs['X'][2] / figs['X'][1]:.0f} x p50",
                    "p99 <= U's",
                )
            rate = 0.8 * p[0]  # the same offered load for both: 80 % of P's maximum
            url_x = f"{self.x.url}/v2/bench/three/manifests/{ref}"
            url_p = f"{self.p.url}/v2/bench/three/manifests/{ref}"
            hx = hey_p99(url_x, s.wrk_seconds, ACCEPT, rate)
            hp = hey_p99(url_p, s.wrk_seconds, ACCEPT, rate)
            self.row(
                f"  p99 by {label} at {rate:.0f} req/s for both (ms)",
                f"{hx:.1f}",
                f"P {hp:.1f}",
                f"{hx / hp:.2f} x P",
                "<= P",
            )

    def client_rows(self, label: str, pull: Callable[[str], float]) -> None:
        """A client's pull of the 3-layer image from each server: cold (caches emptied)
        against U and P, then warm against P."""

        def x_cold() -> float:
            self.clear_x()
            return pull(self.x.host)

        def p_cold() -> float:
            self.clear_p()
            return pull(self.p.host)

        x, u, p = median_of(self.s.reps, x_cold, lambda: pull(self.u.host), p_cold)
        self.row(
            f"{label}, 3 layers, cold (s)",
            f"{x:.2f}",
            f"U {u:.2f} | P {p:.2f}",
            f"{u / x:.2f} x U",
            ">= 0.95 x U",
        )
        pull(self.x.host)
        pull(self.p.host)
        time.sleep(0.5)
        x, p = median_of(self.s.reps, lambda: pull(self.x.host), lambda: pull(self.p.host))
        self.row(
            f"{label}, 3 layers, warm (s)",
            f"{x:.2f}",
            f"P {p:.2f}",
            f"{p / x:.2f} x P",
            ">= 1.0 x P",
        )

    def skopeo(self) -> None:

        def pull(host: str) -> float:
            dest = Path(tempfile.mkdtemp(dir=self.work))
            start = time.perf_counter()
            proc = subprocess.run(
                [
                    "skopeo",
                    "--insecure-policy",
                    "copy",
                    "--src-tls-verify=false",
                    "--src-no-creds",
                    f"docker://{host}/bench/three:v1",
                    f"dir:{dest}",
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            seconds = time.perf_counter() - start
            shutil.rmtree(dest)
            if proc.returncode:
                raise RuntimeError(proc.stderr)
            return seconds

        self.client_rows("skopeo pull", pull)

    def cluster_cold(self) -> None:
        """30 cold GETs spread over 3 replicas on one S3 bucket: with PEERS (one upstream GET
        for the fleet) against the same 3 replicas without (one per replica)."""
        digest, size = self.layer("mid")
        mb = size / MiB
        figures: dict[str, tuple[int, float]] = {}
        with SeaweedFS(self.work / "weed") as weed:
            for mode in ("peers", "independent"):
                ports = [free_port() for _ in range(3)]
                urls = [f"http://127.0.0.1:{port}" for port in ports]
                replicas = []
                try:
                    for i, port in enumerate(ports):
                        env = {
                            "UPSTREAM_REGISTRY": self.u.host,
                            "INSECURE_REGISTRIES": self.u.host,
                            "STORAGE_BACKEND": "s3",
                            **weed.env(),
                            "S3_BUCKET": "bench",
                            "S3_PREFIX": mode,  # cold for each mode
                            "SPOOL_DIR": str(self.work / f"{mode}-spool{i}"),
                        }
                        if mode == "peers":
                            env.update(
                                PEERS=",".join(urls), PEER_URL=urls[i], CLUSTER_SECRET="b" * 24
                            )
                        replica = ProxyServer(self.work / f"{mode}{i}", env, port=port)
                        replicas.append(replica.start())
                    time.sleep(0.5)
                    mark = self.u.mark()
                    start = time.perf_counter()
                    threads = [
                        threading.Thread(
                            target=curl, args=(f"{urls[i % 3]}/v2/bench/mid/blobs/{digest}", size)
                        )
                        for i in range(30)
                    ]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    seconds = time.perf_counter() - start
                    time.sleep(0.3)
                    figures[mode] = (client_gets(self.u, mark, digest), seconds)
                finally:
                    for replica in replicas:
                        replica.stop()
        (gets, seconds), (ind_gets, ind_seconds) = figures["peers"], figures["independent"]
        self.row(
            f"3 replicas, 30 cold GETs of {mb:.0f} MiB: upstream GETs",
            f"{gets}",
            f"independent {ind_gets}",
            "",
            "1",
        )
        self.row(
            "  wall time (s)",
            f"{seconds:.2f}",
            f"independent {ind_seconds:.2f}",
            f"{ind_seconds / seconds:.2f} x independent",
            "",
        )

    def ctr(self) -> None:
        """containerd's `ctr image pull` of the 3-layer image, each pull in a fresh namespace
        (isolated content store), so every pull fetches every blob from the server named."""
        daemon = Containerd(self.work / "containerd").start()
        try:

            def pull(host: str) -> float:
                start = time.perf_counter()
                proc = daemon.pull(f"{host}/bench/three:v1")
                if proc.returncode:
                    raise RuntimeError(proc.stderr)
                return time.perf_counter() - start

            self.client_rows("ctr pull", pull)
        finally:
            daemon.stop()

    def memory_idle(self) -> None:
        """Each process's RSS/PSS before any traffic: the import footprint."""
        x = RssSampler(self.x.proc.pid)  # type: ignore[union-attr]
        p = RssSampler(self.p.pid or 0)
        self.row(
            "idle RSS/PSS per process (MiB)",
            f"{per_process(x)} (master w0 w1)",
            f"P {per_process(p)}",
            "",
            "",
        )
        self.row(
            "idle sum RSS | PSS (MiB)",
            f"{x.current() / MiB:.0f} | {sum(q for _, _, q in x.processes()) / MiB:.0f}",
            f"P {p.current() / MiB:.0f}",
            "",
            "",
        )

    def print_table(self) -> None:
        headers = ("figure", "X (ours)", "references", "ratio", "target")
        widths = [max(len(r[i]) for r in [headers, *self.rows]) for i in range(5)]
        line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
        print(line)
        print("-" * len(line))
        for row in self.rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def main() -> int:
    """Run every scenario and print one table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes")
    args = parser.parse_args()
    for tool in ("docker-registry", "skopeo", "nginx", "wrk", "hey", "curl", "containerd"):
        if shutil.which(tool) is None:
            print(f"bench needs {tool}", file=sys.stderr)
            return 2
    sizes = QUICK if args.quick else FULL
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="oci-bench-") as tmp:
        bench = Bench(sizes, Path(tmp))
        try:
            bench.setup()
            time.sleep(1)
            bench.memory_idle()
            x_peak = RssSampler(bench.x.proc.pid).__enter__()  # type: ignore[union-attr]
            p_peak = RssSampler(lambda: bench.p.pid or 0).__enter__()
            for step in (
                bench.warm_blobs,
                bench.cold_blobs,
                bench.huge,
                bench.manifests,
                bench.skopeo,
                bench.ctr,
                bench.cluster_cold,
            ):
                log(step.__name__)
                step()
            x_peak.__exit__()
            p_peak.__exit__()
            bench.row(
                "peak sum RSS | PSS, whole run (MiB)",
                f"{x_peak.peak / MiB:.0f} | {x_peak.peak_pss / MiB:.0f} (master + workers)",
                f"P {p_peak.peak / MiB:.0f} | {p_peak.peak_pss / MiB:.0f}",
                "",
                "<= 96",
            )
            bench.row(
                "RSS/PSS per process at the end (MiB)",
                per_process(RssSampler(bench.x.proc.pid)),  # type: ignore[union-attr]
                f"P {per_process(RssSampler(bench.p.pid or 0))}",
                "",
                "",
            )
        finally:
            bench.teardown()
    bench.print_table()
    print(
        f"\n{'quick' if args.quick else 'full'} run, {time.monotonic() - started:.0f} s, "
        "medians of alternating repetitions on this machine"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
