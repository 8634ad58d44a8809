"""The read path's decisions: for each request, the mode's policy, then the cache or a flight.

What to serve is decided here; fetching and verifying are app/fetch.py's, answering from the
cache app/serve.py's. No Flask here: every method returns a Reply for the blueprint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from app import freshness, metrics, policy, serve
from app.clientwatch import ClientGoneCheck
from app.coalesce import Coalescer
from app.config import AUTHENTICATED, Config
from app.fetch import FILL_WAIT, Fetcher, source
from app.flight import Flights, SpoolWriter
from app.oci import BLOB, TAGS, Target, accepts
from app.peerfetch import PeerFetcher
from app.peers import PeerAuth, PeerSet
from app.policy import Action
from app.prefetch import Prefetcher
from app.reply import Reply
from app.revalidate import Revalidator
from app.storage import ObjectMeta, Storage, keys
from app.upstream import ClientHeaders, Upstream


class Read(NamedTuple):
    """One read request as the read path sees it, from a blueprint."""

    target: Target
    method: str
    client: ClientHeaders
    gone: ClientGoneCheck = None  # the client hung up (gunicorn only)
    local_only: bool = False  # a peer's request: never forwarded to another replica


class Proxy:
    """Answers registry reads from the cache or upstream, per the proxy mode."""

    def __init__(
        self, config: Config, storage: Storage, upstream: Upstream, flights: Flights
    ) -> None:
        self.config = config
        self.storage = storage
        self.upstream = upstream
        self.flights = flights
        self.fetcher = Fetcher(config, storage, upstream)
        self.coalescer = Coalescer(config, self.fetcher, flights)
        self.prefetcher = Prefetcher(config.prefetch_concurrency, flights.dir)
        self.fetcher.manifest_fetched = self._prefetch_for
        self.peerfetch: PeerFetcher | None = None
        self.revalidator = Revalidator(config, self.fetcher, flights.dir, self._coalesced_manifest)

    def join_cluster(self, peers: PeerSet, auth: PeerAuth) -> None:
        """Misses that another live replica owns are fetched from it (app/peerfetch.py)."""
        self.peerfetch = PeerFetcher(self.config, peers, auth, self.fetcher)

    def _fetch_for(
        self, target: Target, key: str, client: ClientHeaders, local_only: bool
    ) -> Callable[[SpoolWriter], None]:
        """The flight's fetcher: from the owning replica, else upstream. A peer's request is
        local_only: it is never forwarded again, so peers that disagree cannot loop."""
        owner = None if local_only or self.peerfetch is None else self.peerfetch.owner(target)
        if target.kind == BLOB:
            if owner is not None and self.peerfetch is not None:
                peer = self.peerfetch
                return lambda spool: peer.fetch_blob(owner, target, key, client, spool)
            return lambda spool: self.fetcher.fetch_blob(target, key, client, spool)
        if owner is not None and self.peerfetch is not None:
            peer = self.peerfetch
            return lambda spool: peer.fetch_manifest(owner, target, key, client, spool)
        return lambda spool: self.fetcher.fetch_manifest(target, key, client, spool)

    # -- manifests ------------------------------------------------------------------------

    def manifest(self, read: Read) -> Reply:
        """A manifest by tag or digest (§5, §6, §15)."""
        target, method, client, gone, local_only = read
        self.upstream.check_allowed(target.registry)  # before the cache: §15
        key = keys.manifest(target.registry, target.name, target.reference)
        cacheable = policy.is_cacheable(target, self.config)
        meta = self.fetcher.lookup(key) if cacheable else None
        if (
            meta is not None
            and not target.is_digest
            and not accepts(list(client.accept), meta.media_type)
        ):
            meta = None
        action = policy.plan(self.config.proxy_mode, method, meta is not None, cacheable)
        stale = False
        if action is Action.CHECK_THEN_SERVE and meta is not None:
            check = self.fetcher.send("HEAD", target, client)
            check.close()
            if check.status_code != 200:
                action = Action.FORWARD
            elif target.is_digest or check.headers.get("Docker-Content-Digest") == meta.digest:
                action = Action.SERVE
                meta = freshness.checked(
                    self.fetcher, target, key, meta, check.headers.get("Docker-Content-Digest")
                )
            else:
                action = Action.FORWARD_AND_FILL  # the tag moved upstream
        elif action is Action.SERVE and meta and freshness.is_stale(target, meta, self.config):
            action, meta, stale = self.revalidator.stale(target, key, meta, client)  # §13
        if action is Action.SERVE and meta is not None:
            reply = serve.manifest_from_cache(self.storage, self.config, target, key, meta, method)
            if reply is not None:
                if stale:
                    reply.headers.append(freshness.age(meta))
                if method == "GET" and isinstance(reply.body, bytes):
                    self._prefetch_for(target, client, meta.digest, meta.media_type, reply.body)
                return reply
            action = policy.plan(self.config.proxy_mode, method, False, cacheable)
        if action is Action.FORWARD_AND_FILL and method == "GET":
            # A cached copy that brought us here (moved or stale upstream) must not be served.
            return self._coalesced_manifest(
                target, key, client, meta.digest if meta else None, gone, local_only
            )
        response = self.fetcher.send(method, target, client)
        return self.fetcher.forward(response, method, target)

    # -- blobs ----------------------------------------------------------------------------

    def blob(self, read: Read) -> Reply:
        """A blob: always cached, served with sendfile or a presigned redirect on a hit."""
        target, method, client, gone, local_only = read
        self.upstream.check_allowed(target.registry)  # before the cache: §15
        self.prefetcher.blob_requested(target.reference)
        key = keys.blob(target.reference)
        meta = self._usable_blob(target, key)
        action = policy.plan(self.config.proxy_mode, method, meta is not None, True)
        if action is Action.CHECK_THEN_SERVE and meta is not None:
            check = self.fetcher.send("HEAD", target, client, follow_redirects=True)
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
            return self._coalesced_blob(target, key, client, gone, local_only)
        if (action is Action.FORWARD_AND_FILL and client.range) or (
            action is Action.FORWARD and method == "HEAD"
        ):
            flight_key = self._flight_key(target, key)
            reply = self.coalescer.in_flight(target, flight_key, method, client, gone)
            if reply is not None:
                return reply
        response = self.fetcher.send(
            method, target, client, forward_range=True, follow_redirects=True
        )
        return self.fetcher.forward(response, method, target)

    def _usable_blob(self, target: Target, key: str) -> ObjectMeta | None:
        """The cached blob this request may be served from, before any upstream check.

        In authenticated mode only a blob verified through this very (registry, repository)
        counts: a digest is no secret, and another registry answering HEAD 200 proves
        nothing about who may read bytes fetched with someone else's credentials (§15).
        """
        meta = self.fetcher.lookup(key)
        if meta is None or self.config.proxy_mode != AUTHENTICATED:
            return meta
        return meta if source(target) in meta.sources else None

    def _flight_key(self, target: Target, key: str) -> str:
        """Who may share a download: one registry in transparent mode, one repository in
        authenticated mode, so no party's upstream ever answers for another's."""
        if self.config.proxy_mode == AUTHENTICATED:
            return f"{key}|{source(target)}"
        return f"{key}|{target.registry}"

    def _coalesced_blob(
        self,
        target: Target,
        key: str,
        client: ClientHeaders,
        gone: ClientGoneCheck,
        local_only: bool = False,
    ) -> Reply:
        """A blob miss: one download per instance and registry, every client streams it."""

        def from_cache() -> Reply | None:
            meta = self._usable_blob(target, key)
            if meta is None:
                return None
            if self.config.proxy_mode == AUTHENTICATED:
                # Committed while this client waited: it still proves its own access.
                check = self.fetcher.send("HEAD", target, client, follow_redirects=True)
                check.close()
                if check.status_code != 200:
                    return None  # its own GET upstream answers it
            return serve.blob_from_cache(
                self.storage, self.config, target, key, meta, "GET", client
            )

        return self.coalescer.miss(
            target,
            self._flight_key(target, key),
            client,
            from_cache,
            self._fetch_for(target, key, client, local_only),
            gone,
        )

    def _coalesced_manifest(
        self,
        target: Target,
        key: str,
        client: ClientHeaders,
        replaced: str | None,
        gone: ClientGoneCheck = None,
        local_only: bool = False,
    ) -> Reply:
        """A manifest miss: one fetch per instance and distinct Accept (it shapes the answer)."""
        accept = ",".join(sorted(m.strip() for a in client.accept for m in a.split(",")))

        def from_cache() -> Reply | None:
            meta = self.fetcher.lookup(key)
            if meta is None or meta.digest == replaced:
                return None
            if not (target.is_digest or accepts(list(client.accept), meta.media_type)):
                return None
            if self.config.proxy_mode == AUTHENTICATED:
                # Committed while this client waited: it still proves its own access.
                check = self.fetcher.send("HEAD", target, client)
                check.close()
                if check.status_code != 200:
                    return None
            return serve.manifest_from_cache(self.storage, self.config, target, key, meta, "GET")

        return self.coalescer.miss(
            target,
            f"{key}|{accept}",
            client,
            from_cache,
            self._fetch_for(target, key, client, local_only),
            gone,
        )

    # -- prefetch ---------------------------------------------------------------------------

    def _prefetch_for(
        self, target: Target, client: ClientHeaders, digest: str, media_type: str, data: bytes
    ) -> None:
        """An image manifest was served by GET: fetch its blobs before they are asked for."""
        self.prefetcher.manifest_served(
            f"{source(target)}@{digest}",
            media_type,
            data,
            lambda blob: self._prefetch_blob(target, client, blob),
        )

    def _prefetch_blob(self, manifest: Target, client: ClientHeaders, digest: str) -> bool:
        """Lead the blob's flight unless it is cached or already in flight; True if fetched.

        The client's own credentials fetch it, under the same flight key its blob request
        will use, so that request joins (after its own check, in authenticated mode).
        """
        target = Target(manifest.registry, manifest.name, BLOB, digest, manifest.client_name)
        key = keys.blob(digest)
        if self._usable_blob(target, key) is not None:
            return False
        ticket = self.flights.join(self._flight_key(target, key))
        if not ticket.leader or self._usable_blob(target, key) is not None:
            ticket.release()
            return False
        ticket.start(self._fetch_for(target, key, client, False))
        ticket.finish(timeout=FILL_WAIT)
        meta = self.fetcher.lookup(key)
        if meta is None or meta.digest != digest:
            return False
        metrics.PREFETCHED_BYTES.inc(meta.size)
        return True

    # -- pass-through -----------------------------------------------------------------------

    def passthrough(
        self, target: Target, client: ClientHeaders, params: list[tuple[str, str]]
    ) -> Reply:
        """tags/list and referrers go straight to upstream, uncached."""
        response = self.fetcher.send("GET", target, client, params=params)
        reply = self.fetcher.forward(response, "GET", target)
        if target.kind == TAGS and target.client_name != target.name:
            reply.headers = [
                (k, v.replace(f"/v2/{target.name}/", f"/v2/{target.client_name}/"))
                if k.lower() == "link"
                else (k, v)
                for k, v in reply.headers
            ]
        return reply
