"""Manifest-triggered prefetch: a client that GETs an image manifest will ask for its config
and layers next, so the ones not cached start downloading at once, as single flights that
the client's own blob requests then join (late-joiner semantics, app/flight.py).

Bounded: at most PREFETCH_CONCURRENCY downloads per worker and a fixed backlog; a HEAD
never prefetches; an index does not (the client picks one platform). Whether a prefetched
blob was asked for is recorded across workers with a marker file per blob in the spool
directory, removed by the first blob request; markers left after UNUSED_AFTER seconds are
counted as prefetches nobody asked for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable

import gevent
import gevent.pool

from app import metrics
from app.oci import is_digest

log = logging.getLogger("oci_pull_through.prefetch")

BACKLOG = 256  # blobs waiting for a download slot, per worker
RECENT = 1024  # manifests whose blobs were looked at lately, per worker
RECENT_FOR = 60.0
UNUSED_AFTER = 600.0
IMAGE_MANIFEST_TYPES = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    }
)


def blob_digests(data: bytes) -> list[str]:
    """The config and layer digests of an image manifest; [] for anything else (pure)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return []
    if not isinstance(doc, dict) or "manifests" in doc:
        return []
    layers = doc.get("layers")
    descriptors = [doc.get("config"), *(layers if isinstance(layers, list) else [])]
    found: dict[str, None] = {}
    for descriptor in descriptors:
        if not isinstance(descriptor, dict) or descriptor.get("urls"):
            continue  # foreign layers live elsewhere
        digest = descriptor.get("digest")
        if isinstance(digest, str) and is_digest(digest):
            found[digest] = None
    return list(found)


class Prefetcher:
    """Starts bounded background downloads of a manifest's blobs in this worker."""

    def __init__(self, concurrency: int, marker_dir: str) -> None:
        self.concurrency = concurrency
        self.marker_dir = os.path.join(marker_dir, "prefetched")
        self._pool = gevent.pool.Pool(concurrency) if concurrency > 0 else None
        self._waiting = 0
        self._recent: OrderedDict[str, float] = OrderedDict()

    def manifest_served(
        self, manifest_digest: str, media_type: str, data: bytes, fetch: Callable[[str], bool]
    ) -> None:
        """Queue fetch(digest) for each blob of an image manifest just served by GET.

        fetch returns True when it downloaded the blob (False: cached, or already in flight).
        """
        if self._pool is None or media_type.split(";")[0].strip() not in IMAGE_MANIFEST_TYPES:
            return
        now = time.monotonic()
        if self._recent.get(manifest_digest, 0.0) > now:
            return  # its blobs were looked at a moment ago
        self._recent[manifest_digest] = now + RECENT_FOR
        self._recent.move_to_end(manifest_digest)
        while len(self._recent) > RECENT:
            self._recent.popitem(last=False)
        for digest in blob_digests(data):
            if self._waiting >= BACKLOG:
                log.info("prefetch backlog full; %s left to its client", digest[:19])
                continue
            self._waiting += 1
            gevent.spawn(self._run, digest, fetch)

    def _run(self, digest: str, fetch: Callable[[str], bool]) -> None:
        assert self._pool is not None
        try:
            self._pool.spawn(self._one, digest, fetch).join()
        finally:
            self._waiting -= 1

    def _one(self, digest: str, fetch: Callable[[str], bool]) -> None:
        marker = self._marker(digest)
        try:
            os.makedirs(self.marker_dir, exist_ok=True)
            with open(marker, "x"):
                pass
        except FileExistsError:
            pass
        except OSError as exc:
            log.warning("prefetch marker for %s: %s", digest[:19], exc)
        try:
            fetched = fetch(digest)
        except Exception as exc:  # a prefetch failing is the client's own request's business
            log.info("prefetch of %s failed: %s", digest[:19], exc)
            fetched = False
        if not fetched:
            with contextlib.suppress(OSError):
                os.unlink(marker)
        self.sweep()

    def blob_requested(self, digest: str) -> None:
        """A client asked for this blob: a prefetch of it was not in vain."""
        if self._pool is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self._marker(digest))

    def sweep(self, now: float | None = None) -> int:
        """Count and remove markers of prefetched blobs nobody asked for in time."""
        now = time.time() if now is None else now
        unused = 0
        try:
            names = os.listdir(self.marker_dir)
        except OSError:
            return 0
        for name in names:
            path = os.path.join(self.marker_dir, name)
            try:
                if os.stat(path).st_mtime < now - UNUSED_AFTER:
                    os.unlink(path)
                    unused += 1
            except OSError:
                continue
        if unused:
            metrics.PREFETCH_UNUSED.inc(unused)
        return unused

    def _marker(self, digest: str) -> str:
        return os.path.join(self.marker_dir, digest.replace(":", "-"))
