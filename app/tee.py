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
    source_path: str | None = None,
) -> str:
    """Hash and store every chunk, then commit only verified bytes; returns the outcome.

    With source_path (the spool file the chunks come from) and a writer that may adopt
    it, the bytes are only hashed and the verified file is linked into the store: no copy.
    """
    algorithm = expected_digest.split(":", 1)[0]
    hasher = hashlib.new(algorithm)
    size = 0
    adopting = source_path is not None and writer.may_adopt()
    try:
        for chunk in chunks:
            run_blocking(hasher.update, chunk)  # hashlib releases the GIL: off the event loop
            if not adopting:
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
        if source_path is not None and adopting and not writer.adopt(source_path):
            _copy_into(writer, source_path, size)  # another filesystem: copy after all
        writer.commit(make_meta(digest, size))
    except Exception as exc:
        log.warning("store commit failed: %s", exc)
        writer.abort()
        return STORE_ERROR
    return COMMITTED


def _copy_into(writer: BlobWriter, path: str, size: int) -> None:
    """Write the first size bytes of path into writer, a chunk at a time."""
    with open(path, "rb", buffering=0) as fh:
        remaining = size
        while remaining:
            chunk = fh.read(min(remaining, 1024 * 1024))
            if not chunk:
                raise OSError(f"{path} ended {remaining} bytes early")
            writer.write(chunk)
            remaining -= len(chunk)
