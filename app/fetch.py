"""Fetching from upstream for the read path: requests, flights' fetchers, verification.

A Fetcher builds upstream requests for a Target, turns upstream answers into Replies
(bounded, with the §15 header allowlist), and runs the single-flight fetchers that fill
the spool and, once size and digest check out, the store. No Flask here; the decisions
of when to fetch are app/proxy.py's.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable

import gevent
import requests

from app import metrics, policy
from app.bodies import MAX_ERROR_BODY, TooLarge, iter_body, raw_chunks, read_limited
from app.config import Config
from app.errors import RegistryError, UpstreamUnavailable
from app.flight import Head, SpoolWriter
from app.oci import BLOB, MANIFEST, Target
from app.reply import Reply
from app.storage import NotFound, ObjectMeta, Storage, StoreError, keys, put
from app.tee import CLIENT_GONE, COMMITTED, DIGEST_MISMATCH, STORE_ERROR, TRUNCATED, fill
from app.upstream import ClientHeaders, Upstream

log = logging.getLogger("oci_pull_through.fetch")
ManifestFetched = Callable[[Target, ClientHeaders, str, str, bytes], None]

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
FILL_WAIT = 600.0  # how long a finished download waits for the store before letting go
_LENGTH = re.compile(r"[0-9]{1,18}")


def _digest_of(data: bytes, algorithm: str) -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _content_length(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Length", "")
    return int(value) if _LENGTH.fullmatch(value) else None


def source(target: Target) -> str:
    """The (registry, repository) a request names, as recorded in a blob's sources (§15)."""
    return f"{target.registry}/{target.name}"


def _without_length(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() != "content-length"]


def _read_while_wanted(
    response: requests.Response, limit: int, wanted: Callable[[], bool]
) -> bytes | None:
    """The body up to limit bytes (TooLarge past it), or None once nobody wants it."""
    parts: list[bytes] = []
    size = 0
    for chunk in raw_chunks(response, min(limit + 1, 1024 * 1024)):
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"more than {limit} bytes")
        parts.append(chunk)
        if not wanted():
            return None
    return b"".join(parts)


class Fetcher:
    """Talks to upstream on the read path's behalf and fills the store from verified bytes."""

    def __init__(self, config: Config, storage: Storage, upstream: Upstream) -> None:
        self.config = config
        self.storage = storage
        self.upstream = upstream
        # Told of each verified image manifest a flight fetched (the proxy's prefetch).
        self.manifest_fetched: ManifestFetched | None = None

    def send(
        self,
        method: str,
        target: Target,
        client: ClientHeaders,
        *,
        params: list[tuple[str, str]] | None = None,
        forward_range: bool = False,
        follow_redirects: bool = False,
    ) -> requests.Response:
        """One upstream request for the target's endpoint, through the allowlist and guard."""
        endpoint = {
            "manifest": "manifests",
            "blob": "blobs",
            "referrers": "referrers",
            "tags": "tags",
        }[target.kind]
        path = f"/v2/{target.name}/{endpoint}/{target.reference}"
        return self.upstream.send(
            method,
            target.registry,
            path,
            client,
            name=target.name,
            params=params,
            forward_range=forward_range,
            follow_redirects=follow_redirects,
        )

    def forward(self, response: requests.Response, method: str, target: Target) -> Reply:
        """Upstream's own answer: a 2xx blob or manifest with the §15 headers only; manifests
        and error bodies read whole up to their caps, blobs and listings streamed."""
        status = response.status_code
        ok = 200 <= status < 300
        if ok and target.kind in (BLOB, MANIFEST):
            headers = policy.registry_headers(target.kind, response.headers.items(), lengths=True)
        else:
            headers = policy.forwardable_headers(response.headers.items())
        if method == "HEAD":
            response.close()
            return Reply(status, headers)
        if ok and target.kind != MANIFEST:
            return Reply(status, headers, iter_body(response, target.registry))
        limit = MAX_MANIFEST_BYTES if ok else MAX_ERROR_BODY
        with response:
            try:
                data = read_limited(response, limit)
            except TooLarge:
                what = "manifest" if ok else "error body"
                raise UpstreamUnavailable(
                    target.registry, f"{what} larger than {limit} bytes"
                ) from None
            except Exception as exc:
                raise UpstreamUnavailable(target.registry, f"body failed: {exc}") from None
        return Reply(status, [*_without_length(headers), ("Content-Length", str(len(data)))], data)

    def lookup(self, key: str) -> ObjectMeta | None:
        """The committed object's meta; a store failure counts as a miss (go upstream)."""
        try:
            return self.storage.stat(key)
        except NotFound:
            return None
        except StoreError as exc:
            log.warning("cache lookup of %s failed (%s); going upstream", key, exc)
            return None

    def fetch_manifest(
        self, target: Target, key: str, client: ClientHeaders, spool: SpoolWriter
    ) -> None:
        """The flight's fetcher for a manifest: read whole (at most 4 MiB), verified and stored
        before anyone sees it, so a client's follow-up request by digest is already a hit."""
        try:
            response = self.send("GET", target, client)
        except RegistryError as error:
            spool.fail_before_head(error)
            return
        with response:
            ok = response.status_code == 200
            limit = MAX_MANIFEST_BYTES if ok else MAX_ERROR_BODY
            try:
                data = _read_while_wanted(response, limit, spool.has_readers)
            except TooLarge:
                what = "manifest" if ok else "error body"
                spool.fail_before_head(
                    UpstreamUnavailable(target.registry, f"{what} larger than {limit} bytes")
                )
                return
            except Exception as exc:  # truncated or reset: nothing reached a client yet
                spool.fail_before_head(UpstreamUnavailable(target.registry, f"{exc}"))
                return
            if data is None:  # every client left: abandoned (§15)
                spool.fail_before_head(UpstreamUnavailable(target.registry, "every client left"))
                metrics.fill_finished("manifest", CLIENT_GONE)
                return
            if ok:
                stored = self._store_manifest(
                    target, key, client, response, data, _content_length(response)
                )
                if stored is not None and self.manifest_fetched is not None:
                    self.manifest_fetched(target, client, stored.digest, stored.media_type, data)
                headers = policy.registry_headers(MANIFEST, response.headers.items())
            else:
                headers = _without_length(policy.forwardable_headers(response.headers.items()))
            headers.append(("Content-Length", str(len(data))))
            spool.publish(Head(response.status_code, headers, len(data)))
            spool.write(data)
            spool.end(True)

    def _store_manifest(
        self,
        target: Target,
        key: str,
        client: ClientHeaders,
        response: requests.Response,
        data: bytes,
        length: int | None,
    ) -> ObjectMeta | None:
        """Store a verified manifest under its digest and, for a tag, under the tag too;
        its meta, or None when the bytes cannot be trusted.

        Only an answer to a client that accepts every index and image manifest type becomes
        the tag's entry (§15 "Tags"); a narrower one is kept by digest only.
        """
        digest = self._verified_manifest_digest(target, response, data, length)
        if digest is None:
            wrong_size = length is not None and len(data) != length
            metrics.fill_finished("manifest", TRUNCATED if wrong_size else DIGEST_MISMATCH)
            return None
        meta = ObjectMeta(
            digest=digest,
            size=len(data),
            media_type=policy.media_type(MANIFEST, response.headers.get("Content-Type")),
            headers=tuple(self._stored_headers(MANIFEST, response)),
            sources=(f"{target.registry}/{target.name}",),
        )
        stores = [keys.manifest(target.registry, target.name, digest)]
        if not target.is_digest and policy.may_write_tag(client.accept):
            stores.append(key)
        try:
            for store_key in stores:
                put(self.storage, store_key, [data], meta)
            metrics.fill_finished("manifest", COMMITTED)
        except StoreError as exc:
            log.warning("cache commit of %s failed: %s", key, exc)
            metrics.fill_finished("manifest", STORE_ERROR)
        return meta

    def _verified_manifest_digest(
        self, target: Target, response: requests.Response, data: bytes, length: int | None
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
            log.warning(
                "manifest %s does not match digest %s; not cached", target.reference, expected
            )
            return None
        return expected

    def fetch_blob(
        self, target: Target, key: str, client: ClientHeaders, spool: SpoolWriter
    ) -> None:
        """The flight's fetcher: upstream into the spool; a 200 also fills the store from it."""
        try:
            response = self.send("GET", target, client, follow_redirects=True)
        except RegistryError as error:
            spool.fail_before_head(error)
            return
        with response:
            length = _content_length(response)
            if response.status_code != 200:
                self._publish_error(target, response, spool)
                return
            headers = policy.registry_headers(BLOB, response.headers.items(), lengths=True)
            spool.publish(Head(response.status_code, headers, length))
            filler = gevent.spawn(self._fill_blob, target, key, response, spool)
            try:
                for chunk in raw_chunks(response):
                    spool.write(chunk)
                    if not spool.has_readers():
                        spool.end(False, CLIENT_GONE)
                        break
                else:
                    spool.end(True)
            except Exception as exc:
                log.warning("upstream body of %s failed: %s", target.reference[:19], exc)
                spool.end(False, TRUNCATED)
        if not filler.join(timeout=FILL_WAIT) and not filler.dead:
            log.warning("store still writing %s after %.0fs", target.reference[:19], FILL_WAIT)

    def _publish_error(
        self, target: Target, response: requests.Response, spool: SpoolWriter
    ) -> None:
        """An upstream error answer, body capped at 64 KiB, to every reader of the flight."""
        try:
            data = read_limited(response, MAX_ERROR_BODY)
        except TooLarge:
            spool.fail_before_head(UpstreamUnavailable(target.registry, "error body too large"))
            return
        except Exception as exc:
            spool.fail_before_head(UpstreamUnavailable(target.registry, f"{exc}"))
            return
        headers = _without_length(policy.forwardable_headers(response.headers.items()))
        headers.append(("Content-Length", str(len(data))))
        spool.publish(Head(response.status_code, headers, len(data)))
        spool.write(data)
        spool.end(True)

    def _fill_blob(
        self, target: Target, key: str, response: requests.Response, spool: SpoolWriter
    ) -> None:
        stored = tuple(self._stored_headers(BLOB, response))
        media_type = policy.media_type(BLOB, response.headers.get("Content-Type"))

        def make_meta(digest: str, size: int) -> ObjectMeta:
            # Sources verified earlier stay (a lost race only forgets one: fails closed).
            earlier = self.lookup(key)
            known = earlier.sources if earlier is not None and earlier.digest == digest else ()
            sources = tuple(dict.fromkeys((*known, source(target))))
            return ObjectMeta(
                digest=digest, size=size, media_type=media_type, headers=stored, sources=sources
            )

        try:
            writer = self.storage.writer(key)
        except StoreError as exc:
            log.warning("cache fill %s: store error: %s", target.reference[:19], exc)
            return
        result = fill(
            spool.tail(),
            writer,
            expected_digest=target.reference,
            expected_size=_content_length(response),
            make_meta=make_meta,
            source_path=spool.spool_path,
        )
        log.info("cache fill %s: %s", target.reference[:19], result)
        metrics.fill_finished("blob", result)

    @staticmethod
    def _stored_headers(kind: str, response: requests.Response) -> list[tuple[str, str]]:
        """What a sidecar keeps of upstream's headers: the §15 allowlist, no lengths."""
        return [
            (k, v)
            for k, v in policy.registry_headers(kind, response.headers.items())
            if k.lower() != "content-type"
        ]
