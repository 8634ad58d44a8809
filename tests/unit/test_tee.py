"""app/tee.py: the store fill commits only complete, verified bytes, and never raises."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from app.storage import ObjectMeta, StoreError
from app.tee import (
    CLIENT_GONE,
    COMMITTED,
    DIGEST_MISMATCH,
    STORE_ERROR,
    TRUNCATED,
    SourceFailed,
    fill,
)

CHUNKS = [b"a" * 1000, b"b" * 1000, b"c" * 500]
DATA = b"".join(CHUNKS)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


class MemoryWriter:
    """An in-memory BlobWriter that records what happened to it."""

    def __init__(self, fail_on_write: int | None = None, fail_commit: bool = False) -> None:
        self.data = bytearray()
        self.meta: ObjectMeta | None = None
        self.committed = False
        self.aborted = False
        self.writes = 0
        self.fail_on_write = fail_on_write
        self.fail_commit = fail_commit

    def may_adopt(self) -> bool:
        return False

    def adopt(self, path: str) -> bool:
        raise AssertionError("adopt called on a writer that said it may not")

    def write(self, chunk: bytes) -> None:
        self.writes += 1
        if self.fail_on_write is not None and self.writes >= self.fail_on_write:
            raise StoreError("disk full")
        self.data += chunk

    def commit(self, meta: ObjectMeta) -> None:
        assert not self.aborted
        if self.fail_commit:
            raise StoreError("rename failed")
        self.meta = meta
        self.committed = True

    def abort(self) -> None:
        assert not self.committed
        self.aborted = True


def make_meta(digest: str, size: int) -> ObjectMeta:
    return ObjectMeta(digest=digest, size=size, media_type="application/octet-stream")


def run(
    chunks: Iterator[bytes] | list[bytes],
    writer: MemoryWriter,
    *,
    digest: str = DIGEST,
    size: int | None = len(DATA),
) -> str:
    return fill(
        iter(chunks), writer, expected_digest=digest, expected_size=size, make_meta=make_meta
    )


def test_complete_verified_stream_is_committed_with_its_meta() -> None:
    writer = MemoryWriter()
    assert run(CHUNKS, writer) == COMMITTED
    assert writer.committed and bytes(writer.data) == DATA
    assert writer.meta is not None
    assert (writer.meta.digest, writer.meta.size) == (DIGEST, len(DATA))


def test_unknown_size_is_verified_by_digest_alone() -> None:
    writer = MemoryWriter()
    assert run(CHUNKS, writer, size=None) == COMMITTED


def test_sha512_digests_are_verified_too() -> None:
    digest = "sha512:" + hashlib.sha512(DATA).hexdigest()
    writer = MemoryWriter()
    assert run(CHUNKS, writer, digest=digest) == COMMITTED


def test_digest_mismatch_aborts() -> None:
    writer = MemoryWriter()
    assert run(CHUNKS, writer, digest="sha256:" + "0" * 64) == DIGEST_MISMATCH
    assert writer.aborted and not writer.committed


def test_size_mismatch_aborts() -> None:
    writer = MemoryWriter()
    assert run(CHUNKS[:2], writer) == TRUNCATED
    assert writer.aborted and not writer.committed


@pytest.mark.parametrize("reason", [TRUNCATED, CLIENT_GONE])
def test_source_failing_part_way_aborts_with_its_reason(reason: str) -> None:
    def source() -> Iterator[bytes]:
        yield CHUNKS[0]
        raise SourceFailed(reason)

    writer = MemoryWriter()
    assert run(source(), writer) == reason
    assert writer.aborted and not writer.committed


def test_store_failing_mid_write_aborts_and_never_raises() -> None:
    writer = MemoryWriter(fail_on_write=2)
    assert run(CHUNKS, writer) == STORE_ERROR
    assert writer.aborted and not writer.committed


def test_store_failing_at_commit_aborts() -> None:
    writer = MemoryWriter(fail_commit=True)
    assert run(CHUNKS, writer) == STORE_ERROR
    assert writer.aborted and not writer.committed


class AdoptingWriter(MemoryWriter):
    """A writer that can take the source file whole (like the filesystem backend)."""

    def __init__(self, accept: bool) -> None:
        super().__init__()
        self.accept = accept
        self.adopted: str | None = None

    def may_adopt(self) -> bool:
        return True

    def adopt(self, path: str) -> bool:
        if self.accept:
            self.adopted = path
        return self.accept


def test_a_verified_source_file_is_adopted_without_writing(tmp_path) -> None:
    source = tmp_path / "spool"
    source.write_bytes(DATA)
    writer = AdoptingWriter(accept=True)
    assert (
        fill(
            iter(CHUNKS),
            writer,
            expected_digest=DIGEST,
            expected_size=len(DATA),
            make_meta=make_meta,
            source_path=str(source),
        )
        == COMMITTED
    )
    assert writer.adopted == str(source) and writer.writes == 0 and writer.committed


def test_a_source_on_another_filesystem_is_copied(tmp_path) -> None:
    source = tmp_path / "spool"
    source.write_bytes(DATA)
    writer = AdoptingWriter(accept=False)
    assert (
        fill(
            iter(CHUNKS),
            writer,
            expected_digest=DIGEST,
            expected_size=len(DATA),
            make_meta=make_meta,
            source_path=str(source),
        )
        == COMMITTED
    )
    assert bytes(writer.data) == DATA and writer.committed


def test_an_unverified_source_is_never_adopted(tmp_path) -> None:
    source = tmp_path / "spool"
    source.write_bytes(DATA)
    writer = AdoptingWriter(accept=True)
    assert (
        fill(
            iter(CHUNKS),
            writer,
            expected_digest="sha256:" + "0" * 64,
            expected_size=len(DATA),
            make_meta=make_meta,
            source_path=str(source),
        )
        == DIGEST_MISMATCH
    )
    assert writer.adopted is None and writer.aborted
