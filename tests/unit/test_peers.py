"""The peer set (rendezvous owners, health, DNS) and the peer HMAC (app/peers.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from app.config import Config, ConfigError
from app.peers import (
    FAILED_FOR,
    RESOLVE_EVERY,
    WINDOW,
    PeerAuth,
    PeerSet,
    canonical_url,
    make_cluster,
    rendezvous,
)

A, B, C = "http://10.0.0.1:8080", "http://10.0.0.2:8080", "http://10.0.0.3:8080"
KEYS = [f"blobs/sha256/{hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(600)]


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_canonical_url_makes_one_spelling_per_peer() -> None:
    assert canonical_url("HTTP://Cache-1.Example:8080/") == "http://cache-1.example:8080"
    assert canonical_url("http://10.0.0.1") == "http://10.0.0.1:80"
    assert canonical_url("https://[FD00::1]") == "https://[fd00::1]:443"
    for bad in ("ftp://x", "http://x/path", "http://x?q=1", "http://u:p@x", "x:80"):
        with pytest.raises(ValueError):
            canonical_url(bad)


def test_every_replica_agrees_on_owners_and_they_spread() -> None:
    views = [PeerSet(me, (A, B, C)) for me in (A, B, C)]
    for key in KEYS[:50]:
        owners = {view.owner(key) or view.self_url for view in views}
        assert len(owners) == 1
    counts = {p: sum(rendezvous([A, B, C], k) == p for k in KEYS) for p in (A, B, C)}
    assert all(150 < n < 250 for n in counts.values()), counts


def test_a_peer_leaving_moves_only_the_objects_it_owned() -> None:
    before = {k: rendezvous([A, B, C], k) for k in KEYS}
    after = {k: rendezvous([A, B], k) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert moved and all(before[k] == C for k in moved)


def test_a_failed_peer_is_skipped_for_a_while_then_asked_again() -> None:
    clock = Clock()
    peers = PeerSet(A, (A, B, C), clock=clock)
    key = next(k for k in KEYS if rendezvous([A, B, C], k) == B)
    assert peers.owner(key) == B
    peers.mark_failed(B)
    assert peers.owner(key) in (C, None)
    clock.now += FAILED_FOR + 0.1
    assert peers.owner(key) == B


def test_own_failure_never_removes_itself() -> None:
    peers = PeerSet(A, (A, B))
    peers.mark_failed(A)
    assert A in peers.live()


def test_peers_dns_is_re_resolved_periodically_and_a_failure_keeps_the_last_answer() -> None:
    clock = Clock()
    answers: list[list[str] | OSError] = [["10.0.0.2", "10.0.0.3"], OSError("no answer"), []]
    calls: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append((host, port))
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    peers = PeerSet(A, dns="cache-headless.ns.svc", resolver=resolver, clock=clock)
    assert peers.members() == [A, B, C]
    assert peers.members() == [A, B, C] and len(calls) == 1, "cached for RESOLVE_EVERY"
    clock.now += RESOLVE_EVERY
    assert peers.members() == [A, B, C], "a failed lookup keeps the last answer"
    clock.now += RESOLVE_EVERY
    assert peers.members() == [A]
    assert calls[0] == ("cache-headless.ns.svc", 8080), "the port of PEER_URL"


def _auth(tmp_path: Path, secret: str = "s" * 20, clock: Clock | None = None) -> PeerAuth:
    return PeerAuth(secret, str(tmp_path / "nonces"), clock=clock or Clock(1_700_000_000.0))


REQUEST = (B, "GET", "/_oci/peer/v1/blob/sha256:ab", "registry=r&name=n", "Basic eA==", "*/*")


def test_a_signed_request_verifies_once(tmp_path: Path) -> None:
    auth = _auth(tmp_path)
    header = auth.sign(*REQUEST)
    assert auth.verify(header, *REQUEST)
    assert not auth.verify(header, *REQUEST), "replayed"
    other_worker = _auth(tmp_path)  # same spool directory: another gunicorn worker
    assert not other_worker.verify(header, *REQUEST), "replayed to another worker"


@pytest.mark.parametrize("field", range(6))
def test_any_altered_field_is_refused(tmp_path: Path, field: int) -> None:
    auth = _auth(tmp_path)
    header = auth.sign(*REQUEST)
    altered = list(REQUEST)
    altered[field] = altered[field] + "x"
    assert not auth.verify(header, *altered)


def test_foreign_key_malformed_header_and_stale_timestamp_are_refused(tmp_path: Path) -> None:
    clock = Clock(1_700_000_000.0)
    auth = _auth(tmp_path, clock=clock)
    foreign = PeerAuth("another secret here", str(tmp_path / "n2"), clock=clock)
    assert not auth.verify(foreign.sign(*REQUEST), *REQUEST)
    for header in (None, "", "v1", "v2 t=1 n=00 s=00", auth.sign(*REQUEST) + " "):
        assert not auth.verify(header, *REQUEST)
    old = auth.sign(*REQUEST)
    clock.now += WINDOW + 1
    assert not auth.verify(old, *REQUEST)
    future = auth.sign(*REQUEST)
    clock.now -= 2 * WINDOW + 2
    assert not auth.verify(future, *REQUEST)


def test_the_nonce_cache_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("app.peers.MAX_NONCES", 3)
    auth = _auth(tmp_path)
    results = [auth.verify(auth.sign(*REQUEST), *REQUEST) for _ in range(5)]
    assert results == [True, True, True, False, False], "fails closed when full"


def _env(**extra: str) -> dict[str, str]:
    return {"PROXY_MODE": "transparent", "STORAGE_BACKEND": "s3", **extra}


def test_config_validates_the_cluster_settings() -> None:
    config = Config.from_env(_env(PEERS=f"{A},{B}/", PEER_URL=A, CLUSTER_SECRET="c" * 16))
    assert config.peers == (A, B) and config.peer_url == A
    assert config.peer_secret == "c" * 16
    bad = [
        _env(PEERS=A),  # no PEER_URL
        _env(PEERS_DNS="svc", PEER_URL="nope"),
        _env(PEERS="http://x/path", PEER_URL=A),
        _env(PEERS=A, PEER_URL=A, STORAGE_BACKEND="fs"),
        _env(PEERS=A, PEER_URL=A, CLUSTER_SECRET="short"),
        _env(PEERS_DNS="bad host", PEER_URL=A),
    ]
    for env in bad:
        with pytest.raises(ConfigError):
            Config.from_env(env)


def test_clustering_is_off_without_a_shared_key(tmp_path: Path) -> None:
    spool = str(tmp_path / "spool")
    no_key = Config.from_env(_env(PEERS=A, PEER_URL=A, SPOOL_DIR=spool))
    assert no_key.peer_secret is None and make_cluster(no_key) is None
    token = Config.from_env(_env(PEERS=A, PEER_URL=A, SPOOL_DIR=spool, TOKEN_SECRET="t" * 16))
    assert token.peer_secret == "t" * 16 and make_cluster(token) is not None
    assert make_cluster(Config.from_env(_env(SPOOL_DIR=spool))) is None
