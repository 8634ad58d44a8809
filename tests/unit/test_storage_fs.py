"""app/storage/fs.py specifics: temp files, commit order, path safety."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import app.storage.fs as fs_module
from app.storage import NotFound, ObjectMeta, StoreError, keys
from app.storage.fs import TEMP_PREFIX, FilesystemStorage

DIGEST = "sha256:" + "ab" * 32
KEY = keys.blob(DIGEST)
META = ObjectMeta(digest=DIGEST, size=5, media_type="application/octet-stream")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def storage(root: Path) -> FilesystemStorage:
    return FilesystemStorage(str(root))


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def temp_files(root: Path) -> list[str]:
    return [p for p in all_files(root) if os.path.basename(p).startswith(TEMP_PREFIX)]


def test_creates_root(root: Path) -> None:
    FilesystemStorage(str(root / "deep" / "er"))
    assert (root / "deep" / "er").is_dir()


def test_layout_on_disk(storage: FilesystemStorage, root: Path) -> None:
    writer = storage.writer(KEY)
    writer.write(b"hello")
    writer.commit(META)
    assert all_files(root) == [f"blobs/sha256/{'ab' * 32}", f"blobs/sha256/{'ab' * 32}.meta.json"]
    assert (root / "blobs" / "sha256" / ("ab" * 32)).read_bytes() == b"hello"


def test_write_goes_to_a_temp_file_in_the_target_directory(
    storage: FilesystemStorage, root: Path
) -> None:
    writer = storage.writer(KEY)
    writer.write(b"hel")
    pending = temp_files(root)
    assert len(pending) == 1
    assert os.path.dirname(pending[0]) == "blobs/sha256"
    assert all_files(root) == pending  # nothing at the final name yet
    writer.write(b"lo")
    writer.commit(META)
    assert temp_files(root) == []


def test_no_temp_files_after_abort(storage: FilesystemStorage, root: Path) -> None:
    writer = storage.writer(KEY)
    writer.write(b"hello")
    writer.abort()
    assert all_files(root) == []


def test_crash_after_writing_leaves_no_visible_object(
    storage: FilesystemStorage, root: Path
) -> None:
    """A writer that never commits (the process died) leaves only a temp file, never an object."""
    writer = storage.writer(KEY)
    writer.write(b"hello")
    with pytest.raises(NotFound):
        storage.stat(KEY)
    with pytest.raises(NotFound):
        storage.open(KEY)
    writer.abort()
    with pytest.raises(NotFound):
        storage.stat(KEY)


def test_sidecar_is_renamed_into_place_after_the_data(
    storage: FilesystemStorage, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    renamed: list[str] = []
    real_rename = os.rename

    def recording_rename(src: str, dst: str) -> None:
        renamed.append(os.path.relpath(dst, root))
        real_rename(src, dst)

    monkeypatch.setattr(fs_module.os, "rename", recording_rename)
    writer = storage.writer(KEY)
    writer.write(b"hello")
    writer.commit(META)
    assert renamed == [KEY, keys.sidecar(KEY)]


def _fail_sidecar_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the final step of a commit fail, as a full disk or a crash there would."""
    real_rename = os.rename

    def failing_rename(src: str, dst: str) -> None:
        if dst.endswith(".meta.json"):
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(fs_module.os, "rename", failing_rename)


def test_failed_sidecar_write_leaves_no_visible_object(
    storage: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failing between the data rename and the sidecar rename: the object does not exist."""
    _fail_sidecar_rename(monkeypatch)
    writer = storage.writer(KEY)
    writer.write(b"hello")
    with pytest.raises(StoreError):
        writer.commit(META)
    with pytest.raises(NotFound):
        storage.stat(KEY)


def test_failed_commit_leaves_no_temp_files(
    storage: FilesystemStorage, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_sidecar_rename(monkeypatch)
    writer = storage.writer(KEY)
    writer.write(b"hello")
    with pytest.raises(StoreError):
        writer.commit(META)
    writer.abort()
    assert temp_files(root) == []


def test_write_after_commit_is_refused(storage: FilesystemStorage) -> None:
    writer = storage.writer(KEY)
    writer.write(b"hello")
    writer.commit(META)
    with pytest.raises(StoreError):
        writer.write(b"more")


def test_open_is_unbuffered_for_sendfile(storage: FilesystemStorage) -> None:
    writer = storage.writer(KEY)
    writer.write(b"hello")
    writer.commit(META)
    with storage.open(KEY) as fh:
        assert fh.fileno() >= 0
        assert fh.read() == b"hello"


@pytest.mark.parametrize(
    "key",
    [
        "../escape",
        "blobs/../../escape",
        "manifests/registry.test/../../../etc/passwd",
        "blobs/./sha256/x",
        "blobs//sha256",
        "",
        "/etc/passwd",
        "blobs/sha256/",
        "..",
    ],
)
def test_path_rejects_unsafe_keys(storage: FilesystemStorage, key: str) -> None:
    with pytest.raises(ValueError):
        storage.path(key)


def test_unsafe_keys_are_refused_by_every_operation(storage: FilesystemStorage) -> None:
    key = "manifests/../../escape"
    for operation in (storage.stat, storage.open, storage.writer, storage.delete):
        with pytest.raises(ValueError):
            operation(key)


def test_path_of_a_valid_key_is_inside_the_root(storage: FilesystemStorage, root: Path) -> None:
    key = keys.manifest("[::1]:5000", "org/app", "v1")
    path = Path(storage.path(key)).resolve()
    assert path.is_relative_to(root.resolve())


def test_unreadable_sidecar_is_a_store_error_not_a_miss(
    storage: FilesystemStorage, root: Path
) -> None:
    writer = storage.writer(KEY)
    writer.write(b"hello")
    writer.commit(META)
    sidecar = Path(storage.path(keys.sidecar(KEY)))
    sidecar.unlink()
    sidecar.mkdir()  # reading a directory fails with an OSError other than "not found"
    with pytest.raises(StoreError):
        storage.stat(KEY)


def test_adopt_links_the_verified_file_instead_of_copying(tmp_path: Path) -> None:
    """The spool file becomes the object by hard link: same inode, no second write."""
    storage = FilesystemStorage(str(tmp_path / "cache"))
    spool = tmp_path / "spool-file"
    spool.write_bytes(b"layer bytes")
    key = keys.blob("sha256:" + "a" * 64)
    writer = storage.writer(key)
    assert writer.adopt(str(spool))
    writer.commit(ObjectMeta(digest="sha256:" + "a" * 64, size=11, media_type="x"))
    data = Path(storage.path(key))
    assert data.read_bytes() == b"layer bytes"
    assert data.stat().st_ino == spool.stat().st_ino
    assert [p.name for p in data.parent.iterdir() if p.name.startswith(".tmp-")] == []


def test_stat_checks_the_named_data_too(storage: FilesystemStorage) -> None:
    """On disk the check is one stat(): a sidecar over missing or resized data is a miss."""
    tag = keys.manifest("registry.test", "org/app", "v1")
    writer = storage.writer(tag)
    writer.write(b"hello")
    writer.commit(META)
    assert storage.stat(tag) == META
    data = Path(storage.path(keys.data(tag, DIGEST)))
    data.write_bytes(b"hello, longer")
    with pytest.raises(NotFound):
        storage.stat(tag)
    data.unlink()
    with pytest.raises(NotFound):
        storage.stat(tag)


def test_commit_replaces_the_sidecar_without_unlinking_it(
    storage: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = keys.manifest("registry.test", "org/app", "v1")
    unlinked: list[str] = []
    real_unlink = os.unlink

    def recording_unlink(path: str) -> None:
        unlinked.append(path)
        real_unlink(path)

    monkeypatch.setattr(fs_module.os, "unlink", recording_unlink)
    for _ in range(2):
        writer = storage.writer(tag)
        writer.write(b"hello")
        writer.commit(META)
    assert unlinked == []
    assert storage.stat(tag) == META


def test_a_span_is_a_real_file_positioned_for_sendfile(storage: FilesystemStorage) -> None:
    """gunicorn sends Content-Length bytes from the descriptor's offset: no copy in Python."""
    writer = storage.writer(KEY)
    writer.write(b"hello")
    writer.commit(META)
    with storage.open(KEY, META, 1, 3) as fh:
        fd = fh.fileno()
        assert os.lseek(fd, 0, os.SEEK_CUR) == 1
        assert os.pread(fd, 3, 1) == b"ell"
        buffer = bytearray(10)
        assert fh.readinto(buffer) == 3 and bytes(buffer[:3]) == b"ell"
        assert fh.read() == b""


def test_list_skips_temp_files_and_the_skipped_directory(root: Path) -> None:
    spool = root / "manifests" / "spool.test"  # a spool directory configured under FS_ROOT
    storage = FilesystemStorage(str(root), skip=str(spool))
    writer = storage.writer(KEY)
    writer.write(b"hello")
    writer.commit(META)
    lookalike = root / keys.sidecar(keys.manifest("spool.test", "app", "v1"))
    lookalike.parent.mkdir(parents=True)
    lookalike.write_bytes(META.to_json())  # named like a sidecar, but in the skipped directory
    (root / "blobs" / "sha256" / f"{TEMP_PREFIX}x.meta.json").write_bytes(b"{}")
    assert list(storage.list()) == [KEY]
    unskipped = FilesystemStorage(str(root)).list("manifests/")
    assert list(unskipped) == [keys.manifest("spool.test", "app", "v1")], "found if not skipped"
