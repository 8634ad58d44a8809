"""A fetched manifest becomes a cache entry only once its bytes are verified (SPEC §15).

Its length must match Content-Length and its bytes the requested digest or, for a tag,
Docker-Content-Digest; it is then stored under its digest and, for an answer to a client
that accepts every index and image manifest type, under the tag too. Blobs are verified
while they stream, by tee.fill. sidecar_headers is what either's sidecar keeps.
"""

from __future__ import annotations

import hashlib
import logging

import requests

from app import metrics, policy
from app.oci import MANIFEST, Target
from app.storage import ObjectMeta, Storage, StoreError, keys, put
from app.tee import COMMITTED, DIGEST_MISMATCH, STORE_ERROR, TRUNCATED

log = logging.getLogger("oci_pull_through.fetch")


def store_manifest(
    storage: Storage,
    target: Target,
    key: str,
    accept: tuple[str, ...],
    response: requests.Response,
    data: bytes,
    length: int | None,
) -> ObjectMeta | None:
    """Store a verified manifest under its digest and, for a tag, under the tag too;
    its meta, or None when the bytes cannot be trusted.

    Only an answer to a client that accepts every index and image manifest type becomes
    the tag's entry (§15 "Tags"); a narrower one is kept by digest only.
    """
    digest = verified_digest(target, response, data, length)
    if digest is None:
        wrong_size = length is not None and len(data) != length
        metrics.fill_finished("manifest", TRUNCATED if wrong_size else DIGEST_MISMATCH)
        return None
    meta = ObjectMeta(
        digest=digest,
        size=len(data),
        media_type=policy.media_type(MANIFEST, response.headers.get("Content-Type")),
        headers=tuple(sidecar_headers(MANIFEST, response)),
        sources=(f"{target.registry}/{target.name}",),
    )
    stores = [keys.manifest(target.registry, target.name, digest)]
    if not target.is_digest and policy.may_write_tag(accept):
        stores.append(key)
    try:
        for store_key in stores:
            put(storage, store_key, [data], meta)
        metrics.fill_finished("manifest", COMMITTED)
    except StoreError as exc:
        log.warning("cache commit of %s failed: %s", key, exc)
        metrics.fill_finished("manifest", STORE_ERROR)
    return meta


def verified_digest(
    target: Target, response: requests.Response, data: bytes, length: int | None
) -> str | None:
    """The digest to store under, or None when the bytes cannot be trusted."""
    if length is not None and len(data) != length:
        log.warning(
            "manifest %s: %d bytes, Content-Length %d; not cached",
            target.reference,
            len(data),
            length,
        )
        return None
    expected = (
        target.reference if target.is_digest else response.headers.get("Docker-Content-Digest")
    )
    if not expected or ":" not in expected:
        log.warning("manifest %s has no Docker-Content-Digest; not cached", target.reference)
        return None
    algorithm = expected.split(":", 1)[0]
    if algorithm not in ("sha256", "sha512") or _digest_of(data, algorithm) != expected:
        log.warning("manifest %s does not match digest %s; not cached", target.reference, expected)
        return None
    return expected


def sidecar_headers(kind: str, response: requests.Response) -> list[tuple[str, str]]:
    """What a sidecar keeps of upstream's headers: the §15 allowlist, no lengths."""
    return [
        (k, v)
        for k, v in policy.registry_headers(kind, response.headers.items())
        if k.lower() != "content-type"
    ]


def _digest_of(data: bytes, algorithm: str) -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
