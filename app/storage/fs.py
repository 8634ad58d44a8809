"""Filesystem backend: temp file plus rename, the sidecar renamed last as the commit marker."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import tempfile
from collections.abc import Callable
from typing import BinaryIO

from app.blocking import run_blocking
from app.storage import NotFound, ObjectMeta, StoreError
from app.storage.keys import sidecar

TEMP_PREFIX = ".tmp-"


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

    def stat(self, key: str) -> ObjectMeta:
        """Read the sidecar: an object without one does not exist."""
        try:
            with open(self.path(sidecar(key)), "rb") as fh:
                return ObjectMeta.from_json(fh.read())
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(key) from None
        except OSError as exc:
            raise StoreError(f"reading sidecar of {key}: {exc}") from exc

    def open(self, key: str) -> BinaryIO:
        """An unbuffered file, so the server can hand its descriptor to sendfile."""
        path = self.path(key)
        try:
            fh = open(path, "rb", buffering=0)  # noqa: SIM115 - the caller closes it
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(key) from None
        except OSError as exc:
            raise StoreError(f"opening {key}: {exc}") from exc
        # Held until closed: eviction (app/eviction.py) skips what readers hold. If eviction
        # holds it this instant, the file is being unlinked and the open descriptor still reads.
        with contextlib.suppress(OSError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        if self.on_open is not None:
            self.on_open(path)
        return fh

    def writer(self, key: str) -> FilesystemWriter:
        """Start a write that nobody can see until commit."""
        return FilesystemWriter(self.path(key), self.path(sidecar(key)), self.on_commit)

    def delete(self, key: str) -> None:
        """Remove sidecar first, so a half-deleted object is already invisible."""
        for path in (self.path(sidecar(key)), self.path(key)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def presign(self, key: str, meta: ObjectMeta) -> str | None:
        """Filesystem hits are served by the proxy itself."""
        return None


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte (os.write may write fewer)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class FilesystemWriter:
    """A temp file in the target directory, renamed into place on commit."""

    def __init__(
        self, data_path: str, sidecar_path: str, on_commit: Callable[[int], None] | None = None
    ) -> None:
        self.data_path = data_path
        self.sidecar_path = sidecar_path
        self.on_commit = on_commit
        self._fd: int | None = None
        self._temp: str | None = None
        self._done = False

    def _open(self) -> int:
        if self._fd is None:
            directory = os.path.dirname(self.data_path)
            try:
                os.makedirs(directory, exist_ok=True)
                self._fd, self._temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
            except OSError as exc:
                raise StoreError(f"creating temp file in {directory}: {exc}") from exc
        return self._fd

    def adopt(self, path: str) -> bool:
        """Take a complete file on the same filesystem as this object's data, by hard link.

        False (and nothing changed) when that is not possible; the caller then writes.
        """
        if self._fd is not None or self._done:
            return False
        directory = os.path.dirname(self.data_path)
        temp = os.path.join(directory, f"{TEMP_PREFIX}{secrets.token_hex(8)}")
        try:
            os.makedirs(directory, exist_ok=True)
            os.link(path, temp)
        except OSError:
            return False
        self._temp = temp
        self._fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC)  # for the fsync at commit
        return True

    def write(self, chunk: bytes) -> None:
        """Append to the temp file."""
        if self._done:
            raise StoreError("write after commit or abort")
        try:
            run_blocking(_write_all, self._open(), chunk)
        except OSError as exc:
            raise StoreError(f"writing {self.data_path}: {exc}") from exc

    def commit(self, meta: ObjectMeta) -> None:
        """Make the verified object visible: data renamed first, then the sidecar."""
        fd = self._open()
        side_temp: str | None = None
        renamed = False
        try:
            run_blocking(os.fsync, fd)
            os.close(fd)
            self._fd = None
            # Hide any previous version first, so its sidecar never describes new bytes.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.sidecar_path)
            os.rename(self._temp, self.data_path)  # type: ignore[arg-type]
            self._temp, renamed = None, True
            side_fd, side_temp = tempfile.mkstemp(
                prefix=TEMP_PREFIX, dir=os.path.dirname(self.sidecar_path)
            )
            try:
                _write_all(side_fd, meta.to_json())
                os.fsync(side_fd)
            finally:
                os.close(side_fd)
            os.rename(side_temp, self.sidecar_path)
        except OSError as exc:
            for leftover in (side_temp, self.data_path if renamed else None):
                if leftover is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(leftover)
            self.abort()
            raise StoreError(f"committing {self.data_path}: {exc}") from exc
        self._done = True
        if self.on_commit is not None:
            self.on_commit(meta.size)

    def abort(self) -> None:
        """Drop the temp file; idempotent, never raises."""
        self._done = True
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._temp)
            self._temp = None
