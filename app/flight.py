"""Single flight: one upstream download per object per instance, however many clients ask.

One fetcher (a greenlet in whichever worker won the object's lock) streams the
upstream body into a spool file; every client of the instance, the fetcher's own
included, tails that file, so a late joiner gets what has arrived at once and
then follows. Across gunicorn workers the only shared state is the spool
directory:

  <h>.lock     flock(LOCK_EX) held by the fetcher for its whole life
  <h>.readers  flock(LOCK_SH) held by every reader; the fetcher stops when none is left
  <h>.state    JSON: status, headers, Content-Length and the spool's nonce (or an error);
               a body of unknown length is only shared within the fetcher's worker
  <h>.<nonce>  the body as it arrives

The fetcher removes these files before releasing the lock; a fetcher killed before that
leaves them, and sweep_leftovers (at start, and `oci-pull-through gc`) removes a
flight's files only once it can take both of its locks itself. A reader that runs dry
while the lock is free (or the spool unlinked) with bytes missing fails the
response, so a failed leader never yields a short 200.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator

import gevent

from app import metrics
from app.errors import BodyCut, RegistryError
from app.spool import (
    CHUNK,
    POLL,
    SPOOL_FILE,
    Head,
    SpoolWriter,
    Wakeups,
    inode,
    lock_free,
    read_state,
    remove,
    sweep_leftovers,
    try_flock,
)

__all__ = [
    "FlightError",
    "FlightGone",
    "Flights",
    "Head",
    "SpoolWriter",
    "Ticket",
    "Uncoalescible",
    "sweep_leftovers",
]

STATE_WAIT = 120.0
FILL_GRACE = 5.0


class FlightError(BodyCut):
    """The fetch this reader followed failed part-way: the response must be cut short."""


class FlightGone(Exception):
    """The flight ended before this reader got a byte: start over (the cache may hit now)."""


class Uncoalescible(Exception):
    """Another worker is fetching a body of unknown length: fetch it separately."""


class Flights:
    """The spool directory shared by every worker of one instance."""

    def __init__(self, spool_dir: str) -> None:
        self.dir = os.path.abspath(spool_dir)
        os.makedirs(self.dir, exist_ok=True)
        sweep_leftovers(self.dir)  # a worker starting may replace one that was killed
        self.wakeups = Wakeups()

    def _base(self, key: str) -> str:
        return os.path.join(self.dir, hashlib.sha256(key.encode()).hexdigest()[:40])

    def join(self, key: str) -> Ticket:
        """Take part in the flight for key: as its leader if nobody is fetching it yet."""
        base = self._base(key)
        while True:
            lock_fd = os.open(base + ".lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            leader = try_flock(lock_fd, fcntl.LOCK_EX)
            if leader and os.fstat(lock_fd).st_ino != inode(base + ".lock"):
                os.close(lock_fd)  # lost a race with a finishing fetcher's cleanup
                continue
            if leader:  # clear what a finished (or dead) fetcher left behind
                old = read_state(base + ".state")
                if old is not None and isinstance(old.get("nonce"), str):
                    remove(f"{base}.{old['nonce']}")
                remove(base + ".state")
            readers_fd = os.open(base + ".readers", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            while not try_flock(readers_fd, fcntl.LOCK_SH):
                gevent.sleep(POLL)  # a fetcher is checking for readers this instant
            return Ticket(self, base, lock_fd, readers_fd, leader)

    def follow(self, key: str) -> Ticket | None:
        """Join the flight for key only if one is running (None: nobody is fetching it)."""
        base = self._base(key)
        try:
            lock_fd = os.open(base + ".lock", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        if try_flock(lock_fd, fcntl.LOCK_EX):  # free: no fetcher, and we start none
            os.close(lock_fd)
            return None
        readers_fd = os.open(base + ".readers", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        while not try_flock(readers_fd, fcntl.LOCK_SH):
            gevent.sleep(POLL)  # a fetcher is checking for readers this instant
        return Ticket(self, base, lock_fd, readers_fd, False)

    def spool_bytes(self) -> int:
        """Bytes in the spool files of every flight of the instance (SPOOL_MAX_BYTES)."""
        total = 0
        with os.scandir(self.dir) as entries:
            for entry in entries:
                if SPOOL_FILE.fullmatch(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat().st_size
        return total


class Ticket:
    """One client's place in a flight."""

    def __init__(
        self, flights: Flights, base: str, lock_fd: int, readers_fd: int, leader: bool
    ) -> None:
        self.flights = flights
        self.base = base
        self.lock_fd = lock_fd
        self.readers_fd = readers_fd
        self.leader = leader
        self.nonce = ""
        self._fetcher: gevent.Greenlet | None = None
        self._writer: SpoolWriter | None = None
        self._spool_fd = -1
        self._closed = False

    def start(self, fetch: Callable[[SpoolWriter], None]) -> None:
        """Leader only: run fetch in its own greenlet, so it outlives this client if others read."""
        writer = self._writer = SpoolWriter(self.flights.wakeups, self.base)
        self._spool_fd = os.open(writer.spool_path, os.O_RDONLY | os.O_CLOEXEC)
        lock_fd = self.lock_fd
        # The reader tests the lock through its own open file description: a dup() would
        # share the fetcher's lock and see it as free.
        self.lock_fd = os.open(self.base + ".lock", os.O_RDWR | os.O_CLOEXEC)

        def run() -> None:
            metrics.IN_FLIGHT.inc()
            try:
                fetch(writer)
            finally:
                metrics.IN_FLIGHT.dec()
                writer.close()
                self.flights.wakeups.notify(self.base)
                os.close(lock_fd)  # releases the flock: the flight is over

        self._fetcher = gevent.spawn(run)

    def finish(self, timeout: float | None = None) -> None:
        """A leader with no client of its own (a prefetch): wait for the fetch, then leave."""
        if self._fetcher is not None:
            self._fetcher.join(timeout=timeout)
        if self._spool_fd >= 0:
            os.close(self._spool_fd)
            self._spool_fd = -1
        self.release()

    def release(self) -> None:
        """Leave the flight (idempotent)."""
        if not self._closed:
            self._closed = True
            os.close(self.readers_fd)
            os.close(self.lock_fd)

    def _over(self) -> bool:
        """The fetcher has finished or died (its lock is free)."""
        return lock_free(self.lock_fd, fcntl.LOCK_SH)

    def _wait(self) -> None:
        self.flights.wakeups.event(self.base).wait(timeout=POLL)

    def head(self) -> tuple[Head, int]:
        """Wait for the fetcher's answer; returns the head and an open spool descriptor."""
        if self._writer is not None:
            return self._own_head(self._writer)
        waited = 0.0
        while waited < STATE_WAIT:
            state = read_state(self.base + ".state")
            if state is not None and "error" in state:
                error = state["error"]
                raise RegistryError(error["message"], status=error["status"], code=error["code"])
            if state is not None and state.get("length") is None:
                raise Uncoalescible
            if state is not None:
                try:
                    spool_fd = os.open(f"{self.base}.{state['nonce']}", os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise FlightGone from None
                head = Head(
                    int(state["status"]),
                    [(str(k), str(v)) for k, v in state["headers"]],
                    state["length"],
                )
                self.nonce = state["nonce"]
                return head, spool_fd
            if self._over():
                raise FlightGone
            self._wait()
            waited += POLL
        raise FlightGone

    def _own_head(self, writer: SpoolWriter) -> tuple[Head, int]:
        """The leader learns the head from its own fetcher, in memory."""
        while True:
            if writer.error is not None:
                raise writer.error
            if writer.head is not None:
                self.nonce = writer.nonce
                return writer.head, self._spool_fd
            if self._fetcher is None or self._fetcher.dead:
                raise FlightGone
            self._wait()

    def body(self, spool_fd: int, length: int | None, start: int = 0) -> Iterator[bytes]:
        """Tail the spool from start to length (the end); a failed fetch cuts the response."""
        sent = start
        try:
            while length is None or sent < length:
                want = CHUNK if length is None else min(CHUNK, length - sent)
                if self._writer is not None:
                    data = self._writer.read_at(spool_fd, sent, want)
                else:
                    data = os.pread(spool_fd, want, sent)
                if data:
                    sent += len(data)
                    yield data
                    continue
                if self._over() or os.fstat(spool_fd).st_nlink == 0:
                    if os.pread(spool_fd, 1, sent):
                        continue  # the last bytes landed just before the end
                    writer = self._writer
                    done = writer is not None and writer.complete and writer.written == sent
                    if length is None and done:
                        return
                    raise FlightError(f"upstream fetch ended after {sent} bytes of {length}")
                self._wait()
            if self._fetcher is not None:
                # The leader's client ends once the fill is committed (or a few seconds
                # have passed), so the same client's next request sees the outcome.
                self._fetcher.join(timeout=FILL_GRACE)
        finally:
            os.close(spool_fd)
            self.release()
