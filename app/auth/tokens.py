"""Sealed proxy tokens: per-registry upstream credentials, encrypted and authenticated.

A proxy token is `opt1.` + base64url(nonce ‖ AES-256-GCM ciphertext). The key is derived
with HKDF-SHA256 from TOKEN_SECRET, so every worker and replica sharing the secret opens
every token; the plaintext is JSON and never leaves the proxy:

    {"iat": 1700000000, "exp": 1700000300,
     "grants": {"ghcr.io": {"t": "bearer", "v": "<upstream token>"},
                "registry.internal": {"t": "basic", "v": "<base64 user:password>"},
                "docker.io": {"t": "none"}}}

A grant is only ever used for the registry it is keyed by.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.auth import Scheme
from app.kdf import hkdf_sha256

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "opt1."
_AAD = b"oci-pull-through proxy token v1"
_NONCE = 12


@dataclass(frozen=True)
class Grant:
    """Access to one upstream registry: an upstream Bearer token, Basic credentials, or none."""

    kind: Scheme
    value: str = ""

    def authorization(self) -> str | None:
        """The Authorization header to send to that registry (None: anonymous)."""
        if self.kind == Scheme.BEARER:
            return f"Bearer {self.value}"
        if self.kind == Scheme.BASIC:
            return f"Basic {self.value}"
        return None


@dataclass(frozen=True)
class ProxyToken:
    """An opened proxy token."""

    issued_at: int
    expires_at: int
    grants: dict[str, Grant] = field(default_factory=dict)

    def grant_for(self, registry: str) -> Grant:
        """The grant for this registry; anonymous when the token holds none for it."""
        return self.grants.get(registry, Grant(Scheme.NONE))


def derive_key(secret: bytes) -> bytes:
    """A 256-bit AES key from TOKEN_SECRET (or a random per-start secret)."""
    return hkdf_sha256(secret, _AAD)


def _invalid_tag() -> type[Exception]:
    from cryptography.exceptions import InvalidTag  # loaded with the cipher, which raised it

    return InvalidTag


def is_proxy_token(authorization: str | None) -> bool:
    """Whether an Authorization header carries one of our tokens (not an upstream's)."""
    if not authorization:
        return False
    scheme, _, value = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and value.strip().startswith(PREFIX)


class Sealer:
    """Seals and opens proxy tokens with one key."""

    def __init__(self, secret: bytes) -> None:
        self._key = derive_key(secret)
        self._cipher: AESGCM | None = None

    @property
    def _aead(self) -> AESGCM:
        """The cipher, built on first use: a worker that never sees a token never loads the
        crypto stack (about 7 MiB of RSS)."""
        if self._cipher is None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._cipher = AESGCM(self._key)
        return self._cipher

    def seal(self, grants: dict[str, Grant], ttl: int, now: float | None = None) -> ProxyToken:
        """A token valid for ttl seconds; returns the opened form (see encode())."""
        issued = int(time.time() if now is None else now)
        return ProxyToken(issued, issued + ttl, dict(grants))

    def encode(self, token: ProxyToken) -> str:
        """The opaque string handed to the client."""
        payload = {
            "iat": token.issued_at,
            "exp": token.expires_at,
            "grants": {r: {"t": str(g.kind), "v": g.value} for r, g in token.grants.items()},
        }
        nonce = os.urandom(_NONCE)
        data = self._aead.encrypt(nonce, json.dumps(payload, separators=(",", ":")).encode(), _AAD)
        return PREFIX + base64.urlsafe_b64encode(nonce + data).rstrip(b"=").decode("ascii")

    def open(self, text: str, now: float | None = None) -> ProxyToken | None:
        """The token's contents, or None when it is not ours, was altered, or has expired."""
        if not text.startswith(PREFIX):
            return None
        body = text[len(PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            plain = self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], _AAD)
            payload = json.loads(plain)
            token = ProxyToken(
                int(payload["iat"]),
                int(payload["exp"]),
                {
                    str(r): Grant(Scheme(str(g["t"])), str(g.get("v", "")))
                    for r, g in payload["grants"].items()
                },
            )
        except (_invalid_tag(), ValueError, binascii.Error, KeyError, TypeError, AttributeError):
            return None  # an unknown scheme is a ValueError too
        if token.expires_at <= (time.time() if now is None else now):
            return None
        return token

    def open_header(self, authorization: str | None) -> ProxyToken | None:
        """Open the token of a `Bearer opt1.…` Authorization header."""
        if not is_proxy_token(authorization):
            return None
        assert authorization is not None
        return self.open(authorization.strip().partition(" ")[2].strip())
