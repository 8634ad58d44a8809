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

import collections
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gevent
import gevent.event

from app import metrics
from app.errors import RegistryError
from app.tee import SourceFailed

CHUNK = 1024 * 1024
POLL = 0.01
STATE_WAIT = 120.0
FILL_GRACE = 5.0
RECENT = 8  # chunks kept in memory per flight (at most 8 MiB)
RECENT_BUDGET = 32 * CHUNK  # bytes kept so by all flights of a worker together (issue 16)
_recent_held = 0  # bytes in every SpoolWriter._recent of this worker
# <h>.lock, <h>.readers, <h>.state, <h>.state.<nonce> (being written), <h>.<nonce> (spool)
_FLIGHT_FILE = re.compile(
    r"([0-9a-f]{40})\.(?:lock|readers|state|state\.[0-9a-f]{16}|[0-9a-f]{16})"
)

_SPOOL_FILE = re.compile(r"[0-9a-f]{40}\.[0-9a-f]{16}")


class FlightError(Exception):
    """The fetch this reader followed failed part-way: the response must be cut short."""


class FlightGone(Exception):
    """The flight ended before this reader got a byte: start over (the cache may hit now)."""


class Uncoalescible(Exception):
    """Another worker is fetching a body of unknown length: fetch it separately."""


@dataclass(frozen=True)
class Head:
    """What upstream answered, published to every reader before the body."""

    status: int
    headers: list[tuple[str, str]]
    length: int | None


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def _remove(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class Flights:
    """The spool directory shared by every worker of one instance."""

    def __init__(self, spool_dir: str) -> None:
        self.dir = os.path.abspath(spool_dir)
        os.makedirs(self.dir, exist_ok=True)
        sweep_leftovers(self.dir)  # a worker starting may replace one that was killed
        self._wakeups: dict[str, gevent.event.Event] = {}

    def _base(self, key: str) -> str:
        return os.path.join(self.dir, hashlib.sha256(key.encode()).hexdigest()[:40])

    def join(self, key: str) -> Ticket:
        """Take part in the flight for key: as its leader if nobody is fetching it yet."""
        base = self._base(key)
        while True:
            lock_fd = os.open(base + ".lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            leader = _try_flock(lock_fd, fcntl.LOCK_EX)
            if leader and os.fstat(lock_fd).st_ino != _inode(base + ".lock"):
                os.close(lock_fd)  # lost a race with a finishing fetcher's cleanup
                continue
            if leader:  # clear what a finished (or dead) fetcher left behind
                old = _read_state(base + ".state")
                if old is not None and isinstance(old.get("nonce"), str):
                    _remove(f"{base}.{old['nonce']}")
                _remove(base + ".state")
            readers_fd = os.open(base + ".readers", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            while not _try_flock(readers_fd, fcntl.LOCK_SH):
                gevent.sleep(POLL)  # a fetcher is checking for readers this instant
            return Ticket(self, base, lock_fd, readers_fd, leader)

    def spool_bytes(self) -> int:
        """Bytes in the spool files of every flight of the instance (SPOOL_MAX_BYTES)."""
        total = 0
        with os.scandir(self.dir) as entries:
            for entry in entries:
                if _SPOOL_FILE.fullmatch(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat().st_size
        return total

    def _wakeup(self, base: str) -> gevent.event.Event:
        event = self._wakeups.get(base)
        if event is None:
            event = self._wakeups[base] = gevent.event.Event()
        return event

    def _notify(self, base: str) -> None:
        event = self._wakeups.pop(base, None)
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
            if not _try_flock(fd, fcntl.LOCK_EX) or os.fstat(fd).st_ino != _inode(base + suffix):
                return 0  # a live fetcher or reader (or the file was just replaced)
        # Like SpoolWriter.close: everything else first, the lock last.
        lock = os.path.basename(base) + ".lock"
        victims = [name for name in files if name != lock] + [lock]
        _remove(*(os.path.join(directory, name) for name in victims))
        return len(files)
    finally:
        for fd in held:
            os.close(fd)


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


class SpoolWriter:
    """The fetcher's side: publish the head, append body bytes, learn whether anyone listens."""

    def __init__(self, flights: Flights, base: str) -> None:
        self.flights = flights
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
        self.flights._notify(self.base)

    def write(self, chunk: bytes) -> None:
        """Append to the spool and wake local readers."""
        view = memoryview(chunk)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._remember(chunk)
        self.written += len(chunk)
        self.flights._notify(self.base)

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
        self.flights._notify(self.base)

    def read_at(self, fd: int, offset: int, limit: int) -> bytes:
        """Up to limit bytes at offset: from memory while recent, else from the spool."""
        for start, chunk in reversed(self._recent):
            if start <= offset < start + len(chunk):
                return chunk[offset - start : offset - start + limit]
            if start + len(chunk) <= offset:
                break
        return os.pread(fd, limit, offset)

    def tail(self) -> Iterator[bytes]:
        """The spool from its start as it grows, for the store writer; SourceFailed if cut."""
        fd = os.open(self.spool_path, os.O_RDONLY | os.O_CLOEXEC)
        offset = 0
        try:
            while True:
                data = self.read_at(fd, offset, CHUNK)
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
                    self.flights._wakeup(self.base).wait(timeout=POLL)
        finally:
            os.close(fd)

    def has_readers(self) -> bool:
        """False once every reader, in every worker, has gone."""
        if _try_flock(self._check_fd, fcntl.LOCK_EX):
            fcntl.flock(self._check_fd, fcntl.LOCK_UN)
            return False
        return True

    def close(self) -> None:
        """Remove the flight's files; readers keep their open descriptors."""
        if not self.finished:
            self.end(False, "fetch failed")
        # An error stays readable for this flight's followers; the next leader clears it.
        state = () if self.error is not None else (self.base + ".state",)
        _remove(*state, self.spool_path, self.base + ".readers", self.base + ".lock")
        self._forget()  # later reads come from the spool descriptors readers hold
        os.close(self._fd)
        os.close(self._check_fd)


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
        writer = self._writer = SpoolWriter(self.flights, self.base)
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
                self.flights._notify(self.base)
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
        if _try_flock(self.lock_fd, fcntl.LOCK_SH):
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
            return True
        return False

    def _wait(self) -> None:
        self.flights._wakeup(self.base).wait(timeout=POLL)

    def head(self) -> tuple[Head, int]:
        """Wait for the fetcher's answer; returns the head and an open spool descriptor."""
        if self._writer is not None:
            return self._own_head(self._writer)
        waited = 0.0
        while waited < STATE_WAIT:
            state = _read_state(self.base + ".state")
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

    def body(self, spool_fd: int, length: int | None) -> Iterator[bytes]:
        """Tail the spool to the end of the body; a failed fetch cuts the response."""
        sent = 0
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


def _read_state(path: str) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (FileNotFoundError, ValueError):
        return None
