"""/metrics summed over gunicorn workers, and LOG_FORMAT=json, on the real server (SPEC §13)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.harness import BuiltImage, Registry
from tests.harness.proxyproc import ProxyServer
from tests.harness.scrape import metric

pytestmark = pytest.mark.e2e
HITS = 24


def _metrics_dir(proxy: ProxyServer) -> Path:
    """The multiprocess directory gunicorn.conf.py made: the one holding our workers' files."""
    workers = {str(pid) for pid in proxy.worker_pids()}
    for directory in Path(tempfile.gettempdir()).glob("oci-pull-through-metrics-*"):
        with contextlib.suppress(FileNotFoundError):
            if any(p.stem.rsplit("_", 1)[-1] in workers for p in directory.iterdir()):
                return directory
    raise AssertionError(f"no metrics directory holds the files of workers {workers}")


def test_hit_counter_sums_every_worker(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, image: BuiltImage
) -> None:
    proxy = make_proxy(
        {
            "UPSTREAM_REGISTRY": upstream.host,
            "INSECURE_REGISTRIES": upstream.host,
            "WEB_CONCURRENCY": "3",
            "LOG_FORMAT": "json",
        }
    )
    layer = max(image.blobs().values(), key=lambda b: b.size)
    url = f"{proxy.url}/v2/e2e/app/blobs/{layer.digest}"
    assert requests.get(url, timeout=30).content == layer.data  # the miss
    assert proxy.wait_cached([layer.digest]) == []
    for _ in range(HITS):  # a new connection each time, so the workers share the load
        with requests.get(url, timeout=30) as r:
            assert r.status_code == 200 and r.content == layer.data
    labels = {"kind": "blob", "method": "GET", "status": "200"}
    assert metric(proxy, "oci_requests_total", cache="hit", **labels) == HITS
    assert metric(proxy, "oci_requests_total", cache="miss", **labels) == 1
    assert metric(proxy, "oci_served_bytes_total", source="cache") == HITS * layer.size
    assert metric(proxy, "oci_served_bytes_total", source="upstream") == layer.size
    assert metric(proxy, "oci_cache_commits_total", kind="blob") == 1
    assert metric(proxy, "oci_upstream_requests_total", registry=upstream.host, status="200") == 1
    assert metric(proxy, "oci_transfers_in_flight") == 0
    pids = {name.rsplit("_", 1)[1] for name in os.listdir(_metrics_dir(proxy))}
    assert len(pids) >= 2, f"every worker keeps its own figures: {pids}"

    lines = [line for line in proxy.log().splitlines() if line.strip()]
    docs = [json.loads(line) for line in lines]  # every line, gunicorn's too, is JSON
    requests_ = [d for d in docs if d["logger"] == "oci_pull_through.access"]
    assert len(requests_) >= HITS + 1
    assert {
        "method",
        "repository",
        "kind",
        "reference",
        "status",
        "cache",
        "bytes",
        "duration_ms",
    } <= set(requests_[-1])
    assert any(d["logger"] == "gunicorn.error" for d in docs)


def test_metrics_switched_off_and_directory_cleaned(
    make_proxy: Callable[..., ProxyServer],
) -> None:
    proxy = make_proxy({"METRICS_ENABLED": "false"})
    assert requests.get(f"{proxy.url}/metrics", timeout=10).status_code == 404
    directory = _metrics_dir(proxy)
    assert directory.is_dir()
    proxy.stop()
    assert not directory.exists(), "gunicorn's on_exit removes the directory it made"
