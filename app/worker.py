"""gunicorn's gevent worker, hardened for a network that may be busy or hostile (issue 16).

gunicorn bounds reading a request only by `keepalive` (idle wait and header alike), never
times out a client that stops reading, and gevent's server stops accepting once
`worker_connections` connections exist, so new ones (the health probe's too) hang in the
listen backlog. This worker (`worker_class = "app.worker.Worker"`) adds:

* HEADER_TIMEOUT: a request line and headers must be complete within it, counted from the
  connection's start (first request) or from the request's first byte (later ones).
* KEEPALIVE_TIMEOUT: a connection idle between requests is closed after it. The idle wait
  is a wait on the socket, which returns to gevent's hub even when the next request is
  already there: one connection that always has a request ready no longer keeps its worker
  to itself (without it, one keep-alive connection under `wrk` got >99 % of the answers).
* SEND_TIMEOUT: the socket timeout while a request is answered, so a client that stops
  reading is cut (TimeoutError) without touching the flight it read from.
* Connection slots: WORKER_CONNECTIONS per worker. When all are taken, a new connection
  closes the one that has waited longest for a request (idle or headers unfinished); when
  every slot is answering, it gets a spare slot only to read its request line: `/healthz`
  is answered, anything else `503` with `Retry-After`.
"""

from __future__ import annotations

import _socket
import collections
import contextlib
import os
import socket
import time
from typing import Any

import gevent
from gevent import socket as gsocket
from gunicorn import http, util
from gunicorn.workers.ggevent import GeventWorker

from app.errors import BodyCut
from app.serverhooks import Limits

OVERFLOW_WAIT = 2.0  # seconds a connection without a slot has to send its request line
RETRY_AFTER = 1
_BUSY_BODY = b'{"errors":[{"code":"UNAVAILABLE","message":"all connection slots are busy; retry"}]}'
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: %d\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (RETRY_AFTER, len(_BUSY_BODY), _BUSY_BODY)
)


class _Idle(Exception):
    """A keep-alive connection sent nothing for KEEPALIVE_TIMEOUT."""


class Conn:
    """One client connection's state as the slot keeper sees it."""

    __slots__ = ("sock", "started", "requests", "unreader", "slot")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.started = time.monotonic()
        self.requests = 0
        self.unreader: Any = None
        self.slot = False

    def buffered(self) -> bool:
        """Bytes of the next request already read (pipelined, or held by TLS)."""
        if self.unreader is not None and self.unreader.buf.seek(0, os.SEEK_END) > 0:
            return True
        pending = getattr(self.sock, "pending", None)
        return bool(pending()) if callable(pending) else False


class Worker(GeventWorker):
    """GeventWorker with header, keep-alive and send timeouts, slots and fair scheduling."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = Limits.from_env()
        self.slots = self.cfg.worker_connections
        # gevent's pool holds the slots plus spares for overflow answers and closing conns.
        self.worker_connections = self.slots + max(16, self.slots // 10)
        self.active = 0  # connections holding a slot
        self.conns: dict[Any, Conn] = {}  # by greenlet
        self.waiting: collections.OrderedDict[int, Conn] = collections.OrderedDict()
        self.evicted = 0
        self.overflowed = 0
        self.send_timeouts = 0
        self._gauges: Any = None

    def notify(self) -> None:
        """The heartbeat (every second) also publishes the connection figures to /metrics."""
        super().notify()
        if self._gauges is None:
            from prometheus_client import Gauge  # after gevent's patching, in the worker

            self._gauges = Gauge(
                "oci_connections",
                "Client connections by state (open, waiting for a request) and events so far",
                ["state"],
                multiprocess_mode="livesum",
            )
        waiting = len(self.waiting)
        for state, value in (
            ("open", len(self.conns)),
            ("waiting", waiting),
            ("evicted", self.evicted),
            ("overflowed", self.overflowed),
            ("send timeout", self.send_timeouts),
        ):
            self._gauges.labels(state).set(value)

    # -- slots --------------------------------------------------------------------------

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        """Take a slot (closing the longest-waiting connection if need be) or overflow."""
        conn = Conn(client)
        me = gevent.getcurrent()
        self.conns[me] = conn
        try:
            if self.active >= self.slots and not self._evict_one():
                self._overflow(listener, client, addr)
                return
            conn.slot = True
            self.active += 1
            self._wait_state(conn, True)
            super().handle(listener, client, addr)
        finally:
            self.waiting.pop(id(conn), None)
            self.conns.pop(me, None)
            if conn.slot:
                self.active -= 1

    def _wait_state(self, conn: Conn, waiting: bool) -> None:
        self.waiting.pop(id(conn), None)
        if waiting:
            self.waiting[id(conn)] = conn  # newest last: the oldest goes first

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest for a request; False if none waits."""
        if not self.waiting:
            return False
        _, victim = self.waiting.popitem(last=False)
        victim.slot = False
        self.active -= 1
        self.evicted += 1
        with contextlib.suppress(OSError):
            # Through a duplicate descriptor: gevent's own shutdown() would wake the reader
            # with EBADF (a logged error); this way its read just sees the end of the stream.
            raw = _socket.socket(fileno=os.dup(victim.sock.fileno()))
            try:
                raw.shutdown(socket.SHUT_RDWR)
            finally:
                raw.close()
        return True

    def _overflow(self, listener: Any, client: Any, addr: Any) -> None:
        """No free slot: serve /healthz (a probe that hangs gets the pod killed), 503 the rest."""
        self.overflowed += 1
        client.setblocking(1)
        req = None
        try:
            with gevent.Timeout(OVERFLOW_WAIT, False):
                req = next(http.get_parser(self.cfg, client, addr))
            if req is None:
                return
            if req.path == "/healthz" and req.method in ("GET", "HEAD"):
                self.handle_request(listener.getsockname(), req, client, addr)
            else:
                util.write(client, BUSY)
        except Exception as exc:  # a bad or cut request line: just close
            self.log.debug("overflow connection closed: %s", exc)

    # -- timeouts and fairness ----------------------------------------------------------

    def timeout_ctx(self) -> NextRequest:
        """Bounds `next(parser)` in gunicorn's keep-alive loop (see NextRequest)."""
        return NextRequest(self, self.conns.get(gevent.getcurrent()))

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> bool:
        """Answer under SEND_TIMEOUT: a client that takes no bytes that long is cut off."""
        conn = self.conns.get(gevent.getcurrent())
        if conn is not None:
            conn.requests += 1
            conn.unreader = req.unreader
            self._wait_state(conn, False)
        sock.settimeout(self.limits.send_timeout)
        try:
            return bool(super().handle_request(listener_name, req, sock, addr))
        except TimeoutError:
            self.send_timeouts += 1
            self.log.info(
                "%s took no bytes for %gs (SEND_TIMEOUT): connection closed",
                addr[0] if isinstance(addr, tuple) else addr,
                self.limits.send_timeout,
            )
            raise StopIteration from None
        except BodyCut as cut:
            self.log.warning("%s %s: response cut short: %s", req.method, req.path, cut)
            raise StopIteration from None
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(None)


class NextRequest:
    """The wait for a connection's next request line and headers.

    Later requests first wait (KEEPALIVE_TIMEOUT) for the socket to become readable: that
    wait goes through the hub, so other connections run between two requests of this one.
    Then the request line and headers have HEADER_TIMEOUT. A timeout leaves `req` None in
    gunicorn's loop, which closes the connection quietly.
    """

    def __init__(self, worker: Worker, conn: Conn | None) -> None:
        self.worker = worker
        self.conn = conn
        self.timer: gevent.Timeout | None = None

    def __enter__(self) -> NextRequest:
        limits, conn = self.worker.limits, self.conn
        seconds = limits.header_timeout
        if conn is not None:
            self.worker._wait_state(conn, conn.slot)
            if not conn.requests:  # counted from the connection's start (h2c sniffing included)
                seconds = max(0.0, seconds - (time.monotonic() - conn.started))
            elif conn.buffered():
                gevent.sleep(0)  # pipelined: still give others a turn
            else:
                try:
                    gsocket.wait_read(
                        conn.sock.fileno(), timeout=limits.keepalive_timeout, timeout_exc=_Idle
                    )
                except _Idle:
                    seconds = 0.0  # the parser's first read times out: connection closed
        self.timer = gevent.Timeout(seconds, False)
        self.timer.start()
        return self

    def __exit__(self, kind: object, value: object, tb: object) -> bool:
        assert self.timer is not None
        self.timer.close()
        if self.conn is not None:
            self.worker._wait_state(self.conn, False)
        return value is self.timer
