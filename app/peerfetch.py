"""Fetching a miss from the replica that owns it, for this replica's single flight.

The leader of a flight whose object another live peer owns runs PeerFetcher instead of
the upstream fetcher: it asks the owner's internal endpoint (app/blueprints/internal.py),
which serves it through its own flight, and streams the answer into this replica's spool,
so its own clients coalesce on it as on any download. The owner fills the shared store;
this replica does not fill again.

The owner's bytes are not trusted: a blob's last chunk is held back until the whole body
hashes to the digest, so a mismatch or a short body cuts every client (never a short 200)
and nothing is committed here. An owner that cannot be reached, refuses, answers 5xx or
is slow to send headers is marked failed and this replica fetches upstream itself, as it
would without peers; one that dies mid-stream cuts the clients that got bytes, and their
retry goes upstream.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any
from urllib.parse import urlencode

import gevent
import requests
from requests.adapters import HTTPAdapter

from app import metrics, policy
from app.blocking import run_blocking
from app.bodies import MAX_ERROR_BODY, TooLarge, raw_chunks, read_limited
from app.config import AUTHENTICATED, Config
from app.errors import RegistryError
from app.fetch import MAX_MANIFEST_BYTES, Fetcher
from app.flight import Head, SpoolWriter
from app.oci import BLOB, MANIFEST, Target
from app.peers import AUTH_HEADER, CREDENTIAL_HEADER, SERVED_HEADER, PeerAuth, PeerSet
from app.storage import keys
from app.tee import CLIENT_GONE, DIGEST_MISMATCH, TRUNCATED
from app.upstream import ClientHeaders

log = logging.getLogger("oci_pull_through.peerfetch")

CONNECT_TIMEOUT = 1.0
HEADER_TIMEOUT = 5.0  # an owner that took longer is treated as down (we go upstream)
PATH = "/_oci/peer/v1"


class PeerFailed(Exception):
    """The owner gave no usable answer before any byte reached a client."""


class PeerFetcher:
    """Streams misses from their owning replica into this replica's flights."""

    def __init__(self, config: Config, peers: PeerSet, auth: PeerAuth, fetcher: Fetcher) -> None:
        self.config = config
        self.peers = peers
        self.auth = auth
        self.fetcher = fetcher
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy environment: peers are direct
        self.session.headers["Accept-Encoding"] = "identity"
        adapter = HTTPAdapter(pool_connections=8, pool_maxsize=64, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def owner(self, target: Target) -> str | None:
        """The other live replica owning this blob or digest manifest, or None (fetch here)."""
        if not target.is_digest or target.kind not in (BLOB, MANIFEST):
            return None
        key = keys.blob(target.reference) if target.kind == BLOB else target.reference
        return self.peers.owner(key)

    def _entitled(self, target: Target, client: ClientHeaders) -> bool:
        """Authenticated mode: the client proves its own access upstream before it may share
        the owner's download (§15), exactly as a follower of a local flight does."""
        if self.config.proxy_mode != AUTHENTICATED:
            return True
        try:
            check = self.fetcher.send("HEAD", target, client, follow_redirects=target.kind == BLOB)
        except RegistryError:
            return False  # the upstream fetch below reports it
        check.close()
        return check.status_code == 200

    def _failed(self, owner: str, exc: Exception) -> None:
        """Count and remember an owner that gave no usable answer; we go upstream."""
        if not isinstance(exc, PeerFailed) or "answered" not in str(exc):
            metrics.PEER_FETCHES.labels("unreachable").inc()
        log.warning("peer %s failed before the body (%s); fetching upstream", owner, exc)
        self.peers.mark_failed(owner)
        metrics.PEER_FALLBACKS.inc()

    def _get(self, owner: str, target: Target, client: ClientHeaders) -> requests.Response:
        """The signed GET of the owner's endpoint; PeerFailed unless the owner itself answered."""
        path = f"{PATH}/{target.kind}/{target.reference}"
        query = urlencode({"registry": target.registry, "name": target.name})
        credential = client.authorization or ""
        accept = ", ".join(client.accept)
        headers: dict[str, Any] = {
            AUTH_HEADER: self.auth.sign(owner, "GET", path, query, credential, accept)
        }
        if credential:
            headers[CREDENTIAL_HEADER] = credential
        headers["Accept"] = accept or None  # None: not even requests' default */*
        if client.user_agent:
            headers["User-Agent"] = client.user_agent
        timeout = (CONNECT_TIMEOUT, self.config.upstream_read_timeout + HEADER_TIMEOUT)
        try:
            with gevent.Timeout(CONNECT_TIMEOUT + HEADER_TIMEOUT, PeerFailed("slow headers")):
                response = self.session.get(
                    f"{owner}{path}?{query}",
                    headers=headers,
                    timeout=timeout,
                    stream=True,
                    allow_redirects=False,
                )
        except requests.RequestException as exc:
            raise PeerFailed(type(exc).__name__) from None
        if response.headers.get(SERVED_HEADER) != "1" or response.status_code >= 500:
            response.close()
            outcome = "refused" if response.status_code in (401, 404) else "error"
            metrics.PEER_FETCHES.labels(outcome).inc()
            raise PeerFailed(f"answered {response.status_code}")
        return response

    def fetch_blob(
        self, owner: str, target: Target, key: str, client: ClientHeaders, spool: SpoolWriter
    ) -> None:
        """The flight's fetcher for a blob another replica owns."""
        if not self._entitled(target, client):
            self.fetcher.fetch_blob(target, key, client, spool)  # forwards upstream's refusal
            return
        try:
            response = self._get(owner, target, client)
        except PeerFailed as exc:
            self._failed(owner, exc)
            self.fetcher.fetch_blob(target, key, client, spool)
            return
        with response:
            if 300 <= response.status_code < 400:
                # The owner found it committed (a hit answered by a redirect): publishing
                # nothing ends this flight, and its clients retry and hit the shared store.
                metrics.PEER_FETCHES.labels("cached").inc()
                return
            if response.status_code != 200:
                self._publish_error(target, response, spool)
                return
            length = response.headers.get("Content-Length", "")
            if not length.isascii() or not length.isdigit():
                metrics.PEER_FETCHES.labels("error").inc()
                self._failed(owner, PeerFailed("answered without Content-Length"))
                self.fetcher.fetch_blob(target, key, client, spool)
                return
            headers = policy.registry_headers(BLOB, response.headers.items(), lengths=True)
            spool.publish(Head(200, headers, int(length)))
            outcome = self._stream_verified(owner, target, response, int(length), spool)
            metrics.PEER_FETCHES.labels(outcome).inc()

    def _stream_verified(
        self,
        owner: str,
        target: Target,
        response: requests.Response,
        length: int,
        spool: SpoolWriter,
    ) -> str:
        """Copy the body into the spool, holding the last chunk back until the digest matches."""
        algorithm = target.reference.split(":", 1)[0]
        hasher = hashlib.new(algorithm)
        received = 0
        held = b""
        try:
            for chunk in raw_chunks(response):
                received += len(chunk)
                if received > length:
                    spool.end(False, TRUNCATED)
                    return DIGEST_MISMATCH
                if held:
                    run_blocking(hasher.update, held)
                    spool.write(held)
                    metrics.PEER_BYTES.inc(len(held))
                held = chunk
                if not spool.has_readers():
                    spool.end(False, CLIENT_GONE)
                    return "client gone"
        except Exception as exc:  # the owner died or stalled mid-stream
            log.warning("peer %s body of %s failed: %s", owner, target.reference[:19], exc)
            self.peers.mark_failed(owner)
            spool.end(False, TRUNCATED)
            return TRUNCATED
        if received != length:
            self.peers.mark_failed(owner)
            spool.end(False, TRUNCATED)
            return TRUNCATED
        run_blocking(hasher.update, held)
        if f"{algorithm}:{hasher.hexdigest()}" != target.reference:
            log.warning("peer %s sent bytes not matching %s", owner, target.reference[:19])
            self.peers.mark_failed(owner)
            spool.end(False, DIGEST_MISMATCH)
            return DIGEST_MISMATCH
        spool.write(held)
        metrics.PEER_BYTES.inc(len(held))
        spool.end(True)
        return "ok"

    def fetch_manifest(
        self, owner: str, target: Target, key: str, client: ClientHeaders, spool: SpoolWriter
    ) -> None:
        """The flight's fetcher for a manifest by digest another replica owns."""
        if not self._entitled(target, client):
            self.fetcher.fetch_manifest(target, key, client, spool)
            return
        try:
            response = self._get(owner, target, client)
            with response:
                if response.status_code != 200:
                    self._publish_error(target, response, spool)
                    return
                data = read_limited(response, MAX_MANIFEST_BYTES)
        except (PeerFailed, TooLarge, requests.RequestException, OSError) as exc:
            self._failed(owner, exc)
            self.fetcher.fetch_manifest(target, key, client, spool)
            return
        algorithm = target.reference.split(":", 1)[0]
        if f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}" != target.reference:
            metrics.PEER_FETCHES.labels(DIGEST_MISMATCH).inc()
            self._failed(owner, PeerFailed("answered with a digest mismatch"))
            self.fetcher.fetch_manifest(target, key, client, spool)  # nothing published yet
            return
        metrics.PEER_FETCHES.labels("ok").inc()
        metrics.PEER_BYTES.inc(len(data))
        headers = [
            (k, v)
            for k, v in policy.registry_headers(MANIFEST, response.headers.items())
            if k.lower() != "content-length"
        ]
        spool.publish(Head(200, [*headers, ("Content-Length", str(len(data)))], len(data)))
        spool.write(data)
        spool.end(True)
        media_type = policy.media_type(MANIFEST, response.headers.get("Content-Type"))
        if self.fetcher.manifest_fetched is not None:
            self.fetcher.manifest_fetched(target, client, target.reference, media_type, data)

    def _publish_error(
        self, target: Target, response: requests.Response, spool: SpoolWriter
    ) -> None:
        """Upstream's refusal as the owner relayed it (404, 401...), body capped at 64 KiB."""
        try:
            data = read_limited(response, MAX_ERROR_BODY)
        except (TooLarge, requests.RequestException, OSError):
            data = b""
        metrics.PEER_FETCHES.labels("forwarded").inc()
        headers = [
            (k, v)
            for k, v in policy.forwardable_headers(response.headers.items())
            if k.lower() not in ("content-length", SERVED_HEADER.lower())
        ]
        spool.publish(
            Head(response.status_code, [*headers, ("Content-Length", str(len(data)))], len(data))
        )
        spool.write(data)
        spool.end(True)
