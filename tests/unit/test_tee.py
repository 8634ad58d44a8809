"""app/tee.py: the client stream and the cache fill, committed only when verified."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import gevent
import pytest

from app.storage import ObjectMeta
from app.tee import (
    CLIENT_GONE,
    COMMITTED,
    DIGEST_MISMATCH,
    STORE_ERROR,
    TOO_SLOW,
    TRUNCATED,
    Fill,
    tee,
)

CHUNKS = [b"a" * 1000, b"b" * 1000, b"c" * 500]
DATA = b"".join(CHUNKS)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


class MemoryWriter:
    """An in-memory BlobWriter that records what happened to it."""

    def __init__(self, delay: float = 0.0, fail_on_write: int | None = None) -> None:
        self.data = bytearray()
        self.meta: ObjectMeta | None = None
        self.committed = False
        self.aborted = False
        self.writes = 0
        self.delay = delay
        self.fail_on_write = fail_on_write

    def write(self, chunk: bytes) -> None:
        self.writes += 1
        if self.fail_on_write is not None and self.writes >= self.fail_on_write:
            raise OSError("disk full")
        if self.delay:
            gevent.sleep(self.delay)
        self.data += chunk

    def commit(self, meta: ObjectMeta) -> None:
        assert not self.aborted
        self.meta = meta
        self.committed = True

    def abort(self) -> None:
        assert not self.committed
        self.aborted = True


def make_meta(digest: str, size: int) -> ObjectMeta:
    return ObjectMeta(digest=digest, size=size, media_type="application/octet-stream")


def make_fill(
    writer: MemoryWriter,
    *,
    digest: str = DIGEST,
    size: int | None = len(DATA),
    buffer_bytes: int = 1 << 20,
    results: list[str] | None = None,
) -> Fill:
    return Fill(
        writer,
        expected_digest=digest,
        expected_size=size,
        make_meta=make_meta,
        buffer_bytes=buffer_bytes,
        on_result=None if results is None else results.append,
    )


def network(chunks: list[bytes], pause: float = 0.002) -> Iterator[bytes]:
    """An upstream body that, like a real socket, yields to the hub while waiting for data."""
    for chunk in chunks:
        gevent.sleep(pause)
        yield chunk


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the writer greenlet run until condition holds."""
    with gevent.Timeout(timeout):
        while not condition():
            gevent.sleep(0.01)


def test_complete_verified_stream_commits() -> None:
    writer = MemoryWriter()
    results: list[str] = []
    fill = make_fill(writer, results=results)
    received = b"".join(tee(iter(CHUNKS), fill))
    assert received == DATA
    # tee() joins the writer at the end of a complete stream: committed by now.
    assert writer.committed
    assert not writer.aborted
    assert bytes(writer.data) == DATA
    assert writer.meta is not None
    assert (writer.meta.digest, writer.meta.size) == (DIGEST, len(DATA))
    assert results == [COMMITTED]
    assert fill.result == COMMITTED


def test_bounded_buffer_keeps_a_healthy_writer() -> None:
    """A writer that keeps pace is never abandoned, however small the bound is relative to the
    object."""
    writer = MemoryWriter()
    chunks = [bytes([i]) * 4096 for i in range(64)]
    data = b"".join(chunks)
    fill = make_fill(
        writer,
        digest="sha256:" + hashlib.sha256(data).hexdigest(),
        size=len(data),
        buffer_bytes=64 * 1024,
    )
    assert b"".join(tee(network(chunks, pause=0.005), fill)) == data
    assert writer.committed
    assert bytes(writer.data) == data


def test_unknown_size_commits_when_digest_matches() -> None:
    writer = MemoryWriter()
    fill = make_fill(writer, size=None)
    assert b"".join(tee(iter(CHUNKS), fill)) == DATA
    assert writer.committed


def test_sha512_digest() -> None:
    writer = MemoryWriter()
    digest = "sha512:" + hashlib.sha512(DATA).hexdigest()
    fill = make_fill(writer, digest=digest)
    assert b"".join(tee(iter(CHUNKS), fill)) == DATA
    assert writer.committed
    assert writer.meta is not None
    assert writer.meta.digest == digest


def test_digest_mismatch_aborts() -> None:
    writer = MemoryWriter()
    results: list[str] = []
    fill = make_fill(writer, digest="sha256:" + "0" * 64, results=results)
    assert b"".join(tee(iter(CHUNKS), fill)) == DATA
    assert writer.aborted
    assert not writer.committed
    assert results == [DIGEST_MISMATCH]


@pytest.mark.parametrize("size", [len(DATA) + 1, len(DATA) - 1])
def test_size_mismatch_aborts(size: int) -> None:
    writer = MemoryWriter()
    fill = make_fill(writer, size=size)
    assert b"".join(tee(iter(CHUNKS), fill)) == DATA
    assert writer.aborted
    assert not writer.committed


def test_truncated_stream_with_matching_size_claim_aborts() -> None:
    """Upstream promised the full length but the stream stopped early, without an error."""
    writer = MemoryWriter()
    fill = make_fill(writer)
    assert b"".join(tee(iter(CHUNKS[:2]), fill)) == DATA[:2000]
    assert writer.aborted
    assert not writer.committed


def test_upstream_exception_mid_stream_aborts_and_propagates() -> None:
    writer = MemoryWriter()
    results: list[str] = []
    fill = make_fill(writer, results=results)

    def broken() -> Iterator[bytes]:
        yield CHUNKS[0]
        raise ConnectionResetError("upstream reset")

    received = []
    with pytest.raises(ConnectionResetError):
        for chunk in tee(broken(), fill):
            received.append(chunk)
    assert received == [CHUNKS[0]]
    wait_for(lambda: writer.aborted)
    assert not writer.committed
    assert results == [TRUNCATED]


def test_client_disconnect_aborts() -> None:
    writer = MemoryWriter()
    results: list[str] = []
    fill = make_fill(writer, results=results)
    upstream_closed = []

    class Upstream:
        def __init__(self) -> None:
            self.chunks = iter(CHUNKS)

        def __iter__(self) -> Upstream:
            return self

        def __next__(self) -> bytes:
            return next(self.chunks)

        def close(self) -> None:
            upstream_closed.append(True)

    stream = tee(Upstream(), fill)
    assert next(stream) == CHUNKS[0]
    stream.close()
    wait_for(lambda: writer.aborted)
    assert not writer.committed
    assert results == [CLIENT_GONE]
    assert upstream_closed == [True]  # the upstream connection is released too


def test_failing_writer_does_not_disturb_the_client() -> None:
    writer = MemoryWriter(fail_on_write=3)
    results: list[str] = []
    chunks = [bytes([i]) * 1000 for i in range(50)]
    data = b"".join(chunks)
    fill = make_fill(
        writer,
        digest="sha256:" + hashlib.sha256(data).hexdigest(),
        size=len(data),
        buffer_bytes=4000,  # small, so the writer runs while the client is still streaming
        results=results,
    )
    received = bytearray()
    aborted_mid_stream = False
    for chunk in tee(network(chunks), fill):
        received += chunk
        aborted_mid_stream = aborted_mid_stream or (writer.aborted and len(received) < len(data))
    assert bytes(received) == data
    assert aborted_mid_stream
    assert not writer.committed
    assert results == [STORE_ERROR]


def test_slow_writer_is_abandoned_and_client_gets_every_byte() -> None:
    writer = MemoryWriter(delay=0.05)
    results: list[str] = []
    chunks = [bytes([i % 256]) * 64 * 1024 for i in range(64)]  # 4 MiB
    data = b"".join(chunks)
    fill = make_fill(
        writer,
        digest="sha256:" + hashlib.sha256(data).hexdigest(),
        size=len(data),
        buffer_bytes=256 * 1024,
        results=results,
    )
    received = bytearray()
    for chunk in tee(network(chunks), fill):
        received += chunk
    assert bytes(received) == data
    wait_for(lambda: writer.aborted)
    assert not writer.committed
    assert results == [TOO_SLOW]
    assert len(writer.data) < len(data)


def test_tee_without_fill_just_streams() -> None:
    assert b"".join(tee(iter(CHUNKS), None)) == DATA


def test_empty_stream() -> None:
    writer = MemoryWriter()
    empty = "sha256:" + hashlib.sha256(b"").hexdigest()
    fill = make_fill(writer, digest=empty, size=0)
    assert list(tee(iter([]), fill)) == []
    assert writer.committed
