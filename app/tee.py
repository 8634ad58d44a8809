"""The tee: stream upstream chunks to the client while a writer greenlet fills the store.

The client never waits for the store. Chunks go to the writer through a buffer
bounded in bytes; when the writer falls behind past the bound, or fails, the
fill is abandoned and aborted while the client stream carries on. Nothing is
committed unless the whole stream arrived and its size and digest check out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator

import gevent
import gevent.queue

from app.blocking import run_blocking
from app.storage import BlobWriter, ObjectMeta

COMMITTED = "committed"
DIGEST_MISMATCH = "digest mismatch"
SIZE_MISMATCH = "truncated"
TRUNCATED = "truncated"
STORE_ERROR = "store error"
TOO_SLOW = "store too slow"
CLIENT_GONE = "client gone"

_END = object()
_ABORT = object()
FINISH_TIMEOUT = 120.0


class Fill:
    """One cache fill: hashes and writes chunks in a greenlet, then commits or aborts."""

    def __init__(
        self,
        writer: BlobWriter,
        *,
        expected_digest: str,
        expected_size: int | None,
        make_meta: Callable[[str, int], ObjectMeta],
        buffer_bytes: int,
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        self.writer = writer
        self.expected_digest = expected_digest
        self.expected_size = expected_size
        self.make_meta = make_meta
        self.buffer_bytes = buffer_bytes
        self.on_result = on_result
        self.result: str | None = None
        self._queue: gevent.queue.Queue = gevent.queue.Queue()
        self._queued = 0
        self._open = True
        self._abandon_reason = STORE_ERROR
        self._greenlet = gevent.spawn(self._run)

    def offer(self, chunk: bytes) -> None:
        """Hand a chunk to the writer without ever blocking on the store."""
        if not self._open:
            return
        if self._queued + len(chunk) > self.buffer_bytes:
            gevent.sleep(0)  # one chance for the writer to catch up
            if self._queued + len(chunk) > self.buffer_bytes:
                self.abandon(TOO_SLOW)
                return
        self._queued += len(chunk)
        self._queue.put(chunk)
        if self._queued > self.buffer_bytes // 2:
            gevent.sleep(0)

    def finish(self) -> str:
        """The stream ended normally: wait for verification and commit, return the result."""
        if self._open:
            self._open = False
            self._queue.put(_END)
        if not self._greenlet.join(timeout=FINISH_TIMEOUT):
            self.abandon(TOO_SLOW)
            self._greenlet.join(timeout=FINISH_TIMEOUT)
        return self.result or TOO_SLOW

    def abandon(self, reason: str) -> None:
        """Give up on the fill; the writer aborts after its current chunk."""
        if self.result is None and (self._open or not self._greenlet.dead):
            self._open = False
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queued = 0
            self._abandon_reason = reason
            self._queue.put(_ABORT)

    def _run(self) -> None:
        algorithm = self.expected_digest.split(":", 1)[0]
        hasher = hashlib.new(algorithm)
        size = 0
        try:
            while True:
                chunk = self._queue.get()
                if chunk is _ABORT:
                    self._finish_with(self._abandon_reason)
                    return
                if chunk is _END:
                    break
                self._queued -= len(chunk)
                run_blocking(hasher.update, chunk)
                self.writer.write(chunk)
                size += len(chunk)
            digest = f"{algorithm}:{hasher.hexdigest()}"
            if self.expected_size is not None and size != self.expected_size:
                self._finish_with(SIZE_MISMATCH)
            elif digest != self.expected_digest:
                self._finish_with(DIGEST_MISMATCH)
            else:
                self.writer.commit(self.make_meta(digest, size))
                self._report(COMMITTED)
        except Exception:
            self._finish_with(STORE_ERROR)
        except BaseException:
            self._finish_with(CLIENT_GONE)
            raise

    def _finish_with(self, reason: str) -> None:
        self.writer.abort()
        self._report(reason)

    def _report(self, result: str) -> None:
        self.result = result
        if self.on_result is not None:
            self.on_result(result)


def tee(chunks: Iterable[bytes], fill: Fill | None) -> Iterator[bytes]:
    """Yield chunks to the client, offering each to the fill; commit only on a complete stream."""
    try:
        for chunk in chunks:
            if fill is not None:
                fill.offer(chunk)
            yield chunk
    except GeneratorExit:
        if fill is not None:
            fill.abandon(CLIENT_GONE)
        raise
    except BaseException:
        if fill is not None:
            fill.abandon(TRUNCATED)
        raise
    else:
        if fill is not None:
            fill.finish()
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
