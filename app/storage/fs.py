"""Filesystem backend: temp file plus rename, the sidecar renamed last as the commit marker.

Data goes under keys.data(key, digest) (a tag's data is named after its digest), so
concurrent commits of one key never rename different bytes onto one name, and the
sidecar, replaced in one rename, always names data holding exactly the bytes it describes
(SPEC §15). Temp files are flocked by their writers (app/storage/fsfiles.py), so sweep
can tell one left by a dead process from one still being written.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

from app.blocking import run_blocking
from app.storage import BlobWriter, NotFound, ObjectMeta, Storage, StoreError, keys, span_end
from app.storage.fsfiles import (
    TEMP_PREFIX,
    SpanFile,
    key_path,
    locked_temp,
    remove_dead_temp,
    replace_file,
    same_file,
    sweep_temp_files,
    write_all,
)
from app.storage.keys import sidecar

__all__ = ["TEMP_PREFIX", "FilesystemStorage", "FilesystemWriter", "remove_dead_temp"]


class FilesystemStorage:
    """Objects as plain files under FS_ROOT, so hits can be served with sendfile."""

    def __init__(self, root: str, skip: str | None = None) -> None:
        self.root = os.path.abspath(root)
        # A directory under root that is not the cache's (the spool, if configured there).
        self.skip = os.path.abspath(skip) if skip else None
        os.makedirs(self.root, exist_ok=True)

    def path(self, key: str) -> str:
        """Map a key to a path; keys come from app.storage.keys, this is a last safety net."""
        return key_path(self.root, key)

    def data_path(self, key: str, meta: ObjectMeta) -> str:
        """The file holding the bytes meta describes; NotFound if meta cannot be key's."""
        return self.path(meta.data_key(key))

    def _read_sidecar(self, key: str) -> ObjectMeta:
        try:
            with open(self.path(sidecar(key)), "rb") as fh:
                return ObjectMeta.from_json(fh.read())
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(key) from None
        except OSError as exc:
            raise StoreError(f"reading sidecar of {key}: {exc}") from exc

    def _check_data(self, key: str, meta: ObjectMeta, says: str) -> None:
        """NotFound unless the data meta names is there with meta's size (says: whose size)."""
        try:
            size = os.stat(self.data_path(key, meta)).st_size
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{key}: no data for {meta.digest}") from None
        except OSError as exc:
            raise StoreError(f"checking the data of {key}: {exc}") from exc
        if size != meta.size:
            raise NotFound(f"{key}: data of {size} bytes, {says} says {meta.size}")

    def stat(self, key: str) -> ObjectMeta:
        """Read the sidecar: an object without one, or whose data disagrees, does not exist."""
        meta = self._read_sidecar(key)
        self._check_data(key, meta, "sidecar")
        return meta

    def open(
        self, key: str, meta: ObjectMeta | None = None, offset: int = 0, length: int | None = None
    ) -> BinaryIO:
        """The span of the data meta describes, unbuffered so the server can sendfile it.

        meta None reads the sidecar first. NotFound when that data is missing or its size
        is not meta's: the caller treats the key as a miss.
        """
        if meta is None:
            meta = self._read_sidecar(key)
        end = span_end(meta.size, offset, length)
        path = self.data_path(key, meta)
        try:
            fh = SpanFile(path, end)
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
        fh.seek(offset)
        return fh

    def writer(self, key: str) -> FilesystemWriter:
        """Start a write that nobody can see until commit."""
        return FilesystemWriter(self, key)

    def update_meta(self, key: str, meta: ObjectMeta) -> None:
        """Replace only the sidecar (a tag's freshness, its sources); the data stays as it is."""
        self._check_data(key, meta, "meta")
        try:
            replace_file(self.path(sidecar(key)), meta.to_json())
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

    def list(self, prefix: str = "") -> Iterator[str]:
        """Committed keys under prefix: files named like a sidecar (keys.parse), temp files not."""
        head = prefix.rpartition("/")[0]
        top = self.path(head) if head else self.root
        for directory, dirs, files in os.walk(top):
            if self.skip is not None:
                dirs[:] = [d for d in dirs if os.path.join(directory, d) != self.skip]
            for name in files:
                if name.startswith(TEMP_PREFIX):
                    continue
                stored = os.path.relpath(os.path.join(directory, name), self.root)
                parsed = keys.parse(stored.replace(os.sep, "/"))
                if parsed is None or parsed.part != "sidecar":
                    continue
                if parsed.key.startswith(prefix):
                    yield parsed.key

    def sweep(self, max_age: float = 0.0) -> int:
        """Remove temp files of dead writers (not flocked) older than max_age; how many went.

        Run at start and by `oci-pull-through gc`: a writer killed mid-write leaves its
        temp file behind. A live writer holds its flock, so its file is never touched.
        """
        return sweep_temp_files(self.root, max_age, self.skip)

    def sweep_temp(self, max_age: float = 0.0, skip: str | None = None) -> int:
        """sweep, skipping another directory: kept for callers written before sweep."""
        return sweep_temp_files(self.root, max_age, skip or self.skip)


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
                self._fd, self._temp = locked_temp(self.directory)
            except OSError as exc:
                raise StoreError(f"creating temp file in {self.directory}: {exc}") from exc
        return self._fd

    def may_adopt(self) -> bool:
        """A file on the same filesystem can be linked in: worth trying before writing."""
        return True

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
        if not same_file(fd, temp):  # swept before we locked it: write instead
            os.close(fd)
            return False
        self._fd, self._temp = fd, temp
        return True

    def write(self, chunk: bytes) -> None:
        """Append to the temp file."""
        if self._done:
            raise StoreError("write after commit or abort")
        try:
            run_blocking(write_all, self._open(), chunk)
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
        temp = self._temp
        assert temp is not None  # _open sets both
        try:
            run_blocking(os.fsync, fd)
            # Renamed while still locked, so no sweeper can take the temp file from under us.
            os.rename(temp, data_path)
            self._temp = None
            os.close(fd)
            self._fd = None
            # A failure from here leaves the data without a sidecar naming it: invisible, and
            # removed by eviction later. Deleting it could remove what a concurrent committer's
            # sidecar (same digest) names.
            replace_file(self.storage.path(sidecar(self.key)), meta.to_json())
        except OSError as exc:
            self.abort()
            raise StoreError(f"committing {self.key}: {exc}") from exc
        self._done = True

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


if TYPE_CHECKING:

    def _conforms(
        storage: FilesystemStorage, writer: FilesystemWriter
    ) -> tuple[Storage, BlobWriter]:
        """Never called: mypy fails here when this backend drifts from the protocol."""
        return storage, writer
