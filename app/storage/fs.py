"""Filesystem backend: temp file plus rename, the sidecar renamed last as the commit marker.

Data goes under keys.data(key, digest) (a tag's data is named after its digest), so
concurrent commits of one key never rename different bytes onto one name, and the
sidecar, replaced in one rename, always names data holding exactly the bytes it describes
(SPEC §15). Every temp file (".tmp-*") is flocked (LOCK_EX) by its writer for the writer's
whole life, so sweep_temp can tell one left by a dead process from one still being written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from typing import BinaryIO

from app.blocking import run_blocking
from app.storage import NotFound, ObjectMeta, StoreError, keys
from app.storage.keys import sidecar

TEMP_PREFIX = ".tmp-"


def _same_file(fd: int, path: str) -> bool:
    """fd is still the file at path (a sweeper did not unlink it before we locked it)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _locked_temp(directory: str) -> tuple[int, str]:
    """A new temp file in directory, created and flocked by us before anyone may remove it."""
    while True:
        fd, path = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a sweeper holds it only while it unlinks a dead one
        if _same_file(fd, path):
            return fd, path
        os.close(fd)  # swept between mkstemp and flock: take another


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte (os.write may write fewer)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _replace_file(path: str, data: bytes) -> None:
    """Put data at path in one atomic step: a locked temp file, fsynced, then renamed."""
    fd, temp = _locked_temp(os.path.dirname(path))
    try:
        _write_all(fd, data)
        os.fsync(fd)
        os.rename(temp, path)
        temp = ""
    finally:
        os.close(fd)
        if temp:
            with contextlib.suppress(OSError):
                os.unlink(temp)


class FilesystemStorage:
    """Objects as plain files under FS_ROOT, so hits can be served with sendfile."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        # Set by app/evictor.py when FS_MAX_BYTES bounds the cache: use tracking, new objects.
        self.on_open: Callable[[str], None] | None = None
        self.on_commit: Callable[[int], None] | None = None

    def path(self, key: str) -> str:
        """Map a key to a path; keys come from app.storage.keys, this is a last safety net."""
        parts = key.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"unsafe storage key {key!r}")
        return os.path.join(self.root, *parts)

    def data_path(self, key: str, meta: ObjectMeta) -> str:
        """The file holding the bytes meta describes; NotFound if meta cannot be key's."""
        try:
            return self.path(keys.data(key, meta.digest))
        except ValueError:
            raise NotFound(f"{key}: sidecar names {meta.digest}") from None

    def _read_sidecar(self, key: str) -> ObjectMeta:
        try:
            with open(self.path(sidecar(key)), "rb") as fh:
                return ObjectMeta.from_json(fh.read())
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(key) from None
        except OSError as exc:
            raise StoreError(f"reading sidecar of {key}: {exc}") from exc

    def stat(self, key: str) -> ObjectMeta:
        """Read the sidecar: an object without one, or whose data disagrees, does not exist."""
        meta = self._read_sidecar(key)
        try:
            size = os.stat(self.data_path(key, meta)).st_size
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{key}: no data for {meta.digest}") from None
        except OSError as exc:
            raise StoreError(f"checking the data of {key}: {exc}") from exc
        if size != meta.size:
            raise NotFound(f"{key}: data of {size} bytes, sidecar says {meta.size}")
        return meta

    def open(self, key: str, meta: ObjectMeta | None = None) -> BinaryIO:
        """The data meta describes, unbuffered so the server can hand it to sendfile.

        meta None reads the sidecar first. NotFound when that data is missing or its size
        is not meta's: the caller treats the key as a miss.
        """
        if meta is None:
            meta = self._read_sidecar(key)
        path = self.data_path(key, meta)
        try:
            fh = open(path, "rb", buffering=0)  # noqa: SIM115 - the caller closes it
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(key) from None
        except OSError as exc:
            raise StoreError(f"opening {key}: {exc}") from exc
        size = os.fstat(fh.fileno()).st_size
        if size != meta.size:
            fh.close()
            raise NotFound(f"{key}: data of {size} bytes, sidecar says {meta.size}")
        # Held until closed: eviction (app/eviction.py) skips what readers hold. If eviction
        # holds it this instant, the file is being unlinked and the open descriptor still reads.
        with contextlib.suppress(OSError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        if self.on_open is not None:
            self.on_open(path)
        return fh  # type: ignore[return-value]

    def writer(self, key: str) -> FilesystemWriter:
        """Start a write that nobody can see until commit."""
        return FilesystemWriter(self, key)

    def update_meta(self, key: str, meta: ObjectMeta) -> None:
        """Replace only the sidecar (a tag's freshness, its sources); the data stays as it is."""
        try:
            size = os.stat(self.data_path(key, meta)).st_size
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{key}: no data for {meta.digest}") from None
        except OSError as exc:
            raise StoreError(f"checking the data of {key}: {exc}") from exc
        if size != meta.size:
            raise NotFound(f"{key}: data of {size} bytes, meta says {meta.size}")
        try:
            _replace_file(self.path(sidecar(key)), meta.to_json())
        except OSError as exc:
            raise StoreError(f"updating the sidecar of {key}: {exc}") from exc

    def delete(self, key: str) -> None:
        """Remove sidecar first, so a half-deleted object is already invisible; then its data."""
        victims = [self.path(key)]
        with contextlib.suppress(NotFound, StoreError):
            victims.append(self.data_path(key, self._read_sidecar(key)))
        for path in (self.path(sidecar(key)), *victims):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError):
                os.unlink(path)

    def presign(self, key: str, meta: ObjectMeta) -> str | None:
        """Filesystem hits are served by the proxy itself."""
        return None

    def sweep_temp(self, max_age: float = 0.0, skip: str | None = None) -> int:
        """Remove temp files of dead writers (not flocked) older than max_age; how many went.

        Run at start and by `oci-pull-through gc`: a writer killed mid-write leaves its
        temp file behind. A live writer holds its flock, so its file is never touched.
        """
        return sweep_temp_files(self.root, max_age, skip)


def sweep_temp_files(root: str, max_age: float = 0.0, skip: str | None = None) -> int:
    """Remove every unlocked ".tmp-*" file under root older than max_age seconds."""
    skip = os.path.abspath(skip) if skip else None
    removed = 0
    for directory, dirs, files in os.walk(root):
        if skip is not None:
            dirs[:] = [d for d in dirs if os.path.join(directory, d) != skip]
        for name in files:
            if name.startswith(TEMP_PREFIX):
                removed += remove_dead_temp(os.path.join(directory, name), max_age)
    return removed


def remove_dead_temp(path: str, max_age: float = 0.0) -> bool:
    """Unlink path if no live writer holds it and it is at least max_age old."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False  # a live writer
            raise
        st = os.fstat(fd)
        if time.time() - st.st_mtime < max_age or not _same_file(fd, path):
            return False
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)


class FilesystemWriter:
    """A locked temp file in the target directory, renamed into place on commit."""

    def __init__(self, storage: FilesystemStorage, key: str) -> None:
        self.storage = storage
        self.key = key
        self.directory = os.path.dirname(storage.path(key))
        self._fd: int | None = None
        self._temp: str | None = None
        self._done = False

    def _open(self) -> int:
        if self._fd is None:
            try:
                os.makedirs(self.directory, exist_ok=True)
                self._fd, self._temp = _locked_temp(self.directory)
            except OSError as exc:
                raise StoreError(f"creating temp file in {self.directory}: {exc}") from exc
        return self._fd

    def adopt(self, path: str) -> bool:
        """Take a complete file on the same filesystem as this object's data, by hard link.

        False (and nothing changed) when that is not possible; the caller then writes.
        """
        if self._fd is not None or self._done:
            return False
        temp = os.path.join(self.directory, f"{TEMP_PREFIX}{secrets.token_hex(8)}")
        try:
            os.makedirs(self.directory, exist_ok=True)
            os.link(path, temp)
        except OSError:
            return False
        fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC)  # for the flock, and the fsync at commit
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not _same_file(fd, temp):  # swept before we locked it: write instead
            os.close(fd)
            return False
        self._fd, self._temp = fd, temp
        return True

    def write(self, chunk: bytes) -> None:
        """Append to the temp file."""
        if self._done:
            raise StoreError("write after commit or abort")
        try:
            run_blocking(_write_all, self._open(), chunk)
        except OSError as exc:
            raise StoreError(f"writing {self.key}: {exc}") from exc

    def commit(self, meta: ObjectMeta) -> None:
        """Make the verified object visible: data renamed to its digest's name, then the sidecar.

        No old sidecar is removed first: the new one replaces it in one rename, and each
        names its own data, so no interleaving of writers leaves a sidecar over other bytes.
        """
        if self._done:
            raise StoreError("commit after commit or abort")
        try:
            data_path = self.storage.path(keys.data(self.key, meta.digest))
        except ValueError as exc:
            self.abort()
            raise StoreError(f"committing {self.key}: {exc}") from exc
        fd = self._open()
        try:
            run_blocking(os.fsync, fd)
            # Renamed while still locked, so no sweeper can take the temp file from under us.
            os.rename(self._temp, data_path)  # type: ignore[arg-type]
            self._temp = None
            os.close(fd)
            self._fd = None
            # A failure from here leaves the data without a sidecar naming it: invisible, and
            # removed by eviction later. Deleting it could remove what a concurrent committer's
            # sidecar (same digest) names.
            _replace_file(self.storage.path(sidecar(self.key)), meta.to_json())
        except OSError as exc:
            self.abort()
            raise StoreError(f"committing {self.key}: {exc}") from exc
        self._done = True
        if self.storage.on_commit is not None:
            self.storage.on_commit(meta.size)

    def abort(self) -> None:
        """Drop the temp file; idempotent, never raises."""
        self._done = True
        if self._temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._temp)  # unlinked while still locked
            self._temp = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
