"""app/storage/s3.py with moto: the failures a real S3 server will not produce on demand."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError, NoCredentialsError
from moto import mock_aws

from app.storage import NotFound, ObjectMeta, StoreError, keys
from app.storage.s3 import STALE_UPLOAD_AGE, S3Storage
from app.storage.s3bucket import make_client
from app.tee import CLIENT_GONE, COMMITTED, DIGEST_MISMATCH, SourceFailed, fill

BUCKET = "unit"
PREFIX = "inst-a"
MiB = 1024 * 1024
DATA = bytes(range(256)) * (20 * MiB // 256) + b"end"  # 20 MiB: two full parts and a tail
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
KEY = keys.blob(DIGEST)


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    with mock_aws():
        s3 = make_client()
        s3.create_bucket(Bucket=BUCKET)
        yield s3


@pytest.fixture
def storage(client: Any) -> S3Storage:
    return S3Storage(client, BUCKET, PREFIX)


def meta(data: bytes = DATA, digest: str = DIGEST, **kwargs: Any) -> ObjectMeta:
    return ObjectMeta(digest=digest, size=len(data), media_type="application/x-test", **kwargs)


def write_all(storage: S3Storage, key: str, data: bytes, chunk: int = MiB) -> Any:
    writer = storage.writer(key)
    for i in range(0, len(data), chunk):
        writer.write(data[i : i + chunk])
    return writer


def objects(client: Any) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]


def uploads(client: Any) -> list[str]:
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])]


def client_error(code: str, operation: str, status: int = 500) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        operation,
    )


def record_calls(monkeypatch: pytest.MonkeyPatch, client: Any, name: str) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    real = getattr(client, name)

    def recorder(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(client, name, recorder)
    return calls


# -- uploads ------------------------------------------------------------------------------------


def test_large_object_goes_up_in_parts_of_at_least_8_mib(
    storage: S3Storage, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = record_calls(monkeypatch, client, "upload_part")
    committed = meta()
    write_all(storage, KEY, DATA).commit(committed)
    sizes = [len(call["Body"]) for call in parts]
    assert sizes == [8 * MiB, 8 * MiB, len(DATA) - 16 * MiB]
    assert sorted(objects(client)) == [f"{PREFIX}/{KEY}", f"{PREFIX}/{keys.sidecar(KEY)}"]
    assert uploads(client) == []
    assert storage.stat(KEY) == committed


def test_small_object_is_one_put_and_no_multipart_upload(
    storage: S3Storage, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = record_calls(monkeypatch, client, "create_multipart_upload")
    data = b"x" * (8 * MiB - 1)
    write_all(storage, KEY, data).commit(meta(data))
    assert created == []
    with storage.open(KEY) as fh:
        assert fh.read() == data


def test_upload_part_failure_aborts_the_upload_and_leaves_nothing(
    storage: S3Storage, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = client.upload_part
    calls = []

    def flaky(**kwargs: Any) -> Any:
        calls.append(kwargs["PartNumber"])
        if len(calls) == 2:
            raise client_error("InternalError", "UploadPart")
        return real(**kwargs)

    monkeypatch.setattr(client, "upload_part", flaky)
    with pytest.raises(StoreError, match="InternalError"):
        write_all(storage, KEY, DATA)
    assert calls == [1, 2]
    assert uploads(client) == []
    assert objects(client) == []
    with pytest.raises(NotFound):
        storage.stat(KEY)


def test_complete_failure_aborts_the_upload(
    storage: S3Storage, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(**kwargs: Any) -> Any:
        raise client_error("InternalError", "CompleteMultipartUpload")

    monkeypatch.setattr(client, "complete_multipart_upload", fail)
    writer = write_all(storage, KEY, DATA)
    assert uploads(client) != []
    with pytest.raises(StoreError):
        writer.commit(meta())
    assert uploads(client) == []
    assert objects(client) == []


def test_sidecar_failure_leaves_the_object_invisible(
    storage: S3Storage, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data stays (a concurrent committer's sidecar may name it) but nothing describes it."""
    real = client.put_object

    def no_sidecars(**kwargs: Any) -> Any:
        if kwargs["Key"].endswith(keys.SIDECAR_SUFFIX):
            raise client_error("SlowDown", "PutObject", 503)
        return real(**kwargs)

    monkeypatch.setattr(client, "put_object", no_sidecars)
    with pytest.raises(StoreError):
        write_all(storage, KEY, b"small").commit(meta(b"small"))
    assert objects(client) == [f"{PREFIX}/{KEY}"]
    with pytest.raises(NotFound):
        storage.stat(KEY)


def chunks_of(data: bytes, fail_after: int | None = None) -> Iterator[bytes]:
    for i in range(0, len(data), MiB):
        if fail_after is not None and i >= fail_after:
            raise SourceFailed(CLIENT_GONE)
        yield data[i : i + MiB]


def test_fill_digest_mismatch_aborts_the_multipart_upload(storage: S3Storage, client: Any) -> None:
    result = fill(
        chunks_of(DATA),
        storage.writer(KEY),
        expected_digest="sha256:" + "00" * 32,
        expected_size=len(DATA),
        make_meta=lambda d, n: meta(DATA, d),
    )
    assert result == DIGEST_MISMATCH
    assert uploads(client) == []
    assert objects(client) == []


def test_fill_source_gone_mid_upload_aborts_it(
    storage: S3Storage, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = record_calls(monkeypatch, client, "upload_part")
    result = fill(
        chunks_of(DATA, fail_after=17 * MiB),
        storage.writer(KEY),
        expected_digest=DIGEST,
        expected_size=len(DATA),
        make_meta=lambda d, n: meta(DATA, d),
    )
    assert result == CLIENT_GONE
    assert len(parts) == 2, "two parts were uploaded before the source went away"
    assert uploads(client) == []
    assert objects(client) == []


def test_fill_commits_through_s3(storage: S3Storage, client: Any) -> None:
    result = fill(
        chunks_of(DATA),
        storage.writer(KEY),
        expected_digest=DIGEST,
        expected_size=len(DATA),
        make_meta=lambda d, n: meta(DATA, d),
    )
    assert result == COMMITTED
    assert storage.stat(KEY).digest == DIGEST
    assert uploads(client) == []


def test_abort_failure_is_logged_not_raised(
    storage: S3Storage, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = write_all(storage, KEY, DATA[: 9 * MiB])

    def fail(**kwargs: Any) -> Any:
        raise client_error("InternalError", "AbortMultipartUpload")

    monkeypatch.setattr(client, "abort_multipart_upload", fail)
    writer.abort()
    writer.abort()
    with pytest.raises(StoreError):
        writer.write(b"more")


# -- reading ------------------------------------------------------------------------------------


def test_missing_sidecar_is_not_found(storage: S3Storage, client: Any) -> None:
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{KEY}", Body=b"orphan")
    with pytest.raises(NotFound):
        storage.stat(KEY)


def test_missing_bucket_is_a_store_error(client: Any) -> None:
    storage = S3Storage(client, "no-such-bucket", PREFIX)
    with pytest.raises(StoreError):
        storage.stat(KEY)
    with pytest.raises(StoreError):
        write_all(storage, KEY, b"x").commit(meta(b"x"))


def test_sidecar_near_lifecycle_expiry_reads_as_missing(client: Any) -> None:
    storage = S3Storage(client, BUCKET, PREFIX, lifecycle_days=2)
    fresh = meta(b"x", stored_at=time.time() - 0.9 * 86400)
    write_all(storage, KEY, b"x").commit(fresh)
    assert storage.stat(KEY) == fresh
    write_all(storage, KEY, b"x").commit(meta(b"x", stored_at=time.time() - 1.1 * 86400))
    with pytest.raises(NotFound):
        storage.stat(KEY)


def test_range_read_fetches_only_the_range(
    storage: S3Storage, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_all(storage, KEY, DATA).commit(meta())
    gets = record_calls(monkeypatch, client, "get_object")
    with storage.open(KEY, meta(), 10 * MiB, 5) as fh:
        assert gets == [], "open must not download anything"
        assert fh.tell() == 10 * MiB
        assert fh.read(1 * MiB) == DATA[10 * MiB : 10 * MiB + 5]
        assert fh.read(1) == b""
        assert not hasattr(fh, "fileno") or _no_fileno(fh)
    assert [g["Range"] for g in gets] == [f"bytes={10 * MiB}-{10 * MiB + 4}"]


def _no_fileno(fh: Any) -> bool:
    try:
        fh.fileno()
    except OSError:
        return True
    return False


# -- presigning ---------------------------------------------------------------------------------


def test_presign_failure_is_a_store_error(
    storage: S3Storage, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any, **kwargs: Any) -> str:
        raise NoCredentialsError()

    monkeypatch.setattr(client, "generate_presigned_url", fail)
    with pytest.raises(StoreError, match="presigning"):
        storage.presign(KEY, meta())


def test_presign_is_sigv4_with_expiry_and_content_type(client: Any) -> None:
    storage = S3Storage(client, BUCKET, PREFIX, presign_expiry=123)
    url = storage.presign(KEY, meta())
    assert url is not None
    assert "X-Amz-Expires=123" in url and "X-Amz-Signature=" in url
    assert f"/{PREFIX}/blobs/sha256/" in url
    assert "response-content-type=application%2Fx-test" in url


def test_no_redirect_means_no_url(client: Any) -> None:
    assert S3Storage(client, BUCKET, PREFIX, redirect=False).presign(KEY, meta()) is None


# -- SPEC §15: digest-named data, large tags through a temporary upload -----------------------

TAG = keys.manifest("registry.test", "org/app", "v1")
TAG_DATA = keys.data(TAG, DIGEST)


def test_commit_never_deletes_the_previous_sidecar(
    storage: S3Storage, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_all(storage, TAG, b"old").commit(meta(b"old", "sha256:" + "ab" * 32))
    deletes = record_calls(monkeypatch, client, "delete_object")
    new = meta(b"small")
    write_all(storage, TAG, b"small").commit(new)
    assert deletes == []
    assert storage.stat(TAG) == new


def test_large_tag_is_copied_from_a_temporary_upload_to_its_digests_name(
    storage: S3Storage, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = record_calls(monkeypatch, client, "create_multipart_upload")
    write_all(storage, TAG, DATA).commit(meta())
    assert created[0]["Key"].startswith(f"{PREFIX}/{TAG}.upload-")
    assert set(objects(client)) == {f"{PREFIX}/{TAG_DATA}", f"{PREFIX}/{keys.sidecar(TAG)}"}
    assert uploads(client) == []
    with storage.open(TAG, meta()) as fh:
        assert fh.read() == DATA


def test_copy_failure_leaves_nothing_and_the_old_tag_intact(
    storage: S3Storage, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = meta(b"old", "sha256:" + "ab" * 32)
    write_all(storage, TAG, b"old").commit(old)

    def fail(**kwargs: Any) -> Any:
        raise client_error("InternalError", "CopyObject")

    monkeypatch.setattr(client, "copy_object", fail)
    with pytest.raises(StoreError, match="InternalError"):
        write_all(storage, TAG, DATA).commit(meta())
    assert uploads(client) == []
    assert set(objects(client)) == {
        f"{PREFIX}/{keys.data(TAG, old.digest)}",
        f"{PREFIX}/{keys.sidecar(TAG)}",
    }, "the temporary object was deleted"
    assert storage.stat(TAG) == old


def test_failed_cleanup_of_the_temporary_upload_fails_the_commit_visibly(
    storage: S3Storage, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting the temporary object fails: no sidecar is written, the copy stays unnamed."""
    real = client.delete_object

    def no_deletes(**kwargs: Any) -> Any:
        if ".upload-" in kwargs["Key"]:
            raise client_error("SlowDown", "DeleteObject", 503)
        return real(**kwargs)

    monkeypatch.setattr(client, "delete_object", no_deletes)
    with pytest.raises(StoreError):
        write_all(storage, TAG, DATA).commit(meta())
    with pytest.raises(NotFound):
        storage.stat(TAG)
    assert uploads(client) == []


def test_complete_failure_of_a_large_tag_aborts_its_temporary_upload(
    storage: S3Storage, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(**kwargs: Any) -> Any:
        raise client_error("InternalError", "CompleteMultipartUpload")

    monkeypatch.setattr(client, "complete_multipart_upload", fail)
    with pytest.raises(StoreError):
        write_all(storage, TAG, DATA).commit(meta())
    assert uploads(client) == [] and objects(client) == []


def test_content_addressed_key_refuses_another_digest_and_aborts_its_upload(
    storage: S3Storage, client: Any
) -> None:
    writer = write_all(storage, KEY, DATA)
    assert uploads(client) != []
    with pytest.raises(StoreError):
        writer.commit(meta(digest="sha256:" + "00" * 32))
    assert uploads(client) == [] and objects(client) == []


def test_open_checks_the_data_size_with_the_head_it_already_does(
    storage: S3Storage, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_all(storage, TAG, b"small").commit(meta(b"small"))
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{keys.data(TAG, DIGEST)}", Body=b"smal")
    heads = record_calls(monkeypatch, client, "head_object")
    gets = record_calls(monkeypatch, client, "get_object")
    with pytest.raises(NotFound):
        storage.open(TAG, meta(b"small"))
    assert len(heads) == 1 and gets == []


def test_update_meta_is_one_put_of_the_sidecar(
    storage: S3Storage, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_all(storage, TAG, b"small").commit(meta(b"small"))
    puts = record_calls(monkeypatch, client, "put_object")
    fresh = meta(b"small", stored_at=123.0, sources=("registry.test/org/app",))
    storage.update_meta(TAG, fresh)
    assert [p["Key"] for p in puts] == [f"{PREFIX}/{keys.sidecar(TAG)}"]
    assert storage.stat(TAG) == fresh


def test_update_meta_failure_is_a_store_error_and_keeps_the_old_sidecar(
    storage: S3Storage, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = meta(b"small")
    write_all(storage, TAG, b"small").commit(old)

    def fail(**kwargs: Any) -> Any:
        raise client_error("SlowDown", "PutObject", 503)

    monkeypatch.setattr(client, "put_object", fail)
    with pytest.raises(StoreError):
        storage.update_meta(TAG, meta(b"small", stored_at=5.0))
    monkeypatch.undo()
    assert storage.stat(TAG) == old


def test_presign_names_the_digests_data(client: Any) -> None:
    storage = S3Storage(client, BUCKET, PREFIX)
    url = storage.presign(TAG, meta())
    assert url is not None and f"/{PREFIX}/{TAG}.sha256-{DIGEST.split(':')[1]}?" in url


def test_sweep_aborts_only_stale_uploads_of_this_prefix(
    storage: S3Storage, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 cannot tell a dead writer's upload from a live one's: age past the floor decides."""
    dead = write_all(storage, KEY, DATA)  # a writer that will never commit (its process died)
    foreign = client.create_multipart_upload(Bucket=BUCKET, Key=f"other-instance/{KEY}")
    junk = client.create_multipart_upload(Bucket=BUCKET, Key=f"{PREFIX}/not/a/key")
    listed = client.list_multipart_uploads(Bucket=BUCKET)["Uploads"]
    assert len(listed) == 3
    started = max(u["Initiated"].timestamp() for u in listed)  # moto's clock is its own
    now = started + 60
    monkeypatch.setattr("app.storage.s3.time.time", lambda: now)
    assert storage.sweep(0.0) == 0, "younger than STALE_UPLOAD_AGE: maybe a live writer"
    assert storage.sweep(30.0) == 0, "max_age below the floor does not lower it"
    now = started + STALE_UPLOAD_AGE + 60
    assert storage.sweep(0.0) == 1
    assert sorted(uploads(client)) == sorted([f"other-instance/{KEY}", f"{PREFIX}/not/a/key"])
    assert storage.sweep(0.0) == 0
    dead.abort()  # the abort of an upload already swept is quiet
    for upload, key in ((foreign, f"other-instance/{KEY}"), (junk, f"{PREFIX}/not/a/key")):
        client.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload["UploadId"])


def test_list_pages_through_every_sidecar(storage: S3Storage, client: Any) -> None:
    small = {}
    for i in range(1005):  # more than one ListObjectsV2 page
        data = str(i).encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        client.put_object(
            Bucket=BUCKET, Key=f"{PREFIX}/{keys.sidecar(keys.blob(digest))}", Body=b"{}"
        )
        small[keys.blob(digest)] = data
    assert sorted(storage.list("blobs/")) == sorted(small)
