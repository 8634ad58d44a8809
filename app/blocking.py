"""Run a blocking call (disk I/O, hashing) off the gevent loop so other greenlets keep going."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import gevent

T = TypeVar("T")


def run_blocking(fn: Callable[..., T], *args: object) -> T:
    """Execute fn in the hub's thread pool; the calling greenlet waits, the others run."""
    return gevent.get_hub().threadpool.apply(fn, args)
