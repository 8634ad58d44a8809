"""`oci-pull-through gc --json`: what was evicted and the totals, as one document."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from app.cli import main
from app.storage import ObjectMeta, put
from app.storage.fs import FilesystemStorage
from app.storage.keys import blob


def _store(root: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    meta = ObjectMeta(digest=digest, size=len(data), media_type="application/octet-stream")
    put(FilesystemStorage(str(root)), blob(digest), [data], meta)
    return digest


@pytest.mark.parametrize("dry_run", [False, True])
def test_gc_json_reports_the_evicted_objects_and_totals(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    dry_run: bool,
) -> None:
    root = tmp_path / "cache"
    digests = [_store(root, bytes([n]) * 4096) for n in range(4)]
    for name, value in {
        "PROXY_MODE": "transparent",
        "STORAGE_BACKEND": "fs",
        "FS_ROOT": str(root),
        "SPOOL_DIR": str(tmp_path / "spool"),
    }.items():
        monkeypatch.setenv(name, value)
    argv = ["gc", "--max-bytes", "9000", "--json"] + (["--dry-run"] if dry_run else [])
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dry_run"] is dry_run and doc["bound"] == 9000
    assert doc["total"] > 4 * 4096 and doc["remaining"] <= 9000 * 0.9
    evicted = {e["key"] for e in doc["evicted"]}
    assert evicted and evicted <= {blob(d) for d in digests}
    assert sum(e["size"] for e in doc["evicted"]) == doc["total"] - doc["remaining"]
    still = {d for d in digests if (root / blob(d)).exists()}
    assert (
        still == set(digests)
        if dry_run
        else still == set(digests) - {d for d in digests if blob(d) in evicted}
    )
