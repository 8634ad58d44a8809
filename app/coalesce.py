"""Clients sharing a flight: a miss joins the instance's download, and a Range or HEAD
for a blob being downloaded is answered from it (issue 12) instead of a second upstream
request. Which flight a request may share is the caller's decision (the flight key)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from app import metrics
from app.clientwatch import ClientGoneCheck, watching
from app.config import AUTHENTICATED, Config
from app.errors import RegistryError, UpstreamUnavailable
from app.fetch import Fetcher
from app.flight import FlightError, FlightGone, Flights, SpoolWriter, Uncoalescible
from app.oci import BLOB, Target
from app.ranges import ByteRange, Unsatisfiable, parse_range
from app.reply import MISS, Reply
from app.upstream import ClientHeaders

SPOOL_FULL = "spool full"  # a miss streamed through uncached: SPOOL_MAX_BYTES reached
JOIN_ATTEMPTS = 5
_OURS = frozenset({"content-length", "content-range", "accept-ranges", "docker-content-digest"})


class Coalescer:
    """One upstream download per object and flight key, however many clients ask."""

    def __init__(self, config: Config, fetcher: Fetcher, flights: Flights) -> None:
        self.config = config
        self.fetcher = fetcher
        self.flights = flights

    def _alone(self, target: Target, client: ClientHeaders) -> Reply:
        """This client's own upstream GET, forwarded uncached."""
        response = self.fetcher.send("GET", target, client, follow_redirects=target.kind == BLOB)
        return self.fetcher.forward(response, "GET", target)

    def _entitled(self, target: Target, client: ClientHeaders) -> bool:
        """Authenticated mode: another client's credentials started the flight, so this one
        proves its own access with a HEAD upstream before reading it (§15)."""
        if self.config.proxy_mode != AUTHENTICATED:
            return True
        check = self.fetcher.send("HEAD", target, client, follow_redirects=target.kind == BLOB)
        check.close()
        return check.status_code == 200

    def miss(
        self,
        target: Target,
        flight_key: str,
        client: ClientHeaders,
        from_cache: Callable[[], Reply | None],
        fetch: Callable[[SpoolWriter], None],
        gone: ClientGoneCheck = None,
    ) -> Reply:
        """A GET miss joins the flight for the object (app/flight.py), leading it if none runs."""
        for _ in range(JOIN_ATTEMPTS):
            ticket = self.flights.join(flight_key)
            if ticket.leader:
                reply = from_cache()  # the previous flight may have just committed
                if reply is not None:
                    ticket.release()
                    return reply
                limit = self.config.spool_max_bytes
                if limit is not None and self.flights.spool_bytes() >= limit:
                    # The spool is full: stream this miss through, uncached, rather than fail.
                    ticket.release()
                    metrics.fill_finished(target.kind, SPOOL_FULL)
                    return self._alone(target, client)
                ticket.start(fetch)
            elif not self._entitled(target, client):
                ticket.release()
                return self._alone(target, client)
            try:
                head, spool_fd = watching(gone, ticket.head)
            except FlightGone:
                ticket.release()
                continue
            except Uncoalescible:
                ticket.release()
                return self._alone(target, client)
            except BaseException:
                ticket.release()
                raise
            body = _primed(target, ticket.body(spool_fd, head.length))
            if not ticket.leader:
                metrics.COALESCED.inc()
            return Reply(head.status, head.headers, body, outcome=MISS)
        # Each flight it joined ended before its first byte (short manifest flights under load
        # do): ask upstream for this client alone rather than fail it.
        return self._alone(target, client)

    def in_flight(
        self,
        target: Target,
        flight_key: str,
        method: str,
        client: ClientHeaders,
        gone: ClientGoneCheck = None,
    ) -> Reply | None:
        """A blob Range GET or HEAD answered from the download in progress; None when no
        flight runs or it cannot answer (the caller asks upstream, as before)."""
        if method == "HEAD" and self.config.proxy_mode == AUTHENTICATED:
            return None  # §5: an authenticated HEAD is always upstream's answer
        ticket = self.flights.follow(flight_key)
        if ticket is None:  # nobody is downloading it: this request does not start a flight
            return None
        try:
            if method == "GET" and not self._entitled(target, client):
                ticket.release()
                return None
            head, spool_fd = watching(gone, ticket.head)
        except (FlightGone, Uncoalescible, RegistryError):
            ticket.release()  # no usable answer (a failed fetch): upstream's own
            return None
        except BaseException:
            ticket.release()
            raise
        reply, span = _answer(head.status, head.headers, head.length, target, method, client)
        if reply is not None and span is not None:
            reply.body = _primed(target, ticket.body(spool_fd, span.end + 1, start=span.start))
        else:  # answered without the body, or not at all
            os.close(spool_fd)
            ticket.release()
        if reply is not None:
            metrics.COALESCED.inc()
        return reply


class _Primed:
    """A body whose first chunk was read already; close() still reaches the flight's
    generator, so a client that hangs up leaves the flight at once (not at garbage
    collection)."""

    def __init__(self, first: bytes, rest: Iterator[bytes]) -> None:
        self._first: bytes | None = first or None
        self._rest = rest

    def __iter__(self) -> _Primed:
        return self

    def __next__(self) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return next(self._rest)

    def close(self) -> None:
        """Close the flight's generator (its finally releases the ticket and spool)."""
        close = getattr(self._rest, "close", None)
        if close is not None:
            close()


def _primed(target: Target, body: Iterator[bytes]) -> _Primed:
    """The body with its first chunk already read, so a flight that fails before this
    client's first byte is a 502 error document, not a status line and a cut."""
    try:
        first = next(body, b"")
    except FlightError as exc:
        raise UpstreamUnavailable(target.registry, str(exc)) from None
    return _Primed(first, body)


def _answer(
    status: int,
    upstream_headers: list[tuple[str, str]],
    size: int | None,
    target: Target,
    method: str,
    client: ClientHeaders,
) -> tuple[Reply | None, ByteRange | None]:
    """A flight's 200 as this client asked for it: headers only, one byte range (the span
    the body must then cover) or 416; None when only upstream can answer."""
    if status != 200 or size is None:
        return None, None
    if client.if_range and client.if_range.strip('"') != target.reference:
        return None, None  # a validator only upstream can judge
    headers = [(k, v) for k, v in upstream_headers if k.lower() not in _OURS]
    headers += [("Docker-Content-Digest", target.reference), ("Accept-Ranges", "bytes")]
    if method == "HEAD":
        return Reply(200, [*headers, ("Content-Length", str(size))], outcome=MISS), None
    try:
        span = parse_range(client.range, size)
    except Unsatisfiable:
        unsatisfiable = [("Content-Range", f"bytes */{size}"), ("Content-Length", "0")]
        return Reply(416, [*headers, *unsatisfiable], outcome=MISS), None
    if span is None:
        return None, None  # several ranges, or none we read: upstream answers those
    headers += [("Content-Range", span.content_range(size)), ("Content-Length", str(span.length))]
    return Reply(206, headers, outcome=MISS), span
