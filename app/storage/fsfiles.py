"""Files for the filesystem backend: locked temp files, atomic replacement, span readers.

Every temp file (".tmp-*") is flocked (LOCK_EX) by its writer for the writer's whole
life, so a sweep can tell one left by a dead process from one still being written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import tempfile
import time
from typing import Any

from app.storage import keys

TEMP_PREFIX = ".tmp-"


def key_path(root: str, key: str) -> str:
    """Map a key to its path under root; keys come from app.storage.keys, this is a safety net."""
    return os.path.join(root, *keys.segments(key))


def same_file(fd: int, path: str) -> bool:
    """fd is still the file at path (a sweeper did not unlink it before we locked it)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def locked_temp(directory: str) -> tuple[int, str]:
    """A new temp file in directory, created and flocked by us before anyone may remove it."""
    while True:
        fd, path = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a sweeper holds it only while it unlinks a dead one
        if same_file(fd, path):
            return fd, path
        os.close(fd)  # swept between mkstemp and flock: take another


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte (os.write may write fewer)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def replace_file(path: str, data: bytes) -> None:
    """Put data at path in one atomic step: a locked temp file, fsynced, then renamed."""
    fd, temp = locked_temp(os.path.dirname(path))
    try:
        write_all(fd, data)
        os.fsync(fd)
        os.rename(temp, path)
        temp = ""
    finally:
        os.close(fd)
        if temp:
            with contextlib.suppress(OSError):
                os.unlink(temp)


class SpanFile(io.FileIO):
    """An unbuffered file whose reads stop at end; its fileno still serves sendfile."""

    def __init__(self, path: str, end: int) -> None:
        super().__init__(path, "rb")
        self.end = end

    def read(self, size: int | None = -1) -> bytes:
        """Up to size bytes, never past end."""
        left = self.end - self.tell()
        if left <= 0:
            return b""
        return super().read(left if size is None or size < 0 else min(size, left))

    def readall(self) -> bytes:
        """Everything up to end."""
        chunks = []
        while chunk := self.read(1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)

    def readinto(self, buffer: Any) -> int:
        """Fill buffer, never past end."""
        view = memoryview(buffer).cast("B")
        left = max(0, self.end - self.tell())
        return super().readinto(view[: min(len(view), left)]) if left else 0


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
        if time.time() - st.st_mtime < max_age or not same_file(fd, path):
            return False
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)
