"""S3 plumbing: the boto3 client, error translation, and the bucket and lifecycle set-up."""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from app.storage import NotFound, StoreError

log = logging.getLogger("oci_pull_through.storage.s3")

RULE_ID_PREFIX = "oci-pull-through:"
ABORT_INCOMPLETE_DAYS = 1  # safety net for uploads of a process killed mid-write
SETUP_ATTEMPTS = 10  # S3 may start after us (docker compose): about 10 s of patience
NOT_FOUND_CODES = ("NoSuchKey", "404", "NotFound")


def error_code(exc: ClientError) -> str:
    """The S3 error code ("NoSuchKey", "404", ...) of a botocore ClientError."""
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """botocore errors become ours: a missing key is NotFound, anything else StoreError."""
    try:
        yield
    except ClientError as exc:
        if error_code(exc) in NOT_FOUND_CODES:
            raise NotFound(what) from None
        raise StoreError(f"{what}: {exc}") from exc
    except BotoCoreError as exc:
        raise StoreError(f"{what}: {exc}") from exc


def make_client(*, endpoint_url: str | None = None, path_style: bool = True) -> Any:
    """An S3 client on the standard credential chain; AWS_ENDPOINT_URL applies when no URL."""
    config = BotoConfig(
        signature_version="s3v4",  # presigned URLs must be SigV4 (SigV2 is gone on AWS)
        s3={"addressing_style": "path" if path_style else "auto"},
        # S3-compatible servers differ in checksum support; send and check only what's required.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=64,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def ensure_bucket(client: Any, bucket: str) -> None:
    """Create the bucket unless it exists; a concurrent create by another worker is fine."""
    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        if error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
            if error_code(exc) in ("403", "AccessDenied"):
                log.warning("cannot HEAD bucket %s (access denied); assuming it exists", bucket)
                return
            raise StoreError(f"checking bucket {bucket}: {exc}") from exc
    region = client.meta.region_name
    extra = {}
    if region and region not in ("us-east-1", "aws-global"):
        extra["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(Bucket=bucket, **extra)
        log.info("created bucket %s", bucket)
    except ClientError as exc:
        if error_code(exc) == "BucketAlreadyOwnedByYou":
            return
        if error_code(exc) == "BucketAlreadyExists":  # some servers say this on a race
            try:
                client.head_bucket(Bucket=bucket)
                return
            except ClientError:
                pass
        raise StoreError(f"creating bucket {bucket}: {exc}") from exc


def rule_id(prefix: str) -> str:
    """Our rule's ID: one per prefix, so instances sharing a bucket keep separate rules."""
    return RULE_ID_PREFIX + (prefix or "/")


def our_rule(prefix: str, days: int) -> dict[str, Any]:
    """Expire everything under the prefix after days; drop stranded multipart uploads."""
    return {
        "ID": rule_id(prefix),
        "Filter": {"Prefix": f"{prefix}/" if prefix else ""},
        "Status": "Enabled",
        "Expiration": {"Days": days},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_INCOMPLETE_DAYS},
    }


def merge_rules(existing: list[dict[str, Any]], prefix: str, days: int) -> list[dict[str, Any]]:
    """Every other rule untouched, ours replaced (days > 0) or removed (days == 0)."""
    others = [rule for rule in existing if rule.get("ID") != rule_id(prefix)]
    return [*others, our_rule(prefix, days)] if days > 0 else others


def _current_rules(client: Any, bucket: str) -> list[dict[str, Any]]:
    try:
        return list(client.get_bucket_lifecycle_configuration(Bucket=bucket).get("Rules", []))
    except ClientError as exc:
        if error_code(exc) == "NoSuchLifecycleConfiguration":
            return []
        raise


def _is_current(existing: list[dict[str, Any]], prefix: str, days: int) -> bool:
    mine = [rule for rule in existing if rule.get("ID") == rule_id(prefix)]
    if days == 0:
        return not mine
    want = our_rule(prefix, days)
    return len(mine) == 1 and all(mine[0].get(k) == v for k, v in want.items())


def apply_lifecycle(client: Any, bucket: str, prefix: str, days: int) -> None:
    """Read-modify-write the bucket lifecycle so only our prefix's rule changes.

    S3 has no conditional lifecycle write: two instances with different prefixes starting
    in the same instant can still lose one rule; that instance restores it on its next start.
    """
    try:
        existing = _current_rules(client, bucket)
        if _is_current(existing, prefix, days):
            return
        rules = merge_rules(existing, prefix, days)
        if rules:
            client.put_bucket_lifecycle_configuration(
                Bucket=bucket, LifecycleConfiguration={"Rules": rules}
            )
        else:
            client.delete_bucket_lifecycle(Bucket=bucket)
        log.info("lifecycle of %s: rule %s %s", bucket, rule_id(prefix), days or "removed")
    except ClientError as exc:
        # The cache works without expiry; a missing permission must not stop the proxy.
        log.warning("could not update the lifecycle of bucket %s: %s", bucket, exc)


def set_up_bucket(client: Any, bucket: str, prefix: str, lifecycle_days: int) -> None:
    """Bucket and lifecycle, retried while the endpoint is not reachable yet."""
    for attempt in range(SETUP_ATTEMPTS):
        try:
            ensure_bucket(client, bucket)
            apply_lifecycle(client, bucket, prefix, lifecycle_days)
            return
        except EndpointConnectionError as exc:
            if attempt + 1 == SETUP_ATTEMPTS:
                raise StoreError(f"S3 endpoint unreachable: {exc}") from exc
            log.warning("S3 endpoint unreachable (%s); retrying", exc)
            time.sleep(1.0)
        except BotoCoreError as exc:
            raise StoreError(f"setting up bucket {bucket}: {exc}") from exc


def list_names(client: Any, bucket: str, prefix: str) -> Iterator[str]:
    """Every object key in bucket starting with prefix (all pages)."""
    with translated(f"listing {prefix}"):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", []):
                yield str(item["Key"])


def abort_uploads(
    client: Any, bucket: str, prefix: str, before: float, ours: Callable[[str], bool]
) -> int:
    """Abort the multipart uploads under prefix started before `before` whose key is ours."""
    aborted = 0
    with translated(f"listing the uploads under {prefix}"):
        paginator = client.get_paginator("list_multipart_uploads")
        pages = paginator.paginate(Bucket=bucket, Prefix=prefix)
        stale = [
            upload
            for page in pages
            for upload in page.get("Uploads", [])
            if _timestamp(upload.get("Initiated")) < before and ours(str(upload["Key"]))
        ]
    for upload in stale:
        try:
            client.abort_multipart_upload(
                Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
            aborted += 1
        except ClientError as exc:
            if error_code(exc) != "NoSuchUpload":  # another sweeper was first
                raise StoreError(f"aborting the upload of {upload['Key']}: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"aborting the upload of {upload['Key']}: {exc}") from exc
    return aborted


def _timestamp(value: object) -> float:
    """An S3 listing's time as seconds since the epoch; unknown counts as now (kept)."""
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    return time.time()
