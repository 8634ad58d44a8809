"""Stale tags in transparent mode that are not revalidated before they are served (§13).

TAG_REVALIDATE=background answers at once from the cache and checks the tag afterwards,
one check per tag and instance at a time (a flock in the spool directory, shared by the
workers); while upstream's rate limit is in its reserve (app/ratelimit.py) a stale tag is
served without any check. Inline revalidation is app/freshness.py's. Authenticated mode
never comes here: it checks every hit upstream with the client's credentials (§5, §15).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import gevent

from app import freshness, metrics, ratelimit
from app.oci import Target
from app.policy import IMAGE_TYPES, INDEX_TYPES, Action
from app.reply import Reply
from app.storage import NotFound, ObjectMeta, StoreError
from app.upstream import ClientHeaders

if TYPE_CHECKING:
    from app.config import Config
    from app.fetch import Fetcher

log = logging.getLogger("oci_pull_through.freshness")

BACKGROUND = "background"
# A background check asks as a client taking every type: only that answer is the tag's.
FULL_ACCEPT = (", ".join((*INDEX_TYPES, *IMAGE_TYPES)),)
Refetch = Callable[[Target, str, ClientHeaders, str | None], Reply]


class Revalidator:
    """Decides what a stale cached tag gets in transparent mode, and runs background checks."""

    def __init__(self, config: Config, fetcher: Fetcher, spool_dir: str, refetch: Refetch):
        self.config = config
        self.fetcher = fetcher
        self.refetch = refetch  # a moved tag is filled like a miss (the proxy's single flight)
        self.lock_dir = os.path.join(spool_dir, "revalidating")
        os.makedirs(self.lock_dir, exist_ok=True)
        self.running: set[gevent.Greenlet] = set()

    def stale(
        self, target: Target, key: str, meta: ObjectMeta, client: ClientHeaders
    ) -> tuple[Action, ObjectMeta, bool]:
        """A stale tag: what to do, the meta to serve, and whether the answer is stale."""
        if ratelimit.reserve_reached(target.registry):
            why = f"{target.registry} is within its rate-limit reserve (not revalidated)"
            freshness.served_stale(target, freshness.RATE_LIMIT_RESERVE, why)
            return Action.SERVE, meta, True
        if self.config.tag_revalidate != BACKGROUND:
            return freshness.revalidate(self.fetcher, target, key, meta, client)
        self.start(target, key, meta, client)
        why = "being revalidated in the background"
        freshness.served_stale(target, freshness.STALE_WHILE_REVALIDATING, why, logging.INFO)
        return Action.SERVE, meta, True

    def start(
        self, target: Target, key: str, meta: ObjectMeta, client: ClientHeaders
    ) -> gevent.Greenlet | None:
        """Check the tag in the background unless a check of it is already running here."""
        name = hashlib.sha256(key.encode()).hexdigest()[:40] + ".lock"
        path = os.path.join(self.lock_dir, name)
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            locked = _try_lock(fd) and os.fstat(fd).st_ino == _inode(path)
        except BaseException:
            os.close(fd)
            raise
        if not locked:  # running, or a check finished and removed the file this instant
            os.close(fd)
            return None
        full = replace(client, accept=FULL_ACCEPT)
        greenlet = gevent.spawn(self._run, target, key, meta, full, path, fd)
        self.running.add(greenlet)
        greenlet.link(self.running.discard)
        return greenlet

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the running background checks (tests, shutdown)."""
        gevent.joinall(list(self.running), timeout=timeout)

    def _run(
        self,
        target: Target,
        key: str,
        meta: ObjectMeta,
        client: ClientHeaders,
        path: str,
        fd: int,
    ) -> None:
        try:
            self.check(target, key, meta, client)
        except Exception:
            log.exception("background revalidation of %s failed", target.reference)
            metrics.REVALIDATIONS.labels(freshness.FAILED).inc()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # before the unlock: a later check locks a new file
            os.close(fd)

    def check(self, target: Target, key: str, meta: ObjectMeta, client: ClientHeaders) -> str:
        """One background revalidation: refresh, refill, drop or keep the tag; its result."""
        status, digest, failure = freshness.head(self.fetcher, target, client)
        result = freshness.classify(status, digest == meta.digest, self.config.serve_stale_on_404)
        if result == freshness.UNCHANGED:
            freshness.refresh(self.fetcher.storage, key, meta)
        elif result == freshness.CHANGED:
            _drain(self.refetch(target, key, client, meta.digest))
        elif result == freshness.FORWARDED:
            result = freshness.REMOVED  # the next request misses and forwards upstream's 404
            self._drop(key, meta)
        elif result == freshness.STALE_SERVED:
            result = freshness.FAILED
            why = failure or f"upstream answered {status}"
            log.warning("background revalidation of tag %s: %s", target.reference, why)
        log.info("background revalidation of tag %s: %s", target.reference, result)
        metrics.REVALIDATIONS.labels(result).inc()
        return result

    def _drop(self, key: str, meta: ObjectMeta) -> None:
        """Remove the tag's entry, unless a fill replaced it meanwhile."""
        current = self.fetcher.lookup(key)
        if current is None or current.digest != meta.digest:
            return
        try:
            self.fetcher.storage.delete(key)
        except (NotFound, StoreError, OSError) as exc:
            log.warning("dropping %s failed: %s", key, exc)


def _drain(reply: Reply) -> None:
    """Read a reply nobody waits for, so its flight completes and lets go."""
    try:
        if not isinstance(reply.body, bytes):
            for _ in reply.body:
                pass
    finally:
        for part in (reply.body, reply.file):
            close = getattr(part, "close", None)
            if close is not None:
                close()


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
