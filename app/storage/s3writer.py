"""S3 writes: at most one part buffered, a multipart upload only once a part is full."""

from __future__ import annotations

import contextlib
import logging
import secrets
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from app.storage import NotFound, ObjectMeta, StoreError, keys
from app.storage.keys import sidecar
from app.storage.s3bucket import translated


class Bucket(Protocol):
    """What a writer needs of its S3Storage (a protocol, so s3.py and this module form no
    import cycle)."""

    client: Any
    bucket: str
    part_size: int

    def object_key(self, key: str) -> str: ...


log = logging.getLogger("oci_pull_through.storage.s3")


class S3Writer:
    """Buffers up to one part; a multipart upload starts only when a part is full.

    A content-addressed key is uploaded under its own name (every writer's bytes are the
    same); any other key's multipart upload goes to a temporary object, copied to the
    digest's name at commit, since the digest is only known then.
    """

    def __init__(self, storage: Bucket, key: str) -> None:
        self.storage = storage
        self.key = key
        if keys.content_digest(key) is not None:
            self.upload_key = storage.object_key(key)
        else:
            self.upload_key = storage.object_key(keys.upload(key, secrets.token_hex(8)))
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._done = False

    def may_adopt(self) -> bool:
        """S3 cannot take a local file without uploading it: the caller writes."""
        return False

    def adopt(self, path: str) -> bool:
        """Never: uploading the file is what write does."""
        return False

    def write(self, chunk: bytes) -> None:
        """Buffer the chunk; upload a part once the buffer holds a full one."""
        if self._done:
            raise StoreError("write after commit or abort")
        if not chunk:
            return
        self._chunks.append(bytes(chunk))
        self._buffered += len(chunk)
        if self._buffered >= self.storage.part_size:
            try:
                self._upload_part()
            except (StoreError, NotFound) as exc:
                self.abort()
                raise StoreError(str(exc)) from exc

    def _take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    def _upload_part(self) -> None:
        s = self.storage
        with translated(f"uploading a part of {self.key}"):
            if self._upload_id is None:
                created = s.client.create_multipart_upload(Bucket=s.bucket, Key=self.upload_key)
                self._upload_id = str(created["UploadId"])
            number = len(self._parts) + 1
            response = s.client.upload_part(
                Bucket=s.bucket,
                Key=self.upload_key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=self._take(),
            )
            self._parts.append({"ETag": response["ETag"], "PartNumber": number})

    def commit(self, meta: ObjectMeta) -> None:
        """Make the verified object visible: data under its digest's name, then the sidecar.

        No old sidecar is deleted first: the new one replaces it in one PutObject and names
        its own data. A failure after the data is written leaves it without a sidecar naming
        it (invisible; S3_LIFECYCLE_DAYS expires it): deleting it could remove data that a
        concurrent committer's sidecar (same digest) names.
        """
        if self._done:
            raise StoreError("commit after commit or abort")
        s = self.storage
        temp_written = False
        multipart = self._upload_id is not None  # only large objects can leave stray uploads
        try:
            data_key = s.object_key(keys.data(self.key, meta.digest))
        except ValueError as exc:
            self.abort()
            raise StoreError(f"committing {self.key}: {exc}") from exc
        try:
            with translated(f"committing {self.key}"):
                if self._upload_id is None:
                    s.client.put_object(Bucket=s.bucket, Key=data_key, Body=self._take())
                else:
                    if self._buffered:
                        self._upload_part()  # the last part may be smaller than part_size
                    s.client.complete_multipart_upload(
                        Bucket=s.bucket,
                        Key=self.upload_key,
                        UploadId=self._upload_id,
                        MultipartUpload={"Parts": self._parts},
                    )
                    self._upload_id = None
                    if self.upload_key != data_key:
                        temp_written = True
                        s.client.copy_object(
                            Bucket=s.bucket,
                            Key=data_key,
                            CopySource={"Bucket": s.bucket, "Key": self.upload_key},
                        )
                        self._drop_temp()
                        temp_written = False
                s.client.put_object(
                    Bucket=s.bucket,
                    Key=s.object_key(sidecar(self.key)),
                    Body=meta.to_json(),
                    ContentType="application/json",
                )
        except (StoreError, NotFound) as exc:
            if temp_written:
                with contextlib.suppress(StoreError, NotFound):
                    self._drop_temp()
            self.abort()
            raise StoreError(f"committing {self.key}: {exc}") from exc
        self._done = True
        if multipart:
            self._abort_strays(data_key)

    def _abort_strays(self, data_key: str) -> None:
        """Abort other uploads of this data key: the bytes are committed, and an upload left by
        a writer that died (a replica killed mid-fill) would otherwise linger for a day."""
        s = self.storage
        try:
            listed = s.client.list_multipart_uploads(Bucket=s.bucket, Prefix=data_key)
            for upload in listed.get("Uploads", []):
                if upload.get("Key") == data_key:
                    s.client.abort_multipart_upload(
                        Bucket=s.bucket, Key=data_key, UploadId=upload["UploadId"]
                    )
        except (ClientError, BotoCoreError) as exc:  # the lifecycle rule is the safety net
            log.info("aborting stray uploads of %s: %s", self.key, exc)

    def _drop_temp(self) -> None:
        """Delete the completed temporary upload of a non-content-addressed key."""
        s = self.storage
        with translated(f"deleting the upload of {self.key}"):
            s.client.delete_object(Bucket=s.bucket, Key=self.upload_key)

    def abort(self) -> None:
        """Drop the buffer and abort the multipart upload; idempotent, never raises."""
        self._done = True
        self._chunks.clear()
        self._buffered = 0
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            return
        s = self.storage
        try:
            s.client.abort_multipart_upload(
                Bucket=s.bucket, Key=self.upload_key, UploadId=upload_id
            )
        except (ClientError, BotoCoreError) as exc:
            # The lifecycle rule's AbortIncompleteMultipartUpload is the safety net.
            log.warning("aborting the upload of %s failed: %s", self.key, exc)
