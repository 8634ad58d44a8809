"""The cluster: which replica owns an object, and the HMAC that guards the peer endpoint.

Replicas sharing one S3 bucket and prefix list each other (PEERS, or PEERS_DNS re-resolved
every RESOLVE_EVERY seconds) and name themselves (PEER_URL). An object's owner is the live
peer with the highest rendezvous (HRW) score for its storage key: no lock service, and a
peer joining or leaving moves only the objects it wins or held. A peer that failed is
skipped for FAILED_FOR seconds. Each worker keeps its own view; a moment of disagreement
costs at most one extra upstream GET, since a peer request is never forwarded again.

Peer requests carry an HMAC-SHA256 over the receiver, method, path, query, a timestamp, a
nonce, the client credential and Accept, keyed by HKDF from CLUSTER_SECRET (else
TOKEN_SECRET). A receiver accepts a timestamp within WINDOW seconds and each nonce once: the
nonces are files in the instance's spool directory, so every worker sees them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from app.config import Config, spool_dir
from app.envreader import canonical_url
from app.kdf import hkdf_sha256
from app.oci import split_hostport

log = logging.getLogger("oci_pull_through.peers")

RESOLVE_EVERY = 10.0
FAILED_FOR = 10.0
WINDOW = 30.0  # seconds a signed request stays valid (either side of the receiver's clock)
MAX_NONCES = 100_000  # beyond this many unexpired nonces, peer requests are refused
AUTH_HEADER = "X-Oci-Peer-Auth"
CREDENTIAL_HEADER = "X-Oci-Peer-Credential"
SERVED_HEADER = "X-Oci-Peer-Served"
_INFO = b"oci-pull-through peer request v1"
_AUTH_RE = re.compile(r"v1 t=([0-9]{1,12}) n=([0-9a-f]{32}) s=([0-9a-f]{64})")


def _score(peer: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{peer}\n{key}".encode()).digest()[:8], "big")


def rendezvous(peers: list[str], key: str) -> str:
    """The peer with the highest HRW score for key (peers non-empty)."""
    return max(peers, key=lambda peer: (_score(peer, key), peer))


Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    """Every address host resolves to (A and AAAA), as strings."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class PeerSet:
    """This replica's view of the cluster: the peers, their health, each object's owner."""

    def __init__(
        self,
        self_url: str,
        peers: tuple[str, ...] = (),
        dns: str | None = None,
        *,
        resolver: Resolver = resolve,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.self_url = canonical_url(self_url)
        self._static = {canonical_url(p) for p in peers}
        self._dns = dns
        self._resolver = resolver
        self._clock = clock
        self._resolved: set[str] = set()
        self._resolved_at = -RESOLVE_EVERY
        self._failed: dict[str, float] = {}

    def _refresh(self) -> None:
        """Re-resolve PEERS_DNS when its answer is older than RESOLVE_EVERY."""
        now = self._clock()
        if self._dns is None or now - self._resolved_at < RESOLVE_EVERY:
            return
        self._resolved_at = now
        own = urlsplit(self.self_url)
        host, port = split_hostport(self._dns)
        port = port or own.port or 80
        try:
            addresses = self._resolver(host, port)
        except OSError as exc:
            kept = len(self._resolved)
            log.warning("resolving PEERS_DNS %s failed (%s); keeping %d peers", host, exc, kept)
            return
        found = set()
        for address in addresses:
            shown = f"[{address}]" if ":" in address else address
            found.add(canonical_url(f"{own.scheme}://{shown}:{port}"))
        self._resolved = found

    def members(self) -> list[str]:
        """Every known peer, this replica included, sorted."""
        self._refresh()
        return sorted(self._static | self._resolved | {self.self_url})

    def live(self) -> list[str]:
        """The members not marked failed in the last FAILED_FOR seconds (self always)."""
        now = self._clock()
        return [p for p in self.members() if p == self.self_url or self._failed.get(p, 0.0) <= now]

    def owner(self, key: str) -> str | None:
        """The live peer owning key, or None when this replica owns it."""
        chosen = rendezvous(self.live(), key)
        return None if chosen == self.self_url else chosen

    def mark_failed(self, peer: str) -> None:
        """Skip peer for FAILED_FOR seconds (it refused, timed out or died mid-stream)."""
        self._failed[peer] = self._clock() + FAILED_FOR
        log.warning("peer %s failed; skipped for %.0fs", peer, FAILED_FOR)


def derive_key(secret: str) -> bytes:
    """The HMAC key: HKDF-SHA256 of CLUSTER_SECRET (or TOKEN_SECRET), bound to this use."""
    return hkdf_sha256(secret.encode(), _INFO)


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()


def _message(
    audience: str, method: str, path: str, query: str, ts: str, nonce: str, cred: str, accept: str
) -> bytes:
    fields = ("v1", audience, method, path, query, ts, nonce, _digest(cred), _digest(accept))
    return "\n".join(fields).encode("utf-8", "surrogateescape")


class PeerAuth:
    """Signs peer requests and checks them: a bounded window, each nonce accepted once."""

    def __init__(
        self, secret: str, nonce_dir: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._key = derive_key(secret)
        self._nonces = os.path.abspath(nonce_dir)
        os.makedirs(self._nonces, mode=0o700, exist_ok=True)
        self._clock = clock
        self._pruned_at = 0.0
        self._count = 0

    def _mac(self, message: bytes) -> str:
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def sign(
        self, audience: str, method: str, path: str, query: str, credential: str, accept: str
    ) -> str:
        """The X-Oci-Peer-Auth value for one request to audience (a canonical peer URL)."""
        ts, nonce = str(int(self._clock())), secrets.token_hex(16)
        mac = self._mac(_message(audience, method, path, query, ts, nonce, credential, accept))
        return f"v1 t={ts} n={nonce} s={mac}"

    def verify(
        self,
        header: str | None,
        audience: str,
        method: str,
        path: str,
        query: str,
        credential: str,
        accept: str,
    ) -> bool:
        """Whether the request was signed with our key for us, recently, and never seen."""
        match = _AUTH_RE.fullmatch(header or "")
        if match is None:
            return False
        ts, nonce, mac = match.groups()
        expected = self._mac(_message(audience, method, path, query, ts, nonce, credential, accept))
        if not hmac.compare_digest(expected, mac):
            return False
        if abs(self._clock() - int(ts)) > WINDOW:
            return False
        return self._first_use(nonce)

    def _first_use(self, nonce: str) -> bool:
        """Record the nonce (O_EXCL: one winner across workers); False if already seen."""
        self._prune()
        if self._count >= MAX_NONCES:
            log.warning("more than %d peer nonces in %.0fs: refusing", MAX_NONCES, WINDOW * 2)
            return False
        try:
            fd = os.open(os.path.join(self._nonces, nonce), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        self._count += 1
        return True

    def _prune(self) -> None:
        """Forget nonces older than twice the window (their requests are refused anyway)."""
        now = self._clock()
        if now - self._pruned_at < 1.0:
            return
        self._pruned_at = now
        count = 0
        with os.scandir(self._nonces) as entries:
            for entry in entries:
                try:
                    if now - entry.stat().st_mtime > 2 * WINDOW:
                        os.unlink(entry.path)
                    else:
                        count += 1
                except FileNotFoundError:
                    pass
        self._count = count


def make_cluster(config: Config) -> tuple[PeerSet, PeerAuth] | None:
    """The peer set and HMAC of a clustered replica; None when PEERS/PEERS_DNS are unset or
    no key is set (CLUSTER_SECRET, else a chosen TOKEN_SECRET): clustering is then off."""
    if not (config.peers or config.peers_dns) or config.peer_url is None:
        return None
    secret = config.peer_secret
    if secret is None:
        log.warning("PEERS set but neither CLUSTER_SECRET nor TOKEN_SECRET: clustering is off")
        return None
    nonces = os.path.join(spool_dir(config), "peer-nonces")
    return PeerSet(config.peer_url, config.peers, config.peers_dns), PeerAuth(secret, nonces)
