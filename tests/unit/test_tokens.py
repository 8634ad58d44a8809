"""app/auth/tokens.py: sealed proxy tokens resist tampering, expire, and need the right key."""

from __future__ import annotations

import base64

import pytest

from app.auth import Scheme
from app.auth.tokens import PREFIX, Grant, Sealer, derive_key, is_proxy_token

GRANTS = {
    "upstream.test": Grant(Scheme.BEARER, "upstream-jwt"),
    "basic.test:5000": Grant(Scheme.BASIC, base64.b64encode(b"alice:pw").decode()),
}


def _sealed(sealer: Sealer, ttl: int = 300, now: float = 1_000_000.0) -> str:
    return sealer.encode(sealer.seal(GRANTS, ttl, now=now))


def test_round_trip_keeps_every_grant() -> None:
    sealer = Sealer(b"a shared secret of some length")
    opened = sealer.open(_sealed(sealer), now=1_000_100.0)
    assert opened is not None
    assert opened.grants == GRANTS
    assert opened.expires_at - opened.issued_at == 300
    assert opened.grant_for("upstream.test").authorization() == "Bearer upstream-jwt"
    assert opened.grant_for("basic.test:5000").authorization().startswith("Basic ")


def test_a_registry_without_a_grant_is_anonymous() -> None:
    sealer = Sealer(b"a shared secret of some length")
    opened = sealer.open(_sealed(sealer), now=1_000_000.0)
    assert opened is not None
    assert opened.grant_for("other.test") == Grant(Scheme.NONE)
    assert opened.grant_for("other.test").authorization() is None


def test_token_reveals_nothing_in_clear() -> None:
    sealer = Sealer(b"a shared secret of some length")
    token = _sealed(sealer)
    assert token.startswith(PREFIX)
    raw = base64.urlsafe_b64decode(token[len(PREFIX) :] + "==")
    assert b"upstream-jwt" not in raw and b"alice" not in raw and b"upstream.test" not in raw
    assert _sealed(sealer) != token, "a fresh nonce per token"


@pytest.mark.parametrize("position", [len(PREFIX), len(PREFIX) + 20, -2])
def test_tampered_token_is_refused(position: int) -> None:
    sealer = Sealer(b"a shared secret of some length")
    token = _sealed(sealer)
    flipped = "A" if token[position] != "A" else "B"
    tampered = token[:position] + flipped + token[position + 1 :]
    assert sealer.open(tampered, now=1_000_000.0) is None


@pytest.mark.parametrize("junk", ["", PREFIX, PREFIX + "!!!", PREFIX + "AAAA", "eyJhbGciOi.x.y"])
def test_junk_is_refused(junk: str) -> None:
    assert Sealer(b"a shared secret of some length").open(junk) is None


def test_expired_token_is_refused() -> None:
    sealer = Sealer(b"a shared secret of some length")
    token = _sealed(sealer, ttl=60, now=1_000_000.0)
    assert sealer.open(token, now=1_000_059.0) is not None
    assert sealer.open(token, now=1_000_060.0) is None


def test_wrong_key_is_refused_and_same_secret_opens_anywhere() -> None:
    token = _sealed(Sealer(b"a shared secret of some length"))
    assert Sealer(b"another secret of some length!").open(token, now=1_000_000.0) is None
    replica = Sealer(b"a shared secret of some length")
    assert replica.open(token, now=1_000_000.0) is not None


def test_key_derivation_is_deterministic_and_secret_dependent() -> None:
    assert derive_key(b"x" * 16) == derive_key(b"x" * 16)
    assert derive_key(b"x" * 16) != derive_key(b"y" * 16)
    assert len(derive_key(b"x" * 16)) == 32


def test_open_header_and_detection() -> None:
    sealer = Sealer(b"a shared secret of some length")
    token = sealer.encode(sealer.seal(GRANTS, 300))
    assert is_proxy_token(f"Bearer {token}")
    assert not is_proxy_token("Bearer eyJhbGciOiJFUzI1NiJ9.e30.sig")
    assert not is_proxy_token("Basic YWxpY2U6cHc=")
    assert not is_proxy_token(None)
    opened = sealer.open_header(f"Bearer {token}")
    assert opened is not None and opened.grants == GRANTS
    assert sealer.open_header("Basic YWxpY2U6cHc=") is None
