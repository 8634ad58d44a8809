"""Noticing a client that hangs up while it waits for a flight's first byte (SPEC §15).

Under gunicorn the blueprint hands in a check that peeks at the client's socket; while a
request waits, a watcher greenlet polls it and, once the client is gone, raises ClientGone
in the waiting greenlet, so it leaves the flight and a fetch every client left is abandoned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import gevent

from app.errors import RegistryError

T = TypeVar("T")
ClientGoneCheck = Callable[[], bool] | None
CLIENT_POLL = 0.25


class ClientGone(RegistryError):
    """The client hung up while waiting: its place in the flight is given up."""

    status, code = 499, "CLIENT_GONE"


def watching(gone: ClientGoneCheck, wait: Callable[[], T]) -> T:
    """Run wait() while watching the client: ClientGone as soon as it hangs up."""
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
