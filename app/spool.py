"""The spool of a flight: the files one fetcher writes and every reader of the instance tails.

  <h>.lock     flock(LOCK_EX) held by the fetcher for its whole life
  <h>.readers  flock(LOCK_SH) held by every reader; the fetcher stops when none is left
  <h>.state    JSON: status, headers, Content-Length and the spool's nonce (or an error);
               a body of unknown length is only shared within the fetcher's worker
  <h>.<nonce>  the body as it arrives

SpoolWriter is the fetcher's side; app/flight.py decides who fetches and hands readers
their place. sweep_leftovers removes what a killed fetcher left (at start, and `gc`).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import gevent.event

from app.blocking import run_blocking
from app.errors import RegistryError
from app.tee import SourceFailed

CHUNK = 1024 * 1024
POLL = 0.01
RECENT = 8  # chunks kept in memory per flight (at most 8 MiB)
RECENT_BUDGET = 32 * CHUNK  # bytes kept so by all flights of a worker together (issue 16)
_recent_held = 0  # bytes in every SpoolWriter._recent of this worker
# <h>.lock, <h>.readers, <h>.state, <h>.state.<nonce> (being written), <h>.<nonce> (spool)
_FLIGHT_FILE = re.compile(
    r"([0-9a-f]{40})\.(?:lock|readers|state|state\.[0-9a-f]{16}|[0-9a-f]{16})"
)
SPOOL_FILE = re.compile(r"[0-9a-f]{40}\.[0-9a-f]{16}")


@dataclass(frozen=True)
class Head:
    """What upstream answered, published to every reader before the body."""

    status: int
    headers: list[tuple[str, str]]
    length: int | None


def try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def lock_free(fd: int, operation: int) -> bool:
    """Whether the flock could be taken now: nobody holds it in a conflicting mode. Released
    at once, so it only tests."""
    if try_flock(fd, operation):
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    return False


def remove(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class Wakeups:
    """Per-worker events that wake this worker's readers when a flight's files change."""

    def __init__(self) -> None:
        self._events: dict[str, gevent.event.Event] = {}

    def event(self, base: str) -> gevent.event.Event:
        """The event the next change of this flight will set."""
        event = self._events.get(base)
        if event is None:
            event = self._events[base] = gevent.event.Event()
        return event

    def notify(self, base: str) -> None:
        """Wake whoever waits on this flight."""
        event = self._events.pop(base, None)
        if event is not None:
            event.set()


def sweep_leftovers(spool_dir: str) -> int:
    """Remove the files of flights no live process holds (their fetcher died); how many went.

    A flight is left alone while its fetcher holds <h>.lock or any reader holds
    <h>.readers. Other files in the directory (eviction state) are never touched.
    """
    spool_dir = os.path.abspath(spool_dir)
    flights: dict[str, list[str]] = {}
    try:
        names = os.listdir(spool_dir)
    except FileNotFoundError:
        return 0
    for name in names:
        match = _FLIGHT_FILE.fullmatch(name)
        if match is not None:
            flights.setdefault(match[1], []).append(name)
    removed = 0
    for h, files in flights.items():
        removed += _sweep_flight(os.path.join(spool_dir, h), files)
    return removed


def _sweep_flight(base: str, files: list[str]) -> int:
    """Remove one flight's files if both its locks can be taken now (as a finishing fetcher)."""
    directory = os.path.dirname(base)
    held: list[int] = []
    try:
        for suffix in (".lock", ".readers"):
            # The lock is created if missing, as join() does: held by us, no new leader can
            # start this flight while its files go.
            flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
            flags |= os.O_CREAT if suffix == ".lock" else 0
            try:
                fd = os.open(base + suffix, flags, 0o600)
            except FileNotFoundError:
                continue
            held.append(fd)
            if not try_flock(fd, fcntl.LOCK_EX) or os.fstat(fd).st_ino != inode(base + suffix):
                return 0  # a live fetcher or reader (or the file was just replaced)
        # Like SpoolWriter.close: everything else first, the lock last.
        lock = os.path.basename(base) + ".lock"
        victims = [name for name in files if name != lock] + [lock]
        remove(*(os.path.join(directory, name) for name in victims))
        return len(files)
    finally:
        for fd in held:
            os.close(fd)


def inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def read_state(path: str) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (FileNotFoundError, ValueError):
        return None


class SpoolWriter:
    """The fetcher's side: publish the head, append body bytes, learn whether anyone listens."""

    def __init__(self, wakeups: Wakeups, base: str) -> None:
        self.wakeups = wakeups
        self.base = base
        self.nonce = secrets.token_hex(8)
        self.spool_path = f"{base}.{self.nonce}"
        self._fd = os.open(
            self.spool_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600
        )
        self._check_fd = os.open(base + ".readers", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        self.written = 0
        self.head: Head | None = None
        # The last chunks, so readers in this worker that keep up skip the read-back.
        self._recent: collections.deque[tuple[int, bytes]] = collections.deque()
        self.finished = False
        self.complete = False
        self.reason = ""
        self.error: RegistryError | None = None
        self._head: dict[str, object] | None = None

    def publish(self, head: Head) -> None:
        """Make status and headers visible to readers (atomically)."""
        self.head = head
        self._head = {
            "status": head.status,
            "headers": head.headers,
            "length": head.length,
            "nonce": self.nonce,
        }
        self._write_state(self._head)

    def fail_before_head(self, error: RegistryError) -> None:
        """Tell readers the request failed before upstream answered."""
        self.error = error
        self._write_state(
            {"error": {"status": error.status, "code": error.code, "message": error.message}}
        )

    def _write_state(self, state: dict[str, object]) -> None:
        temp = f"{self.base}.state.{self.nonce}"
        with open(temp, "w") as fh:
            json.dump(state, fh)
        os.rename(temp, self.base + ".state")
        self.wakeups.notify(self.base)

    def write(self, chunk: bytes) -> None:
        """Append to the spool and wake local readers."""
        view = memoryview(chunk)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._remember(chunk)
        self.written += len(chunk)
        self.wakeups.notify(self.base)

    def _remember(self, chunk: bytes) -> None:
        """Keep the chunk for local readers while this worker's budget allows (else they
        read it back from the spool): 100 downloads at once must not hold 800 MiB."""
        global _recent_held
        while self._recent and (
            len(self._recent) >= RECENT or _recent_held + len(chunk) > RECENT_BUDGET
        ):
            _recent_held -= len(self._recent.popleft()[1])
        if _recent_held + len(chunk) <= RECENT_BUDGET:
            self._recent.append((self.written, chunk))
            _recent_held += len(chunk)

    def _forget(self) -> None:
        global _recent_held
        _recent_held -= sum(len(chunk) for _, chunk in self._recent)
        self._recent.clear()

    def end(self, complete: bool, reason: str = "") -> None:
        """The upstream body is over: complete, or cut short for reason."""
        self.finished, self.complete, self.reason = True, complete, reason
        self.wakeups.notify(self.base)

    def _recent_at(self, offset: int, limit: int) -> bytes | None:
        """Up to limit bytes at offset if a recent chunk holds them."""
        for start, chunk in reversed(self._recent):
            if start <= offset < start + len(chunk):
                return chunk[offset - start : offset - start + limit]
            if start + len(chunk) <= offset:
                break
        return None

    def read_at(self, fd: int, offset: int, limit: int) -> bytes:
        """Up to limit bytes at offset: from memory while recent, else from the spool."""
        data = self._recent_at(offset, limit)
        return os.pread(fd, limit, offset) if data is None else data

    def tail(self) -> Iterator[bytes]:
        """The spool from its start as it grows, for the store writer; SourceFailed if cut."""
        fd = os.open(self.spool_path, os.O_RDONLY | os.O_CLOEXEC)
        offset = 0
        try:
            while True:
                # The store fill lags the client (it hashes every byte): what it reads back
                # from the spool is copied in the thread pool, not on the event loop.
                data = self._recent_at(offset, CHUNK)
                if data is None:
                    data = run_blocking(os.pread, fd, CHUNK, offset)
                if data:
                    offset += len(data)
                    yield data
                elif self.finished:
                    if os.pread(fd, 1, offset):
                        continue
                    if self.complete:
                        return
                    raise SourceFailed(self.reason)
                else:
                    self.wakeups.event(self.base).wait(timeout=POLL)
        finally:
            os.close(fd)

    def has_readers(self) -> bool:
        """False once every reader, in every worker, has gone."""
        return not lock_free(self._check_fd, fcntl.LOCK_EX)

    def close(self) -> None:
        """Remove the flight's files; readers keep their open descriptors."""
        if not self.finished:
            self.end(False, "fetch failed")
        # An error stays readable for this flight's followers; the next leader clears it.
        state = () if self.error is not None else (self.base + ".state",)
        remove(*state, self.spool_path, self.base + ".readers", self.base + ".lock")
        self._forget()  # later reads come from the spool descriptors readers hold
        os.close(self._fd)
        os.close(self._check_fd)
