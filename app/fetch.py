"""Fetching from upstream for the read path: requests, flights' fetchers, verification.

A Fetcher builds upstream requests for a Target, turns upstream answers into Replies
(bounded, with the §15 header allowlist), and runs the single-flight fetchers that fill
the spool and, once size and digest check out, the store (a blob through tee.fill, a
manifest through app/manifeststore.py). No Flask here; the decisions of when to fetch are
app/proxy.py's.
"""

from __future__ import annotations

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
from app.manifeststore import sidecar_headers, store_manifest
from app.oci import BLOB, MANIFEST, Target
from app.reply import Reply
from app.storage import NotFound, ObjectMeta, Storage, StoreError
from app.tee import CLIENT_GONE, TRUNCATED, fill
from app.upstream import ClientHeaders, Upstream

log = logging.getLogger("oci_pull_through.fetch")
ManifestFetched = Callable[[Target, ClientHeaders, str, str, bytes], None]

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
FILL_WAIT = 600.0  # how long a finished download waits for the store before letting go
_LENGTH = re.compile(r"[0-9]{1,18}")


def _content_length(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Length", "")
    return int(value) if _LENGTH.fullmatch(value) else None


def source(target: Target) -> str:
    """The (registry, repository) a request names, as recorded in a blob's sources (§15)."""
    return f"{target.registry}/{target.name}"


def _with_length(headers: list[tuple[str, str]], size: int) -> list[tuple[str, str]]:
    """Upstream's headers with our own Content-Length, for a body read whole."""
    return [
        *((k, v) for k, v in headers if k.lower() != "content-length"),
        ("Content-Length", str(size)),
    ]


def _publish_whole(
    spool: SpoolWriter, status: int, headers: list[tuple[str, str]], data: bytes
) -> None:
    """A body read whole (a manifest, an error), to every reader of the flight at once."""
    spool.publish(Head(status, _with_length(headers, len(data)), len(data)))
    spool.write(data)
    spool.end(True)


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
        return Reply(status, _with_length(headers, len(data)), data)

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
                length = _content_length(response)
                stored = store_manifest(
                    self.storage, target, key, client.accept, response, data, length
                )
                if stored is not None and self.manifest_fetched is not None:
                    self.manifest_fetched(target, client, stored.digest, stored.media_type, data)
                headers = policy.registry_headers(MANIFEST, response.headers.items())
            else:
                headers = policy.forwardable_headers(response.headers.items())
            _publish_whole(spool, response.status_code, headers, data)

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
        headers = policy.forwardable_headers(response.headers.items())
        _publish_whole(spool, response.status_code, headers, data)

    def _fill_blob(
        self, target: Target, key: str, response: requests.Response, spool: SpoolWriter
    ) -> None:
        stored = tuple(sidecar_headers(BLOB, response))
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
