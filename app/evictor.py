"""The worker's side of the bounded filesystem cache: use tracking and background sweeps.

TrackedStorage wraps the backend (create_app builds it) and reports every open and commit
through it to the Evictor. Hits are remembered in memory and written as the data files'
atimes every few seconds (one write per object per interval, never one per hit). A worker
sweeps when its commits may have pushed the cache past FS_MAX_BYTES, and every
SCAN_INTERVAL; a lock in the spool directory lets one worker of the instance sweep at a
time, and a small state file keeps the instance's running total (the last scan plus every
commit since, from all workers).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

from app import metrics
from app.blocking import run_blocking
from app.eviction import SweepResult, sweep, sweep_lock
from app.storage import BlobWriter, ObjectMeta, Storage, keys
from app.storage.fsfiles import key_path

log = logging.getLogger("oci_pull_through.eviction")

FLUSH_INTERVAL = 2.0  # seconds between writing remembered hits as atimes
SCAN_INTERVAL = 60.0  # the cache is rescanned (size gauge, eviction) at least this often
STATE = "evict.json"


class AccessTracker:
    """Last-use times held in memory, written to the files' atimes in batches."""

    def __init__(self) -> None:
        self._used: dict[str, float] = {}
        self._lock = threading.Lock()

    def touch(self, path: str) -> None:
        """Remember a use; no I/O."""
        self._used[path] = time.time()

    def flush(self) -> int:
        """Write the remembered uses as atimes (mtime kept); returns how many were written."""
        with self._lock:
            used, self._used = self._used, {}
        for path, when in used.items():
            with contextlib.suppress(FileNotFoundError):
                os.utime(path, (when, os.stat(path).st_mtime))
        return len(used)


class Evictor:
    """Per worker: tracks use of the filesystem cache at root and keeps it under max_bytes."""

    def __init__(self, root: str, state_dir: str, max_bytes: int | None) -> None:
        self.root = os.path.abspath(root)
        self.state_dir = state_dir
        self.max_bytes = max_bytes
        self.tracker = AccessTracker()
        self._wake = threading.Event()
        self._started = False
        metrics.FS_CACHE_LIMIT.set(max_bytes or 0)

    def track(self, storage: Storage) -> TrackedStorage:
        """The storage the app uses: storage (the one at root) reporting its use to us."""
        return TrackedStorage(storage, self)

    def used(self, key: str, meta: ObjectMeta) -> None:
        """A hit on the data meta describes: remembered, written as its atime later."""
        with contextlib.suppress(ValueError):
            self.tracker.touch(key_path(self.root, keys.data(key, meta.digest)))

    def committed(self, size: int) -> None:
        """A new object: add it to the instance's running total; sweep soon if past the bound."""
        if self.max_bytes is None:
            return
        with self._state_lock():
            state = self._state()
            total = int(state.get("total", 0)) + size
            self._save_state(total, float(state.get("at", 0)))
        if total > self.max_bytes:
            self._wake.set()

    def start(self) -> None:
        """Start the background loop once (only bounded caches need one)."""
        if self._started or self.max_bytes is None:
            return
        self._started = True
        threading.Thread(target=self._loop, name="oci-evictor", daemon=True).start()

    def _loop(self) -> None:
        while True:
            woken = self._wake.wait(timeout=FLUSH_INTERVAL)
            self._wake.clear()
            try:
                run_blocking(self.tracker.flush)
                age = time.time() - float(self._state().get("at", 0))
                if woken or age >= SCAN_INTERVAL:
                    self.run()
            except Exception:
                log.exception("cache eviction failed")

    def refresh_size(self) -> None:
        """For /metrics: rescan if no worker has for SCAN_INTERVAL, so the size gauge is current."""
        if time.time() - float(self._state().get("at", 0)) >= SCAN_INTERVAL:
            try:
                self.run()
            except Exception:
                log.exception("cache scan failed")

    def run(self) -> SweepResult | None:
        """One sweep now, unless another worker is sweeping; updates the gauges and state."""
        with sweep_lock(self.state_dir, wait=False) as mine:
            if not mine:
                return None
            scan = functools.partial(sweep, self.root, self.max_bytes, skip=self.state_dir)
            result = run_blocking(scan)
            with self._state_lock():
                self._save_state(result.remaining, time.time())
        metrics.FS_CACHE_BYTES.set(result.remaining)
        if result.evicted:
            metrics.EVICTED.inc(len(result.evicted))
            metrics.EVICTED_BYTES.inc(result.total - result.remaining)
            log.info(
                "evicted %d objects (%d bytes) to stay under FS_MAX_BYTES=%d; %d in use kept",
                len(result.evicted),
                result.total - result.remaining,
                self.max_bytes or 0,
                result.busy,
            )
        return result

    def _state(self) -> dict[str, float]:
        try:
            with open(os.path.join(self.state_dir, STATE)) as fh:
                state = json.load(fh)
            return state if isinstance(state, dict) else {}
        except (OSError, ValueError):
            return {}

    @contextlib.contextmanager
    def _state_lock(self) -> Iterator[None]:
        """Serialise read-modify-write of the state file across the instance's workers."""
        os.makedirs(self.state_dir, exist_ok=True)
        fd = os.open(os.path.join(self.state_dir, STATE + ".lock"), os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _save_state(self, total: int, at: float) -> None:
        """The instance's running total (scanned, plus commits since) and the last scan's time."""
        path = os.path.join(self.state_dir, STATE)
        temp = f"{path}.{os.getpid()}"
        with open(temp, "w") as fh:
            json.dump({"total": total, "at": at}, fh)
        os.replace(temp, path)


class TrackedStorage:
    """A Storage that reports every open (a use) and commit (new bytes) to an Evictor."""

    def __init__(self, inner: Storage, evictor: Evictor) -> None:
        self.inner = inner
        self.evictor = evictor

    def stat(self, key: str) -> ObjectMeta:
        """As the inner storage; a stat is not a use."""
        return self.inner.stat(key)

    def open(
        self, key: str, meta: ObjectMeta | None = None, offset: int = 0, length: int | None = None
    ) -> BinaryIO:
        """Open through the inner storage and record the use of the data opened."""
        if meta is None:
            meta = self.inner.stat(key)  # which data is opened decides which file was used
        fh = self.inner.open(key, meta, offset, length)
        self.evictor.used(key, meta)
        return fh

    def writer(self, key: str) -> BlobWriter:
        """A writer whose commit adds its bytes to the instance's running total."""
        return TrackedWriter(self.inner.writer(key), self.evictor)

    def update_meta(self, key: str, meta: ObjectMeta) -> None:
        """As the inner storage: only the sidecar changes, no new bytes."""
        self.inner.update_meta(key, meta)

    def delete(self, key: str) -> None:
        """As the inner storage; the next scan sees the space freed."""
        self.inner.delete(key)

    def presign(self, key: str, meta: ObjectMeta) -> str | None:
        """As the inner storage."""
        return self.inner.presign(key, meta)

    def list(self, prefix: str = "") -> Iterator[str]:
        """As the inner storage."""
        return self.inner.list(prefix)

    def sweep(self, max_age: float = 0.0) -> int:
        """As the inner storage."""
        return self.inner.sweep(max_age)


class TrackedWriter:
    """A BlobWriter that tells the Evictor how many bytes each commit added."""

    def __init__(self, inner: BlobWriter, evictor: Evictor) -> None:
        self.inner = inner
        self.evictor = evictor

    def write(self, chunk: bytes) -> None:
        """As the inner writer."""
        self.inner.write(chunk)

    def may_adopt(self) -> bool:
        """As the inner writer."""
        return self.inner.may_adopt()

    def adopt(self, path: str) -> bool:
        """As the inner writer."""
        return self.inner.adopt(path)

    def commit(self, meta: ObjectMeta) -> None:
        """Commit, then count meta.size towards FS_MAX_BYTES (a sweep comes if past it)."""
        self.inner.commit(meta)
        self.evictor.committed(meta.size)

    def abort(self) -> None:
        """As the inner writer."""
        self.inner.abort()


if TYPE_CHECKING:

    def _conforms(storage: TrackedStorage, writer: TrackedWriter) -> tuple[Storage, BlobWriter]:
        """Never called: mypy fails here when the wrapper drifts from the protocol."""
        return storage, writer
