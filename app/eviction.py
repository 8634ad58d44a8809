"""Bounded filesystem cache (SPEC §13): least-recently-used eviction down to 90 % of the bound.

An object is a sidecar plus the data file it names: a blob or digest manifest's data is
its key, a tag's is "<key>.<alg>-<hex>" for the digest in its sidecar (app/storage/keys.py),
so a tag that moved leaves its old data behind, unreferenced: like a data file whose
sidecar never came, it is an orphan, removed once older than ORPHAN_AGE (a commit in
progress is younger). Temp files are removed on the same terms, and only when no live
writer holds their flock. "Last used" is the later of the data file's
atime and mtime: the workers keep hits in memory and write them as atimes now and then
(app/evictor.py), so a hit never costs a disk write. An object being served is held
with a shared flock by FilesystemStorage.open; eviction takes an exclusive flock without
waiting and skips what it cannot lock, so nothing being read is removed. (Were it
removed, Linux would still let the open descriptor read the whole unlinked file.)
Objects being written are temp files, flocked by their writer, and are never touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from app.storage import NotFound, ObjectMeta, keys
from app.storage.fsfiles import TEMP_PREFIX, key_path, remove_dead_temp

LOW_WATER = 0.9  # evict down to this fraction of the bound
ORPHAN_AGE = 600.0  # a half-written or half-deleted object older than this is removed
_TREES = ("blobs", "manifests")


@dataclass(frozen=True)
class Entry:
    """One committed object in the cache."""

    key: str  # storage key, whose sidecar was found
    size: int  # data and sidecar bytes
    last_used: float
    data: str = ""  # the data file the sidecar names, relative to FS_ROOT ("" means key)

    @property
    def data_key(self) -> str:
        """The data file's path relative to FS_ROOT."""
        return self.data or self.key


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


def _named_data(key: str, sidecar_path: str) -> str | None:
    """The data key a sidecar names: the key itself if content-addressed, else from its JSON."""
    if keys.content_digest(key) is not None:
        return key
    try:
        with open(sidecar_path, "rb") as fh:
            meta = ObjectMeta.from_json(fh.read())
        return keys.data(key, meta.digest)
    except (OSError, NotFound, ValueError):
        return None  # gone or damaged: names nothing


def scan(root: str, skip: str | None = None) -> tuple[list[Entry], list[str]]:
    """The committed objects under root, and the paths of old orphans.

    Orphans: data no sidecar names, sidecars without their data, and temp files (dead
    writers' only: sweep checks their flock), all older than ORPHAN_AGE.
    """
    root = os.path.abspath(root)
    skip = os.path.abspath(skip) if skip else None
    data: dict[str, os.stat_result] = {}
    sidecars: dict[str, tuple[str, os.stat_result]] = {}  # key -> sidecar path, its stat
    temps: dict[str, os.stat_result] = {}
    for path, st in _files(root, skip):
        parsed = keys.parse(os.path.relpath(path, root).replace(os.sep, "/"))
        if os.path.basename(path).startswith(TEMP_PREFIX):
            temps[path] = st  # a write in progress, or left by a process that died mid-write
        elif parsed is not None and parsed.part == "sidecar":
            sidecars[parsed.key] = (path, st)
        else:
            data[path] = st  # data, named by a sidecar or not (then an orphan)
    entries: list[Entry] = []
    named: set[str] = set()
    lonely: list[str] = []  # sidecars whose data is missing
    for key, (sidecar_path, side_st) in sidecars.items():
        data_key = _named_data(key, sidecar_path)
        data_path = key_path(root, data_key) if data_key else None
        data_st = data.get(data_path) if data_path else None
        if data_key is None or data_path is None or data_st is None:
            if side_st.st_mtime < time.time() - ORPHAN_AGE:
                lonely.append(sidecar_path)
            continue
        named.add(data_path)
        entries.append(
            Entry(
                key,
                data_st.st_size + side_st.st_size,
                max(data_st.st_atime, data_st.st_mtime),
                "" if data_key == key else data_key,
            )
        )
    old = time.time() - ORPHAN_AGE
    orphans = [p for p, st in data.items() if p not in named and st.st_mtime < old]
    orphans += [p for p, st in temps.items() if st.st_mtime < old]
    orphans += lonely
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
    fd, busy = _locked(key_path(root, entry.data_key))
    if fd is not None:
        os.close(fd)
    return busy


def remove(root: str, entry: Entry) -> bool:
    """Evict one object unless it is in use: sidecar first (it vanishes), then the data."""
    path = key_path(root, entry.data_key)
    fd, busy = _locked(path)
    try:
        if busy:
            return False
        for victim in (key_path(root, keys.sidecar(entry.key)), path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(victim)
        return True
    finally:
        if fd is not None:
            os.close(fd)


def _remove_orphan(path: str) -> bool:
    """Unlink an orphan found by scan, unless it changed since (a commit reused its name)."""
    if os.path.basename(path).startswith(TEMP_PREFIX):
        return remove_dead_temp(path, ORPHAN_AGE)  # never one a live writer holds
    try:
        if os.stat(path).st_mtime >= time.time() - ORPHAN_AGE:
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


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
            result.orphans += _remove_orphan(path)
    if max_bytes is not None:

        def busy(entry: Entry) -> bool:
            taken = in_use(root, entry) if dry_run else not remove(root, entry)
            result.busy += taken
            return taken

        result.evicted = select(entries, max_bytes, busy)
    result.remaining = result.total - sum(entry.size for entry in result.evicted)
    return result
