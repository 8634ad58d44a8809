"""Bounded filesystem cache (SPEC §13): least-recently-used eviction down to 90 % of the bound.

An object is a data file plus its sidecar. "Last used" is the later of the data file's
atime and mtime: the workers keep hits in memory and write them as atimes now and then
(app/evictor.py), so a hit never costs a disk write. An object being served is held
with a shared flock by FilesystemStorage.open; eviction takes an exclusive flock without
waiting and skips what it cannot lock, so nothing being read is removed. (Were it
removed, Linux would still let the open descriptor read the whole unlinked file.)
Objects being written are temp files and are never looked at.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from app.storage.fs import TEMP_PREFIX
from app.storage.keys import SIDECAR_SUFFIX

LOW_WATER = 0.9  # evict down to this fraction of the bound
ORPHAN_AGE = 600.0  # a half-written or half-deleted object older than this is removed
_TREES = ("blobs", "manifests")


@dataclass(frozen=True)
class Entry:
    """One committed object in the cache."""

    key: str  # storage key: the data file's path relative to FS_ROOT
    size: int  # data and sidecar bytes
    last_used: float


@dataclass
class SweepResult:
    """What a sweep found and did."""

    total: int = 0  # bytes of committed objects before eviction
    remaining: int = 0
    evicted: list[Entry] = field(default_factory=list)
    busy: int = 0  # objects chosen but in use, left in place
    orphans: int = 0


def select(
    entries: Iterable[Entry], max_bytes: int, busy: Callable[[Entry], bool] | None = None
) -> list[Entry]:
    """The objects to evict, least recently used first, until 90 % of max_bytes is reached.

    Nothing is chosen while the total is within max_bytes. busy(entry) is asked in LRU order
    and a busy object is passed over for the next one.
    """
    entries = list(entries)
    total = sum(entry.size for entry in entries)
    if total <= max_bytes:
        return []
    goal = int(max_bytes * LOW_WATER)
    chosen: list[Entry] = []
    for entry in sorted(entries, key=lambda e: (e.last_used, e.key)):
        if total <= goal:
            break
        if busy is not None and busy(entry):
            continue
        chosen.append(entry)
        total -= entry.size
    return chosen


def _files(root: str, skip: str | None) -> Iterator[tuple[str, os.stat_result]]:
    """Every regular file under the cache trees (temp files included), not the spool directory."""
    for tree in _TREES:
        for directory, dirs, files in os.walk(os.path.join(root, tree)):
            if skip is not None:
                dirs[:] = [d for d in dirs if os.path.join(directory, d) != skip]
            for name in files:
                path = os.path.join(directory, name)
                with contextlib.suppress(FileNotFoundError):
                    yield path, os.stat(path, follow_symlinks=False)


def scan(root: str, skip: str | None = None) -> tuple[list[Entry], list[str]]:
    """The committed objects under root, and the paths of old orphans (data or sidecar alone)."""
    root = os.path.abspath(root)
    skip = os.path.abspath(skip) if skip else None
    data: dict[str, os.stat_result] = {}
    sidecars: dict[str, os.stat_result] = {}
    temps: dict[str, os.stat_result] = {}
    for path, st in _files(root, skip):
        if os.path.basename(path).startswith(TEMP_PREFIX):
            temps[path] = st  # a write in progress, or left by a process that died mid-write
        elif path.endswith(SIDECAR_SUFFIX):
            sidecars[path[: -len(SIDECAR_SUFFIX)]] = st
        else:
            data[path] = st
    entries = [
        Entry(
            os.path.relpath(path, root).replace(os.sep, "/"),
            st.st_size + sidecars[path].st_size,
            max(st.st_atime, st.st_mtime),
        )
        for path, st in data.items()
        if path in sidecars
    ]
    old = time.time() - ORPHAN_AGE
    orphans = [p for p, st in data.items() if p not in sidecars and st.st_mtime < old]
    orphans += [p for p, st in temps.items() if st.st_mtime < old]
    orphans += [
        p + SIDECAR_SUFFIX for p, st in sidecars.items() if p not in data and st.st_mtime < old
    ]
    return entries, orphans


def _locked(path: str) -> tuple[int | None, bool]:
    """Open path and try an exclusive flock: (fd or None if gone, whether it is in use)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        return fd, True
    return fd, False


def in_use(root: str, entry: Entry) -> bool:
    """True while some reader holds the object open (FilesystemStorage.open's shared flock)."""
    fd, busy = _locked(os.path.join(root, entry.key))
    if fd is not None:
        os.close(fd)
    return busy


def remove(root: str, entry: Entry) -> bool:
    """Evict one object unless it is in use: sidecar first (it vanishes), then the data."""
    path = os.path.join(root, entry.key)
    fd, busy = _locked(path)
    try:
        if busy:
            return False
        for victim in (path + SIDECAR_SUFFIX, path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(victim)
        return True
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def sweep_lock(state_dir: str, wait: bool) -> Iterator[bool]:
    """One sweep at a time per instance (workers and the gc command); yields False if busy."""
    os.makedirs(state_dir, exist_ok=True)
    fd = os.open(os.path.join(state_dir, "evict.lock"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def sweep(
    root: str, max_bytes: int | None, *, dry_run: bool = False, skip: str | None = None
) -> SweepResult:
    """Scan the cache and, past max_bytes, evict least-recently-used objects to 90 % of it."""
    root = os.path.abspath(root)
    entries, orphans = scan(root, skip)
    result = SweepResult(total=sum(entry.size for entry in entries))
    if not dry_run:
        for path in orphans:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        result.orphans = len(orphans)
    if max_bytes is not None:

        def busy(entry: Entry) -> bool:
            taken = in_use(root, entry) if dry_run else not remove(root, entry)
            result.busy += taken
            return taken

        result.evicted = select(entries, max_bytes, busy)
    result.remaining = result.total - sum(entry.size for entry in result.evicted)
    return result
