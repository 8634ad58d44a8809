"""S3 backend: multipart uploads fed by the tee; the sidecar, written last, is the commit marker.

Data goes under keys.data(key, digest) (a tag's data is named after its digest) and the
sidecar, one PutObject, names it: concurrent fills never leave a sidecar describing other
bytes (SPEC §15). A tag that outgrows one part is uploaded to a temporary object and
copied to its digest's name at commit (rare: manifests are at most 4 MiB).

Writers keep at most one part in memory. Hits are presigned GET URLs (the proxy answers
307) or, with S3_REDIRECT=false, a lazily ranged GetObject stream served by the proxy.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from app.storage import NotFound, ObjectMeta, StoreError, keys
from app.storage.keys import sidecar
from app.storage.s3bucket import make_client, set_up_bucket, translated
from app.storage.s3reader import S3ObjectReader

if TYPE_CHECKING:
    from app.config import Config

log = logging.getLogger("oci_pull_through.storage.s3")

PART_SIZE = 8 * 1024 * 1024
_DAY = 86400.0


class S3Storage:
    """Objects under S3_PREFIX in S3_BUCKET; hits redirect to presigned URLs."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        presign_client: Any = None,
        presign_expiry: int = 900,
        redirect: bool = True,
        lifecycle_days: int = 0,
        part_size: int = PART_SIZE,
    ) -> None:
        self.client = client
        self.presign_client = presign_client or client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.presign_expiry = presign_expiry
        self.redirect = redirect
        self.lifecycle_days = lifecycle_days
        self.part_size = part_size

    @classmethod
    def from_config(cls, config: Config) -> S3Storage:
        """Build the clients and set up the bucket and lifecycle once, at app creation."""
        client = make_client(path_style=config.s3_force_path_style)
        presign_client = None
        if config.s3_public_endpoint_url:
            presign_client = make_client(
                endpoint_url=config.s3_public_endpoint_url, path_style=config.s3_force_path_style
            )
        set_up_bucket(client, config.s3_bucket, config.s3_prefix, config.s3_lifecycle_days)
        return cls(
            client,
            config.s3_bucket,
            config.s3_prefix,
            presign_client=presign_client,
            presign_expiry=config.s3_presign_expiry,
            redirect=config.s3_redirect,
            lifecycle_days=config.s3_lifecycle_days,
        )

    def object_key(self, key: str) -> str:
        """The S3 key of a storage key: scoped by the prefix."""
        return f"{self.prefix}/{key}" if self.prefix else key

    def data_key(self, key: str, meta: ObjectMeta) -> str:
        """The S3 key of the bytes meta describes; NotFound if meta cannot be key's."""
        try:
            return self.object_key(keys.data(key, meta.digest))
        except ValueError:
            raise NotFound(f"{key}: sidecar names {meta.digest}") from None

    def stat(self, key: str) -> ObjectMeta:
        """Read the sidecar object: an object without one does not exist.

        The data is not checked here (one request per hit): open checks it, and a presigned
        URL names the digest's data, which can hold no other bytes.
        """
        with translated(f"reading sidecar of {key}"):
            response = self.client.get_object(Bucket=self.bucket, Key=self.object_key(sidecar(key)))
            data = response["Body"].read()
        meta = ObjectMeta.from_json(data)
        if self._expires_soon(meta):
            raise NotFound(f"{key}: near its lifecycle expiry, refetch")
        return meta

    def _expires_soon(self, meta: ObjectMeta) -> bool:
        """Refetch before the lifecycle rule can delete the data under a live sidecar."""
        if self.lifecycle_days <= 0:
            return False
        margin = min(_DAY, self.lifecycle_days * _DAY / 2)
        return time.time() - meta.stored_at > self.lifecycle_days * _DAY - margin

    def _data_size(self, key: str, meta: ObjectMeta) -> int:
        """HEAD the data meta describes; NotFound if missing or not meta.size bytes."""
        object_key = self.data_key(key, meta)
        with translated(f"opening {key}"):
            size = int(self.client.head_object(Bucket=self.bucket, Key=object_key)["ContentLength"])
        if size != meta.size:
            raise NotFound(f"{key}: data of {size} bytes, sidecar says {meta.size}")
        return size

    def open(self, key: str, meta: ObjectMeta | None = None) -> S3ObjectReader:
        """A seekable reader of the data meta describes (the sidecar's when None).

        Nothing is downloaded until the first read; NotFound when that data is missing or
        its size is not meta's (the caller treats the key as a miss).
        """
        if meta is None:
            meta = self.stat(key)
        size = self._data_size(key, meta)
        return S3ObjectReader(self.client, self.bucket, self.data_key(key, meta), size)

    def writer(self, key: str) -> S3Writer:
        """Start a write that nobody can see until commit."""
        return S3Writer(self, key)

    def update_meta(self, key: str, meta: ObjectMeta) -> None:
        """Replace only the sidecar (one PutObject); NotFound unless meta's data is there."""
        self._data_size(key, meta)
        with translated(f"updating the sidecar of {key}"):
            self.client.put_object(
                Bucket=self.bucket,
                Key=self.object_key(sidecar(key)),
                Body=meta.to_json(),
                ContentType="application/json",
            )

    def delete(self, key: str) -> None:
        """Remove the sidecar first, so a half-deleted object is already invisible; then data."""
        victims = [self.object_key(key)]
        with contextlib.suppress(NotFound, StoreError):
            victims.append(self.data_key(key, self.stat(key)))
        for object_key in (self.object_key(sidecar(key)), *dict.fromkeys(victims)):
            with translated(f"deleting {object_key}"):
                self.client.delete_object(Bucket=self.bucket, Key=object_key)

    def presign(self, key: str, meta: ObjectMeta) -> str | None:
        """A presigned GET URL on the public endpoint, or None to stream (S3_REDIRECT=false)."""
        if not self.redirect:
            return None
        try:
            data_key = self.data_key(key, meta)
        except NotFound as exc:
            raise StoreError(f"presigning {key}: {exc}") from None
        params = {"Bucket": self.bucket, "Key": data_key}
        if meta.media_type:
            params["ResponseContentType"] = meta.media_type
        try:
            return str(
                self.presign_client.generate_presigned_url(
                    "get_object", Params=params, ExpiresIn=self.presign_expiry
                )
            )
        except (BotoCoreError, ClientError) as exc:
            raise StoreError(f"presigning {key}: {exc}") from exc


class S3Writer:
    """Buffers up to one part; a multipart upload starts only when a part is full.

    A content-addressed key is uploaded under its own name (every writer's bytes are the
    same); any other key's multipart upload goes to a temporary object, copied to the
    digest's name at commit, since the digest is only known then.
    """

    def __init__(self, storage: S3Storage, key: str) -> None:
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
