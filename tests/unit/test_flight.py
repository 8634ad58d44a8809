"""app/flight.py: one fetch per key, followers tail the spool, failures never look complete."""

from __future__ import annotations

from pathlib import Path

import gevent
import pytest

from app.errors import UpstreamUnavailable
from app.flight import FlightError, Flights, Head, SpoolWriter

CHUNKS = [b"a" * 700_000, b"b" * 700_000, b"c" * 100]
BODY = b"".join(CHUNKS)


def fetcher(chunks: list[bytes], complete: bool = True, length: int | None = len(BODY)):
    def fetch(spool: SpoolWriter) -> None:
        spool.publish(Head(200, [("Content-Type", "x")], length))
        for chunk in chunks:
            gevent.sleep(0.01)
            spool.write(chunk)
        spool.end(complete, "" if complete else "truncated")

    return fetch


def read_all(flights: Flights, key: str) -> bytes:
    ticket = flights.join(key)
    assert not ticket.leader
    head, fd = ticket.head()
    return b"".join(ticket.body(fd, head.length))


def test_leader_and_followers_share_one_fetch(tmp_path: Path) -> None:
    flights = Flights(str(tmp_path))
    calls = []

    def fetch(spool: SpoolWriter) -> None:
        calls.append(1)
        fetcher(CHUNKS)(spool)

    leader = flights.join("blobs/sha256/x")
    assert leader.leader
    leader.start(fetch)
    followers = [gevent.spawn(read_all, flights, "blobs/sha256/x") for _ in range(3)]
    head, fd = leader.head()
    assert head == Head(200, [("Content-Type", "x")], len(BODY))
    assert b"".join(leader.body(fd, head.length)) == BODY
    assert [g.get(timeout=10) for g in followers] == [BODY] * 3
    assert calls == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "the flight cleans up after itself"


def test_a_failed_fetch_cuts_every_reader(tmp_path: Path) -> None:
    flights = Flights(str(tmp_path))
    leader = flights.join("k")
    leader.start(fetcher(CHUNKS[:2], complete=False))
    follower = gevent.spawn(read_all, flights, "k")
    head, fd = leader.head()
    with pytest.raises(FlightError):
        b"".join(leader.body(fd, head.length))
    with pytest.raises(FlightError):
        follower.get(timeout=10)


def test_unknown_length_completes_only_when_the_fetch_did(tmp_path: Path) -> None:
    flights = Flights(str(tmp_path))
    ok = flights.join("k1")
    ok.start(fetcher(CHUNKS, length=None))
    head, fd = ok.head()
    assert b"".join(ok.body(fd, head.length)) == BODY
    cut = flights.join("k2")
    cut.start(fetcher(CHUNKS[:1], complete=False, length=None))
    head, fd = cut.head()
    with pytest.raises(FlightError):
        b"".join(cut.body(fd, head.length))


def test_errors_before_the_head_reach_followers(tmp_path: Path) -> None:
    flights = Flights(str(tmp_path))

    def fetch(spool: SpoolWriter) -> None:
        gevent.sleep(0.05)
        spool.fail_before_head(UpstreamUnavailable("registry.test", "connection failed"))

    leader = flights.join("k")
    leader.start(fetch)
    follower = flights.join("k")
    with pytest.raises(UpstreamUnavailable):
        leader.head()
    with pytest.raises(Exception) as caught:
        follower.head()
    assert getattr(caught.value, "status", None) == 502
    follower.release()


def test_the_fetch_sees_when_every_reader_has_gone(tmp_path: Path) -> None:
    flights = Flights(str(tmp_path))
    seen: list[bool] = []

    def fetch(spool: SpoolWriter) -> None:
        spool.publish(Head(200, [], 10))
        seen.append(spool.has_readers())
        gevent.sleep(0.05)
        seen.append(spool.has_readers())
        spool.end(False, "client gone")

    leader = flights.join("k")
    leader.start(fetch)
    leader.head()
    leader.release()
    gevent.sleep(0.2)
    assert seen == [True, False]


def test_the_store_tail_reads_everything_or_fails(tmp_path: Path) -> None:
    flights = Flights(str(tmp_path))
    got: list[bytes] = []

    def fetch(spool: SpoolWriter) -> None:
        tail = gevent.spawn(lambda: got.append(b"".join(spool.tail())))
        fetcher(CHUNKS)(spool)
        tail.join(timeout=10)

    leader = flights.join("k")
    leader.start(fetch)
    head, fd = leader.head()
    assert b"".join(leader.body(fd, head.length)) == BODY
    assert got == [BODY]


def test_follow_joins_only_a_running_flight_and_reads_a_span(tmp_path: Path) -> None:
    """Range and HEAD requests (app/coalesce.py) never start a download nor leave files."""
    flights = Flights(str(tmp_path))
    assert flights.follow("k") is None
    assert list(tmp_path.iterdir()) == [], "following nothing creates nothing"
    leader = flights.join("k")
    leader.start(fetcher(CHUNKS))
    follower = flights.follow("k")
    assert follower is not None and not follower.leader
    head, fd = follower.head()
    assert head.length == len(BODY)
    span = b"".join(follower.body(fd, 1_400_050, start=699_990))  # across all three chunks
    assert span == BODY[699_990:1_400_050]
    head, fd = leader.head()
    assert b"".join(leader.body(fd, head.length)) == BODY
    assert flights.follow("k") is None, "the flight is over"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_primed_body_closed_by_the_server_leaves_the_flight_at_once(tmp_path: Path) -> None:
    """The read path reads a follower's first chunk before answering (app/coalesce.py); the
    server's close() of that body must still end the follower's place in the flight."""
    from app.coalesce import _primed
    from app.oci import BLOB, Target

    flights = Flights(str(tmp_path))
    leader = flights.join("k")
    leader.start(fetcher(CHUNKS))
    follower = flights.join("k")
    head, fd = follower.head()
    body = _primed(
        Target("r.test", "a/b", BLOB, "sha256:" + "0" * 64), follower.body(fd, head.length)
    )
    assert next(iter(body)) == CHUNKS[0]
    keep = [body]  # the server still holds the body: only close() may release the ticket
    body.close()
    assert follower._closed, "closing the body released the follower's ticket"
    head, fd = leader.head()
    assert b"".join(leader.body(fd, head.length)) == BODY
    del keep
