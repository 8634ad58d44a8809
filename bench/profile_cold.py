#!/usr/bin/env python3
"""Where a cold blob GET spends its CPU: py-spy on the proxy's workers during cold pulls.

Starts U (docker-registry) with one uncompressed layer and X (the proxy, 1 worker so one
process does the whole miss), then pulls the layer cold with curl again and again while
`py-spy record` samples the worker, every thread, idle ones excluded. Prints the seconds of
curl against U directly and through X, then the functions holding the most samples, by
own time and by total time, per thread (the gevent hub thread, and the thread pool that
hashes the store fill).

    .venv/bin/python bench/profile_cold.py --mib 256 --seconds 20
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import curl  # noqa: E402  (bench/bench.py: this directory is on sys.path)
from tests.harness import Registry, build_image  # noqa: E402
from tests.harness.proxyproc import ProxyServer  # noqa: E402

MiB = 1024 * 1024


def summarise(raw: Path, top: int) -> None:
    """Self and total samples per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        threads[frames[0]] += count
        own[frames[-1]] += count
        for frame in set(frames[1:]):
            total[frame] += count
    print(f"\n{samples} samples (100 per second per busy thread)")
    for name, counter in (("by thread", threads), ("own time", own), ("total time", total)):
        print(f"\n{name}:")
        for frame, count in counter.most_common(top):
            print(f"  {100 * count / samples:5.1f}%  {frame[:150]}")


def main() -> int:
    """Pull cold, profile, summarise."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.TemporaryDirectory(prefix="oci-prof-") as tmp:
        work = Path(tmp)
        u = Registry(work / "u").start()
        image = build_image(
            work / "img",
            "v1",
            platforms=("linux/amd64",),
            layer_sizes=(args.mib * MiB,),
            compression="none",
        )
        image.push(f"docker://{u.host}/prof/big:v1")
        layer = image.platform("linux/amd64").layers[0]
        x = ProxyServer(
            work / "x",
            {"UPSTREAM_REGISTRY": u.host, "INSECURE_REGISTRIES": u.host, "WEB_CONCURRENCY": "1"},
        ).start()
        try:
            worker = int(subprocess.check_output(["pgrep", "-P", str(x.proc.pid)]).split()[0])  # type: ignore[union-attr]
            x_url = f"{x.url}/v2/prof/big/blobs/{layer.digest}"
            u_url = f"{u.url}/v2/prof/big/blobs/{layer.digest}"
            raw = work / "profile.txt"
            stop = threading.Event()
            times: dict[str, list[float]] = {"U": [], "X cold": []}

            def pull() -> None:
                while not stop.is_set():
                    times["U"].append(curl(u_url, layer.size))
                    shutil.rmtree(x.fs_root / "blobs", ignore_errors=True)
                    time.sleep(0.3)
                    times["X cold"].append(curl(x_url, layer.size))
                    time.sleep(0.3)

            puller = threading.Thread(target=pull)
            puller.start()
            subprocess.run(
                [
                    spy,
                    "record",
                    "--format",
                    "raw",
                    "--threads",
                    "--rate",
                    "100",
                    "--duration",
                    str(args.seconds),
                    "--pid",
                    str(worker),
                    "--output",
                    str(raw),
                ],
                check=True,
                capture_output=True,
            )
            stop.set()
            puller.join()
            for name, seconds in times.items():
                mbs = [layer.size / MiB / s for s in seconds]
                print(f"{name:7s} {len(mbs)} pulls, median {sorted(mbs)[len(mbs) // 2]:.0f} MiB/s")
            summarise(raw, args.top)
        finally:
            x.stop()
            u.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
