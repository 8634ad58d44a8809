"""The read path: for each request, consult the policy, then the cache, upstream and the tee.

No Flask here: every method returns a Reply that the blueprint turns into a response.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from typing import TypeVar

import gevent
import requests

from app import freshness, metrics, policy, serve
from app.config import AUTHENTICATED, Config
from app.errors import RegistryError, UpstreamUnavailable
from app.flight import FlightGone, Flights, Head, SpoolWriter, Uncoalescible
from app.oci import BLOB, MANIFEST, TAGS, Target, accepts
from app.policy import Action
from app.reply import MISS, Reply
from app.storage import NotFound, ObjectMeta, Storage, StoreError, keys, put
from app.tee import CLIENT_GONE, COMMITTED, DIGEST_MISMATCH, STORE_ERROR, TRUNCATED, fill
from app.upstream import (
    MAX_ERROR_BODY,
    ClientHeaders,
    TooLarge,
    Upstream,
    iter_body,
    raw_chunks,
    read_limited,
)

log = logging.getLogger("oci_pull_through.proxy")
T = TypeVar("T")
ClientGoneCheck = Callable[[], bool] | None

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
FILL_WAIT = 600.0  # how long a finished download waits for the store before letting go


def _digest_of(data: bytes, algorithm: str) -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _header(response: requests.Response, name: str) -> str | None:
    return response.headers.get(name)


_LENGTH = re.compile(r"[0-9]{1,18}")


def _content_length(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Length", "")
    return int(value) if _LENGTH.fullmatch(value) else None


class Proxy:
    """Answers registry reads from the cache or upstream, per the proxy mode."""

    def __init__(
        self, config: Config, storage: Storage, upstream: Upstream, flights: Flights
    ) -> None:
        self.config = config
        self.storage = storage
        self.upstream = upstream
        self.flights = flights

    # -- /v2/ ---------------------------------------------------------------------------

    def ping(self, client: ClientHeaders, challenge: str) -> Reply:
        """The version check (§12): the proxy's own challenge, or 200 once a client has a token.

        Credentials are checked upstream on real requests, never here.
        """
        headers = [("Content-Type", "application/json")]
        if client.authorization:
            return Reply(200, headers, b"{}")
        body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
        return Reply(401, [*headers, ("WWW-Authenticate", challenge)], body)

    # -- manifests ------------------------------------------------------------------------

    def manifest(
        self, target: Target, method: str, client: ClientHeaders, gone: ClientGoneCheck = None
    ) -> Reply:
        """A manifest by tag or digest (§5, §6, §15)."""
        self.upstream.check_allowed(target.registry)  # before the cache: §15
        key = keys.manifest(target.registry, target.name, target.reference)
        cacheable = policy.is_cacheable(target, self.config)
        meta = self._lookup(key) if cacheable else None
        if (
            meta is not None
            and not target.is_digest
            and not accepts(list(client.accept), meta.media_type)
        ):
            meta = None
        action = policy.plan(self.config.proxy_mode, method, meta is not None, cacheable)
        if action is Action.CHECK_THEN_SERVE and meta is not None:
            check = self._send("HEAD", target, client)
            check.close()
            if check.status_code != 200:
                action = Action.FORWARD
            elif target.is_digest or _header(check, "Docker-Content-Digest") == meta.digest:
                action = Action.SERVE
                meta = freshness.checked(
                    self, target, key, meta, _header(check, "Docker-Content-Digest")
                )
            else:
                action = Action.FORWARD_AND_FILL  # the tag moved upstream
        elif action is Action.SERVE and meta and freshness.is_stale(target, meta, self.config):
            action, meta = freshness.revalidate(self, target, key, meta, client)  # §13
        if action is Action.SERVE and meta is not None:
            reply = serve.manifest_from_cache(self.storage, self.config, target, key, meta, method)
            if reply is not None:
                return reply
            action = policy.plan(self.config.proxy_mode, method, False, cacheable)
        if action is Action.FORWARD_AND_FILL and method == "GET":
            # A cached copy that brought us here (moved or stale upstream) must not be served.
            return self._coalesced_manifest(
                target, key, client, meta.digest if meta else None, gone
            )
        response = self._send(method, target, client)
        return self._forward(response, method, target)

    def _store_manifest(
        self,
        target: Target,
        key: str,
        client: ClientHeaders,
        response: requests.Response,
        data: bytes,
        length: int | None,
    ) -> None:
        """Store a verified manifest under its digest and, for a tag, under the tag too.

        Only an answer to a client that accepts indexes and image manifests alike becomes
        the tag's entry (§15 "Tags"); a narrower one is kept by digest only.
        """
        digest = self._verified_manifest_digest(target, response, data, length)
        if digest is None:
            wrong_size = length is not None and len(data) != length
            metrics.fill_finished("manifest", TRUNCATED if wrong_size else DIGEST_MISMATCH)
            return
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
            target.reference if target.is_digest else _header(response, "Docker-Content-Digest")
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

    # -- blobs ----------------------------------------------------------------------------

    def blob(
        self, target: Target, method: str, client: ClientHeaders, gone: ClientGoneCheck = None
    ) -> Reply:
        """A blob: always cached, served with sendfile or a presigned redirect on a hit."""
        self.upstream.check_allowed(target.registry)  # before the cache: §15
        key = keys.blob(target.reference)
        meta = self._usable_blob(target, key)
        action = policy.plan(self.config.proxy_mode, method, meta is not None, True)
        if action is Action.CHECK_THEN_SERVE and meta is not None:
            check = self._send("HEAD", target, client, follow_redirects=True)
            check.close()
            action = Action.SERVE if check.status_code == 200 else Action.FORWARD
        if action is Action.SERVE and meta is not None:
            reply = serve.blob_from_cache(
                self.storage, self.config, target, key, meta, method, client
            )
            if reply is not None:
                return reply
            action = policy.plan(self.config.proxy_mode, method, False, True)
        if action is Action.FORWARD_AND_FILL and method == "GET" and not client.range:
            return self._coalesced_blob(target, key, client, gone)
        response = self._send(method, target, client, forward_range=True, follow_redirects=True)
        return self._forward(response, method, target)

    def _usable_blob(self, target: Target, key: str) -> ObjectMeta | None:
        """The cached blob this request may be served from, before any upstream check.

        In authenticated mode only a blob verified through this very (registry, repository)
        counts: a digest is no secret, and another registry answering HEAD 200 proves
        nothing about who may read bytes fetched with someone else's credentials (§15).
        """
        meta = self._lookup(key)
        if meta is None or self.config.proxy_mode != AUTHENTICATED:
            return meta
        return meta if _source(target) in meta.sources else None

    def _flight_key(self, target: Target, key: str) -> str:
        """Who may share a download: one registry in transparent mode, one repository in
        authenticated mode, so no party's upstream ever answers for another's."""
        if self.config.proxy_mode == AUTHENTICATED:
            return f"{key}|{_source(target)}"
        return f"{key}|{target.registry}"

    def _coalesced(
        self,
        target: Target,
        flight_key: str,
        client: ClientHeaders,
        from_cache: Callable[[], Reply | None],
        fetch: Callable[[SpoolWriter], None],
        gone: ClientGoneCheck = None,
    ) -> Reply:
        """A miss joins the instance's single flight for the object (app/flight.py)."""
        redirects = target.kind == BLOB
        for _ in range(5):
            ticket = self.flights.join(flight_key)
            if ticket.leader:
                reply = from_cache()  # the previous flight may have just committed
                if reply is not None:
                    ticket.release()
                    return reply
                ticket.start(fetch)
            elif self.config.proxy_mode == AUTHENTICATED:
                # Another client's credentials fetched it: this one must be entitled too.
                check = self._send("HEAD", target, client, follow_redirects=redirects)
                check.close()
                if check.status_code != 200:
                    ticket.release()
                    response = self._send("GET", target, client, follow_redirects=redirects)
                    return self._forward(response, "GET", target)
            try:
                head, spool_fd = _watching(gone, ticket.head)
            except FlightGone:
                ticket.release()
                continue
            except Uncoalescible:
                ticket.release()
                response = self._send("GET", target, client, follow_redirects=redirects)
                return self._forward(response, "GET", target)
            except BaseException:
                ticket.release()
                raise
            body = ticket.body(spool_fd, head.length)
            if not ticket.leader:
                metrics.COALESCED.inc()
            return Reply(head.status, head.headers, body, outcome=MISS)
        raise UpstreamUnavailable(target.registry, "the download kept failing; try again")

    def _coalesced_blob(
        self, target: Target, key: str, client: ClientHeaders, gone: ClientGoneCheck
    ) -> Reply:
        """A blob miss: one download per instance and registry, every client streams it."""

        def from_cache() -> Reply | None:
            meta = self._usable_blob(target, key)
            if meta is None:
                return None
            if self.config.proxy_mode == AUTHENTICATED:
                # Committed while this client waited: it still proves its own access.
                check = self._send("HEAD", target, client, follow_redirects=True)
                check.close()
                if check.status_code != 200:
                    return None  # its own GET upstream answers it
            return serve.blob_from_cache(
                self.storage, self.config, target, key, meta, "GET", client
            )

        return self._coalesced(
            target,
            self._flight_key(target, key),
            client,
            from_cache,
            lambda spool: self._fetch_blob(target, key, client, spool),
            gone,
        )

    def _coalesced_manifest(
        self,
        target: Target,
        key: str,
        client: ClientHeaders,
        replaced: str | None,
        gone: ClientGoneCheck = None,
    ) -> Reply:
        """A manifest miss: one fetch per instance and distinct Accept (it shapes the answer)."""
        accept = ",".join(sorted(m.strip() for a in client.accept for m in a.split(",")))

        def from_cache() -> Reply | None:
            meta = self._lookup(key)
            if meta is None or meta.digest == replaced:
                return None
            if not (target.is_digest or accepts(list(client.accept), meta.media_type)):
                return None
            if self.config.proxy_mode == AUTHENTICATED:
                # Committed while this client waited: it still proves its own access.
                check = self._send("HEAD", target, client)
                check.close()
                if check.status_code != 200:
                    return None
            return serve.manifest_from_cache(self.storage, self.config, target, key, meta, "GET")

        return self._coalesced(
            target,
            f"{key}|{accept}",
            client,
            from_cache,
            lambda spool: self._fetch_manifest(target, key, client, spool),
            gone,
        )

    def _fetch_manifest(
        self, target: Target, key: str, client: ClientHeaders, spool: SpoolWriter
    ) -> None:
        """The flight's fetcher for a manifest: read whole (at most 4 MiB), verified and stored
        before anyone sees it, so a client's follow-up request by digest is already a hit."""
        try:
            response = self._send("GET", target, client)
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
                self._store_manifest(target, key, client, response, data, _content_length(response))
                headers = policy.registry_headers(MANIFEST, response.headers.items())
            else:
                headers = _without_length(policy.forwardable_headers(response.headers.items()))
            headers.append(("Content-Length", str(len(data))))
            spool.publish(Head(response.status_code, headers, len(data)))
            spool.write(data)
            spool.end(True)

    def _fetch_blob(
        self, target: Target, key: str, client: ClientHeaders, spool: SpoolWriter
    ) -> None:
        """The flight's fetcher: upstream into the spool; a 200 also fills the store from it."""
        try:
            response = self._send("GET", target, client, follow_redirects=True)
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
            earlier = self._lookup(key)
            known = earlier.sources if earlier is not None and earlier.digest == digest else ()
            sources = tuple(dict.fromkeys((*known, _source(target))))
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

    # -- pass-through -----------------------------------------------------------------------

    def passthrough(
        self, target: Target, client: ClientHeaders, params: list[tuple[str, str]]
    ) -> Reply:
        """tags/list and referrers go straight to upstream, uncached."""
        response = self._send("GET", target, client, params=params)
        reply = self._forward(response, "GET", target)
        if target.kind == TAGS and target.client_name != target.name:
            reply.headers = [
                (k, v.replace(f"/v2/{target.name}/", f"/v2/{target.client_name}/"))
                if k.lower() == "link"
                else (k, v)
                for k, v in reply.headers
            ]
        return reply

    # -- helpers ------------------------------------------------------------------------------

    def _lookup(self, key: str) -> ObjectMeta | None:
        try:
            return self.storage.stat(key)
        except NotFound:
            return None
        except StoreError as exc:
            log.warning("cache lookup of %s failed (%s); going upstream", key, exc)
            return None

    def _send(
        self,
        method: str,
        target: Target,
        client: ClientHeaders,
        *,
        params: list[tuple[str, str]] | None = None,
        forward_range: bool = False,
        follow_redirects: bool = False,
    ) -> requests.Response:
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

    def _forward(self, response: requests.Response, method: str, target: Target) -> Reply:
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


def _source(target: Target) -> str:
    """The (registry, repository) a request names, as recorded in a blob's sources."""
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


class ClientGone(RegistryError):
    """The client hung up while waiting: its place in the flight is given up."""

    status, code = 499, "CLIENT_GONE"


CLIENT_POLL = 0.25


def _watching(gone: ClientGoneCheck, wait: Callable[[], T]) -> T:
    """Run wait() while watching the client: ClientGone as soon as it hangs up, so a fetch
    that every client has left is abandoned (§15)."""
    if gone is None:
        return wait()
    waiter = gevent.getcurrent()

    def watch() -> None:
        while True:
            gevent.sleep(CLIENT_POLL)
            if gone():
                gevent.kill(waiter, ClientGone("the client went away"))
                return

    watcher = gevent.spawn(watch)
    try:
        return wait()
    finally:
        watcher.kill(block=False)
