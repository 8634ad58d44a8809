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
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from botocore.exceptions import BotoCoreError, ClientError

from app.storage import BlobWriter, NotFound, ObjectMeta, Storage, StoreError, keys, span_end
from app.storage.keys import sidecar
from app.storage.s3bucket import (
    abort_uploads,
    list_names,
    make_client,
    set_up_bucket,
    translated,
)
from app.storage.s3reader import S3ObjectReader
from app.storage.s3writer import S3Writer

if TYPE_CHECKING:
    from app.config import Config

log = logging.getLogger("oci_pull_through.storage.s3")

PART_SIZE = 8 * 1024 * 1024
_DAY = 86400.0
# S3 cannot tell a live writer's multipart upload from a dead one's: only age does.
STALE_UPLOAD_AGE = _DAY


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
        return self.object_key(meta.data_key(key))

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

    def open(
        self, key: str, meta: ObjectMeta | None = None, offset: int = 0, length: int | None = None
    ) -> BinaryIO:
        """A seekable reader of the span of the data meta describes (the sidecar's when None).

        Nothing is downloaded until the first read, and then only the span (one ranged
        GetObject); NotFound when that data is missing or its size is not meta's (the
        caller treats the key as a miss).
        """
        if meta is None:
            meta = self.stat(key)
        end = span_end(meta.size, offset, length)
        size = self._data_size(key, meta)
        reader = S3ObjectReader(
            self.client, self.bucket, self.data_key(key, meta), size, offset, end
        )
        return cast(BinaryIO, reader)  # a RawIOBase: every BinaryIO method callers use

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

    def list(self, prefix: str = "") -> Iterator[str]:
        """Committed keys under prefix: objects named like a sidecar (keys.parse), in key order."""
        strip = len(self.object_key(""))
        for name in list_names(self.client, self.bucket, self.object_key(prefix)):
            parsed = keys.parse(name[strip:])
            if parsed is not None and parsed.part == "sidecar":
                yield parsed.key

    def sweep(self, max_age: float = 0.0) -> int:
        """Abort multipart uploads under the prefix older than max(max_age, STALE_UPLOAD_AGE).

        S3 cannot tell a live writer's upload from a dead one's, so age is the only signal
        and the floor protects slow live fills. Completed temporary uploads of large tags
        left by a crash are not listed here (a full listing); the lifecycle rule expires them.
        """
        strip = len(self.object_key(""))
        before = time.time() - max(max_age, STALE_UPLOAD_AGE)
        return abort_uploads(
            self.client,
            self.bucket,
            self.object_key(""),
            before,
            lambda name: keys.parse(name[strip:]) is not None,
        )


if TYPE_CHECKING:

    def _conforms(storage: S3Storage, writer: S3Writer) -> tuple[Storage, BlobWriter]:
        """Never called: mypy fails here when this backend drifts from the protocol."""
        return storage, writer
