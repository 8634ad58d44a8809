"""Filling the store from a download without ever holding up the clients.

The download lands in the flight's spool file (app/flight.py), which clients
tail. The store writer is one more reader of that spool, in its own greenlet:
it hashes and writes at the store's pace, so a slow store lags behind on disk,
never in memory and never in front of a client, and a failing store only
abandons the fill. Nothing is committed unless the whole body arrived and its
size and digest check out.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable

from app.blocking import run_blocking
from app.storage import BlobWriter, ObjectMeta

log = logging.getLogger("oci_pull_through.tee")

COMMITTED = "committed"
DIGEST_MISMATCH = "digest mismatch"
TRUNCATED = "truncated"
STORE_ERROR = "store error"
CLIENT_GONE = "client gone"


class SourceFailed(Exception):
    """The download feeding the fill ended early; str() is the abort reason."""


def fill(
    chunks: Iterable[bytes],
    writer: BlobWriter,
    *,
    expected_digest: str,
    expected_size: int | None,
    make_meta: Callable[[str, int], ObjectMeta],
) -> str:
    """Hash and store every chunk, then commit only verified bytes; returns the outcome."""
    algorithm = expected_digest.split(":", 1)[0]
    hasher = hashlib.new(algorithm)
    size = 0
    try:
        for chunk in chunks:
            run_blocking(hasher.update, chunk)  # hashlib releases the GIL: off the event loop
            writer.write(chunk)
            size += len(chunk)
    except SourceFailed as failure:
        writer.abort()
        return str(failure) or TRUNCATED
    except Exception as exc:
        log.warning("store write failed: %s", exc)
        writer.abort()
        return STORE_ERROR
    except BaseException:
        writer.abort()
        raise
    digest = f"{algorithm}:{hasher.hexdigest()}"
    if expected_size is not None and size != expected_size:
        writer.abort()
        return TRUNCATED
    if digest != expected_digest:
        writer.abort()
        return DIGEST_MISMATCH
    try:
        writer.commit(make_meta(digest, size))
    except Exception as exc:
        log.warning("store commit failed: %s", exc)
        writer.abort()
        return STORE_ERROR
    return COMMITTED
