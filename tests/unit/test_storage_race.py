"""SPEC §15 "Commits are atomic per key": concurrent fills of one tag never leave a lying sidecar.

Two processes (not threads: the race is between workers and replicas) commit one tag key
thousands of times, each time with different bytes of a different length and the right
digest in the meta. After every commit, in a third process the whole time, and once at the
end, a (stat, open) pair is checked: the bytes opened for that meta must hash to its digest
and have its size. A miss (NotFound) is allowed, a disagreement never is.

Run against the filesystem backend and a real SeaweedFS (S3), fewer rounds on S3.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.storage import NotFound, ObjectMeta, Storage, StoreError, keys, put
from app.storage.fs import FilesystemStorage
from app.storage.s3 import S3Storage
from tests.harness import seaweed
from tests.harness.seaweed import SeaweedFS

KEY = keys.manifest("registry.test", "org/app", "latest")
BUCKET = "race"
WRITERS = 2
ROUNDS = {"fs": 1500, "s3": 400}  # per writer: 3,000 commits on fs, 800 on SeaweedFS


def _storage(spec: dict[str, str]) -> Storage:
    """Built inside each process: a boto3 client must not cross a fork."""
    if spec["backend"] == "fs":
        return FilesystemStorage(spec["root"])
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=spec["endpoint"],
        aws_access_key_id=seaweed.ACCESS_KEY,
        aws_secret_access_key=seaweed.SECRET_KEY,
        region_name=seaweed.REGION,
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 3, "mode": "standard"},
        ),
    )
    return S3Storage(client, BUCKET, spec["prefix"])


def _meta(data: bytes) -> ObjectMeta:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return ObjectMeta(digest, len(data), "application/vnd.oci.image.manifest.v1+json")


def _read(storage: Storage, meta: ObjectMeta) -> bytes:
    with storage.open(KEY, meta) as fh:
        chunks = []
        while block := fh.read(1 << 20):
            chunks.append(block)
    return b"".join(chunks)


def check(storage: Storage) -> str:
    """One (stat, open) pair: "agree", "miss", "mismatch" or "torn" (bytes changed mid-read)."""
    try:
        meta = storage.stat(KEY)
        data = _read(storage, meta)
    except NotFound:
        return "miss"
    except StoreError:
        return "torn"  # a client would have got a short body
    ok = len(data) == meta.size and "sha256:" + hashlib.sha256(data).hexdigest() == meta.digest
    return "agree" if ok else "mismatch"


def commit_loop(spec: dict[str, str], writer: int, rounds: int, out: Any) -> None:
    """A worker filling the tag over and over, checking what a reader would get after each."""
    storage = _storage(spec)
    seen = {"agree": 0, "miss": 0, "mismatch": 0, "torn": 0, "store_error": 0}
    for i in range(rounds):
        data = f"writer {writer} commit {i};".encode() * (1 + (i * 7 + writer * 13) % 61)
        try:
            put(storage, KEY, [data], _meta(data))
        except StoreError:
            seen["store_error"] += 1
        seen[check(storage)] += 1
    out.put(seen)


def check_loop(spec: dict[str, str], stop: Any, out: Any) -> None:
    """A reader in its own process, checking pairs for as long as the writers run."""
    storage = _storage(spec)
    seen = {"agree": 0, "miss": 0, "mismatch": 0, "torn": 0}
    while not stop.is_set():
        seen[check(storage)] += 1
    out.put(seen)


def race(spec: dict[str, str], rounds: int) -> dict[str, dict[str, int]]:
    """Run the writers and the reader; what each of them saw."""
    ctx = multiprocessing.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    writers = [ctx.Process(target=commit_loop, args=(spec, w, rounds, out)) for w in range(WRITERS)]
    reader = ctx.Process(target=check_loop, args=(spec, stop, out))
    for process in [*writers, reader]:
        process.start()
    results = [out.get(timeout=300) for _ in writers]
    stop.set()
    results.append(out.get(timeout=60))
    for process in [*writers, reader]:
        process.join(timeout=30)
        assert process.exitcode == 0
    final = check(_storage(spec))
    return {
        "writers": {k: sum(r.get(k, 0) for r in results[:-1]) for k in results[0]},
        "reader": results[-1],
        "final": {final: 1},
    }


@pytest.fixture(scope="module")
def seaweed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs-race")).start()
    try:
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["fs", "s3"])
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    if request.param == "fs":
        return {"backend": "fs", "root": str(tmp_path / "cache")}
    server = request.getfixturevalue("seaweed_server")
    return {"backend": "s3", "endpoint": server.endpoint, "prefix": f"race-{time.time_ns()}"}


def test_concurrent_commits_of_one_tag_never_leave_a_sidecar_describing_other_bytes(
    spec: dict[str, str],
) -> None:
    seen = race(spec, ROUNDS[spec["backend"]])
    print(spec["backend"], seen)
    assert seen["writers"]["store_error"] == 0
    assert seen["writers"]["agree"] > 0 and seen["reader"]["agree"] > 0
    mismatches = sum(part.get(kind, 0) for part in seen.values() for kind in ("mismatch", "torn"))
    assert mismatches == 0, seen
    assert seen["final"] == {"agree": 1}, "the last commit is readable and agrees"
