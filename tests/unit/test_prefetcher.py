"""app/prefetch.py: which blobs a manifest names, the bounds, and the unused count."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gevent

from app import metrics
from app.prefetch import Prefetcher, blob_digests

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def manifest(*layers: dict[str, object], config: object = None) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config if config is not None else {"digest": D1, "size": 1},
        "layers": list(layers),
    }
    return json.dumps(doc).encode()


def test_config_and_layers_in_order_without_duplicates() -> None:
    data = manifest({"digest": D2}, {"digest": D3}, {"digest": D2})
    assert blob_digests(data) == [D1, D2, D3]


def test_foreign_layers_and_malformed_descriptors_are_skipped() -> None:
    data = manifest(
        {"digest": D2, "urls": ["https://elsewhere.example/layer"]},
        {"digest": "sha256:../../etc"},
        "not a descriptor",
        {"digest": 5},
        {"digest": D3},
    )
    assert blob_digests(data) == [D1, D3]


def test_indexes_and_garbage_name_no_blobs() -> None:
    index = json.dumps({"schemaVersion": 2, "manifests": [{"digest": D2}]}).encode()
    assert blob_digests(index) == []
    assert blob_digests(b"\xff not json") == []
    assert blob_digests(b"[1, 2]") == []
    assert blob_digests(json.dumps({"layers": "x", "config": None}).encode()) == []


def test_only_image_manifests_prefetch(tmp_path: Path) -> None:
    asked: list[str] = []
    prefetcher = Prefetcher(2, str(tmp_path))
    prefetcher.manifest_served(
        "m1", "application/vnd.oci.image.index.v1+json", manifest(), asked.append
    )
    gevent.sleep(0.01)
    assert asked == []
    prefetcher.manifest_served(
        "m2", OCI_MANIFEST + "; charset=x", manifest({"digest": D2}), _record(asked)
    )
    gevent.sleep(0.05)
    assert sorted(asked) == [D1, D2]


def test_disabled_with_zero_concurrency(tmp_path: Path) -> None:
    asked: list[str] = []
    prefetcher = Prefetcher(0, str(tmp_path))
    prefetcher.manifest_served("m", OCI_MANIFEST, manifest({"digest": D2}), _record(asked))
    gevent.sleep(0.02)
    assert asked == []


def test_concurrency_is_bounded(tmp_path: Path) -> None:
    running, peak = [0], [0]

    def fetch(digest: str) -> bool:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        gevent.sleep(0.02)
        running[0] -= 1
        return True

    layers = [{"digest": "sha256:" + f"{n:064x}"} for n in range(10)]
    prefetcher = Prefetcher(3, str(tmp_path))
    prefetcher.manifest_served("m", OCI_MANIFEST, manifest(*layers), fetch)
    gevent.sleep(0.3)
    assert peak[0] == 3


def test_the_same_manifest_is_looked_at_once_a_minute(tmp_path: Path) -> None:
    asked: list[str] = []
    prefetcher = Prefetcher(2, str(tmp_path))
    for _ in range(3):
        prefetcher.manifest_served("same", OCI_MANIFEST, manifest(), _record(asked))
    gevent.sleep(0.05)
    assert asked == [D1]


def test_unused_prefetches_are_counted_once_after_their_time(tmp_path: Path) -> None:
    prefetcher = Prefetcher(2, str(tmp_path))
    prefetcher.manifest_served(
        "m", OCI_MANIFEST, manifest({"digest": D2}, {"digest": D3}), _record([])
    )
    gevent.sleep(0.05)
    markers = sorted(os.listdir(tmp_path / "prefetched"))
    assert len(markers) == 3
    prefetcher.blob_requested(D2)  # a client asked: no longer unused
    before = metrics.PREFETCH_UNUSED._value.get()
    assert prefetcher.sweep(now=time.time()) == 0
    assert prefetcher.sweep(now=time.time() + 3600) == 2
    assert metrics.PREFETCH_UNUSED._value.get() == before + 2
    assert prefetcher.sweep(now=time.time() + 3600) == 0


def test_a_prefetch_that_fetched_nothing_leaves_no_marker(tmp_path: Path) -> None:
    prefetcher = Prefetcher(2, str(tmp_path))
    prefetcher.manifest_served("m", OCI_MANIFEST, manifest(), lambda digest: False)
    gevent.sleep(0.05)
    assert os.listdir(tmp_path / "prefetched") == []


def _record(asked: list[str]):  # noqa: ANN202 - a tiny test double
    def fetch(digest: str) -> bool:
        asked.append(digest)
        return True

    return fetch
