"""LRU eviction of the filesystem cache (app/eviction.py, app/evictor.py)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from app.eviction import ORPHAN_AGE, Entry, in_use, remove, scan, select, sweep
from app.evictor import AccessTracker, Evictor
from app.storage import ObjectMeta, Storage, keys, put
from app.storage.fs import FilesystemStorage


def _entries(*spec: tuple[str, int, float]) -> list[Entry]:
    return [Entry(key, size, used) for key, size, used in spec]


def test_nothing_is_chosen_within_the_bound() -> None:
    assert select(_entries(("a", 50, 1), ("b", 50, 2)), max_bytes=100) == []


def test_least_recently_used_go_first_down_to_ninety_percent() -> None:
    entries = _entries(("new", 30, 9), ("old", 30, 1), ("mid", 30, 5), ("hot", 30, 10))
    chosen = select(entries, max_bytes=100)  # 120 > 100; goal 90
    assert [e.key for e in chosen] == ["old"]
    chosen = select(entries, max_bytes=70)  # goal 63: drop 60 bytes
    assert [e.key for e in chosen] == ["old", "mid"]


def test_busy_objects_are_passed_over_for_the_next_oldest() -> None:
    entries = _entries(("old", 30, 1), ("mid", 30, 5), ("new", 30, 9))
    chosen = select(entries, max_bytes=80, busy=lambda e: e.key == "old")
    assert [e.key for e in chosen] == ["mid"]


def test_ties_are_broken_by_key_so_runs_are_repeatable() -> None:
    entries = _entries(("b", 10, 1), ("a", 10, 1), ("c", 10, 1))
    assert [e.key for e in select(entries, max_bytes=25)] == ["a"]


def _commit(storage: FilesystemStorage, data: bytes, when: float) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    key = keys.blob(digest)
    put(storage, key, [data], ObjectMeta(digest, len(data), "application/octet-stream"))
    os.utime(storage.path(key), (when, when))
    return key


def test_scan_sees_committed_objects_only(tmp_path: Path) -> None:
    storage = FilesystemStorage(str(tmp_path / "cache"))
    key = _commit(storage, b"x" * 100, time.time())
    blob_dir = Path(storage.path(key)).parent
    (blob_dir / ".tmp-writing").write_bytes(b"y" * 1000)  # a fill in progress
    (blob_dir / ("f" * 64)).write_bytes(b"no sidecar yet")  # between the two renames
    spool = tmp_path / "cache" / "blobs" / "spool"
    spool.mkdir()
    (spool / "big").write_bytes(b"z" * 1000)
    (spool / "big.meta.json").write_bytes(b"{}")
    entries, orphans = scan(str(tmp_path / "cache"), skip=str(spool))
    assert [e.key for e in entries] == [key]
    assert entries[0].size == 100 + os.path.getsize(storage.path(keys.sidecar(key)))
    assert orphans == [], "a fresh sidecar-less file may be a commit in progress"


def test_old_orphans_are_removed_by_a_sweep(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    FilesystemStorage(str(root))
    orphan = root / "blobs" / "sha256" / ("e" * 64)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"left by a crash")
    old = time.time() - ORPHAN_AGE - 10
    os.utime(orphan, (old, old))
    result = sweep(str(root), None)
    assert result.orphans == 1 and not orphan.exists()


def test_temp_files_of_dead_writers_are_swept_live_ones_kept(tmp_path: Path) -> None:
    """A process killed mid-write leaves an invisible temp file: gc removes it once it is old."""
    root = tmp_path / "cache"
    FilesystemStorage(str(root))
    directory = root / "blobs" / "sha256"
    directory.mkdir(parents=True)
    dead, live = directory / ".tmp-dead", directory / ".tmp-live"
    dead.write_bytes(b"half a blob")
    live.write_bytes(b"being written")
    old = time.time() - ORPHAN_AGE - 10
    os.utime(dead, (old, old))
    result = sweep(str(root), None)
    assert result.orphans == 1 and not dead.exists() and live.exists()


def test_sweep_evicts_lru_and_removes_sidecar_and_data(tmp_path: Path) -> None:
    storage = FilesystemStorage(str(tmp_path / "cache"))
    now = time.time()
    old = _commit(storage, b"a" * 1000, now - 300)
    mid = _commit(storage, b"b" * 1000, now - 200)
    new = _commit(storage, b"c" * 1000, now - 100)
    dry = sweep(storage.root, 3000, dry_run=True)
    assert [e.key for e in dry.evicted] == [old] and os.path.exists(storage.path(old))
    result = sweep(storage.root, 3000)
    assert [e.key for e in result.evicted] == [old]
    assert not os.path.exists(storage.path(old))
    assert not os.path.exists(storage.path(keys.sidecar(old)))
    assert all(os.path.exists(storage.path(k)) for k in (mid, new))
    assert result.remaining <= 3000 * 0.9


def test_an_object_being_read_is_never_evicted(tmp_path: Path) -> None:
    storage = FilesystemStorage(str(tmp_path / "cache"))
    now = time.time()
    served = _commit(storage, b"s" * 1000, now - 300)
    other = _commit(storage, b"o" * 1000, now - 200)
    entry = next(e for e in scan(storage.root)[0] if e.key == served)
    with storage.open(served) as fh:  # what a hit does (held until the response ends)
        assert in_use(storage.root, entry)
        assert remove(storage.root, entry) is False
        result = sweep(storage.root, 1500)
        assert result.busy == 1 and [e.key for e in result.evicted] == [other]
        assert fh.read() == b"s" * 1000
    assert not in_use(storage.root, entry)
    assert [e.key for e in sweep(storage.root, 100).evicted] == [served]


def test_an_open_file_still_reads_in_full_after_unlink(tmp_path: Path) -> None:
    """Why a reader that opened just before eviction still gets every byte (Linux semantics)."""
    storage = FilesystemStorage(str(tmp_path / "cache"))
    data = os.urandom(3 * 1024 * 1024)
    key = _commit(storage, data, time.time())
    fh = storage.open(key)
    first = fh.read(1024)
    os.unlink(storage.path(keys.sidecar(key)))
    os.unlink(storage.path(key))
    assert not os.path.exists(storage.path(key))
    assert first + fh.read() == data
    fh.close()


def test_hits_are_tracked_in_memory_and_flushed_as_atimes(tmp_path: Path) -> None:
    storage = FilesystemStorage(str(tmp_path / "cache"))
    evictor = Evictor(storage.root, str(tmp_path / "state"), max_bytes=None)
    tracked = evictor.track(storage)
    key = _commit(storage, b"h" * 100, time.time() - 500)
    path = storage.path(key)
    before = os.stat(path)
    for _ in range(50):
        tracked.open(key).close()
    assert os.stat(path).st_atime == before.st_atime, "no write per hit"
    assert evictor.tracker.flush() == 1
    after = os.stat(path)
    assert after.st_atime > before.st_atime + 400
    assert after.st_mtime == before.st_mtime
    assert AccessTracker().flush() == 0


def test_evictor_run_records_the_total_and_evicts(tmp_path: Path) -> None:
    storage = FilesystemStorage(str(tmp_path / "cache"))
    evictor = Evictor(storage.root, str(tmp_path / "state"), max_bytes=3000)
    now = time.time()
    keys_ = [_commit(storage, bytes([65 + i]) * 1000, now - 300 + i) for i in range(3)]
    result = evictor.run()
    assert result is not None and [e.key for e in result.evicted] == [keys_[0]]
    assert evictor._state()["total"] == result.remaining


def _commit_tag(storage: Storage, tag: str, data: bytes) -> tuple[str, str]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    key = keys.manifest("registry.test", "org/app", tag)
    put(storage, key, [data], ObjectMeta(digest, len(data), "application/json"))
    return key, keys.data(key, digest)


def test_a_tags_entry_is_its_sidecar_and_the_data_it_names(tmp_path: Path) -> None:
    """SPEC §15: a tag's data is named by digest; data it moved away from is an orphan later."""
    storage = FilesystemStorage(str(tmp_path / "cache"))
    key, first = _commit_tag(storage, "v1", b"first manifest")
    key, second = _commit_tag(storage, "v1", b"second manifest, longer")
    entries, orphans = scan(storage.root)
    assert [(e.key, e.data_key) for e in entries] == [(key, second)]
    assert entries[0].size == len(b"second manifest, longer") + os.path.getsize(
        storage.path(keys.sidecar(key))
    )
    assert orphans == [], "the old data may still be read by a hit that stat-ed it just now"
    old = time.time() - ORPHAN_AGE - 10
    os.utime(storage.path(first), (old, old))
    os.utime(storage.path(second), (old, old))  # old but named by the sidecar: kept
    result = sweep(storage.root, None)
    assert result.orphans == 1
    assert not os.path.exists(storage.path(first)) and os.path.exists(storage.path(second))
    with storage.open(key) as fh:
        assert fh.read() == b"second manifest, longer"


def test_evicting_a_tag_removes_its_sidecar_and_named_data(tmp_path: Path) -> None:
    storage = FilesystemStorage(str(tmp_path / "cache"))
    key, data = _commit_tag(storage, "v1", b"m" * 1000)
    blob = _commit(storage, b"b" * 1000, time.time())
    os.utime(storage.path(data), (1, 1))  # least recently used
    entry = next(e for e in scan(storage.root)[0] if e.key == key)
    with storage.open(key):
        assert in_use(storage.root, entry), "a reader of the tag's data holds it"
    result = sweep(storage.root, 1500)
    assert [e.key for e in result.evicted] == [key]
    assert not os.path.exists(storage.path(data))
    assert not os.path.exists(storage.path(keys.sidecar(key)))
    assert os.path.exists(storage.path(blob))


def test_a_tag_sidecar_naming_missing_data_is_an_orphan_not_an_entry(tmp_path: Path) -> None:
    storage = FilesystemStorage(str(tmp_path / "cache"))
    key, data = _commit_tag(storage, "v1", b"manifest")
    os.unlink(storage.path(data))
    legacy = Path(storage.path(key))  # data at the key itself, as before §15: unreferenced
    legacy.write_bytes(b"manifest")
    old = time.time() - ORPHAN_AGE - 10
    for path in (storage.path(keys.sidecar(key)), str(legacy)):
        os.utime(path, (old, old))
    entries, orphans = scan(storage.root)
    assert entries == []
    assert sorted(orphans) == sorted([str(legacy), storage.path(keys.sidecar(key))])


def test_a_live_writers_old_temp_file_is_not_swept(tmp_path: Path) -> None:
    """Even past ORPHAN_AGE, a temp file whose writer holds its flock stays."""
    storage = FilesystemStorage(str(tmp_path / "cache"))
    writer = storage.writer(keys.blob("sha256:" + "ab" * 32))
    writer.write(b"slow")
    temp = writer._temp
    assert temp is not None
    old = time.time() - ORPHAN_AGE - 10
    os.utime(temp, (old, old))
    assert sweep(storage.root, None).orphans == 0 and os.path.exists(temp)
    assert storage.sweep(0) == 0 and os.path.exists(temp)
    writer.abort()


def test_the_tracked_storage_counts_commits_and_records_the_data_each_open_used(
    tmp_path: Path,
) -> None:
    """Usage tracking is a Storage wrapping the backend (create_app), not hooks set on it."""
    storage = FilesystemStorage(str(tmp_path / "cache"))
    evictor = Evictor(storage.root, str(tmp_path / "state"), max_bytes=1 << 30)
    tracked = evictor.track(storage)
    key, data = _commit_tag(tracked, "v1", b"manifest bytes")
    assert evictor._state()["total"] == len(b"manifest bytes"), "a commit adds its size"
    _commit(storage, b"untracked", time.time())  # straight to the backend: not counted
    assert evictor._state()["total"] == len(b"manifest bytes")
    with tracked.open(key) as fh:  # meta None: the sidecar's data is the file used
        assert fh.read() == b"manifest bytes"
    with tracked.open(key, storage.stat(key), 9, 5) as fh:
        assert fh.read() == b"bytes"
    assert list(evictor.tracker._used) == [storage.path(data)]
    writer = tracked.writer(keys.blob("sha256:" + "ab" * 32))
    writer.write(b"never committed")
    writer.abort()
    assert evictor._state()["total"] == len(b"manifest bytes"), "an abort adds nothing"
