"""The storage interface shared by the filesystem and S3 backends."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from app.storage import keys

log = logging.getLogger("oci_pull_through.storage")


class NotFound(Exception):
    """The object is not in the cache (or was never committed)."""


class StoreError(Exception):
    """The backend failed; the caller falls back to upstream or abandons the fill."""


@dataclass(frozen=True)
class ObjectMeta:
    """What the sidecar records about a committed object."""

    digest: str
    size: int
    media_type: str
    headers: tuple[tuple[str, str], ...] = ()
    stored_at: float = field(default_factory=time.time)
    # "registry/repository" pairs through which these bytes were verified (SPEC §15).
    sources: tuple[str, ...] = ()

    def data_key(self, key: str) -> str:
        """The key of the data object holding these bytes for key; NotFound when it cannot
        be key's (a sidecar naming other bytes than its content-addressed key holds)."""
        try:
            return keys.data(key, self.digest)
        except ValueError:
            raise NotFound(f"{key}: sidecar names {self.digest}") from None

    def to_json(self) -> bytes:
        """Serialise for the sidecar."""
        return json.dumps(
            {
                "digest": self.digest,
                "size": self.size,
                "media_type": self.media_type,
                "headers": [list(h) for h in self.headers],
                "stored_at": self.stored_at,
                "sources": list(self.sources),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ObjectMeta:
        """Parse a sidecar; a damaged one counts as a missing object."""
        try:
            raw = json.loads(data)
            return cls(
                digest=str(raw["digest"]),
                size=int(raw["size"]),
                media_type=str(raw["media_type"]),
                headers=tuple((str(k), str(v)) for k, v in raw["headers"]),
                stored_at=float(raw["stored_at"]),
                sources=tuple(str(s) for s in raw.get("sources", ())),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise NotFound(f"unreadable sidecar: {exc}") from None


class BlobWriter(Protocol):
    """A pending object: invisible until commit, gone after abort."""

    def write(self, chunk: bytes) -> None:
        """Append bytes; StoreError aborts the write."""
        ...

    def may_adopt(self) -> bool:
        """Whether adopt can work at all, so a caller holding the bytes in a file need not write."""
        ...

    def adopt(self, path: str) -> bool:
        """Take the complete file at path as the data, no copy; False (nothing changed) if not."""
        ...

    def commit(self, meta: ObjectMeta) -> None:
        """Store the data under keys.data(key, meta.digest), then the sidecar, atomically.

        No previous sidecar is removed first; a content-addressed key refuses another digest
        (StoreError, the write aborted).
        """
        ...

    def abort(self) -> None:
        """Drop everything written; idempotent, never raises."""
        ...


class Storage(Protocol):
    """The whole storage contract; every implementation passes tests/unit/test_storage_contract.py.

    Callers use nothing else: no backend attributes, no probing (mypy checks both backends
    and the usage-tracking wrapper of app/evictor.py against it).
    """

    def stat(self, key: str) -> ObjectMeta:
        """The sidecar of a committed object; NotFound when there is none."""
        ...

    def open(
        self, key: str, meta: ObjectMeta | None = None, offset: int = 0, length: int | None = None
    ) -> BinaryIO:
        """A reader positioned at offset that ends after length bytes (None: the rest).

        The data meta describes (the sidecar's when None); only that span is fetched.
        NotFound if the data is missing or not meta.size bytes; ValueError if the span
        does not lie within it.
        """
        ...

    def writer(self, key: str) -> BlobWriter:
        """Start a write nobody sees until commit."""
        ...

    def update_meta(self, key: str, meta: ObjectMeta) -> None:
        """Replace only the sidecar, atomically; NotFound unless data for meta.digest exists."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object: its sidecar first, then the data it names."""
        ...

    def presign(self, key: str, meta: ObjectMeta) -> str | None:
        """A URL of the data meta describes, or None when the proxy serves it itself."""
        ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with prefix that have a sidecar, in no order; never data or leftovers."""
        ...

    def sweep(self, max_age: float = 0.0) -> int:
        """Remove what writers that died left behind, older than max_age s; returns how many.

        Never anything a live writer still holds, never a committed object. What a backend
        can tell apart differs: see its own sweep.
        """
        ...


def span_end(size: int, offset: int, length: int | None) -> int:
    """Where a read of length bytes from offset ends in an object of size bytes (checked)."""
    end = size if length is None else offset + length
    if offset < 0 or end < offset or end > size:
        raise ValueError(f"span {offset}+{length} outside an object of {size} bytes")
    return end


def put(storage: Storage, key: str, chunks: Iterable[bytes], meta: ObjectMeta) -> None:
    """Store already-verified bytes (small objects such as manifests) in one go."""
    writer = storage.writer(key)
    try:
        for chunk in chunks:
            writer.write(chunk)
        writer.commit(meta)
    except BaseException:
        writer.abort()
        raise


def sweep_in_background(storage: Storage, max_age: float = 0.0) -> threading.Thread:
    """Remove crash leftovers (SPEC §15) without delaying start-up; a failure is only logged."""

    def run() -> None:
        try:
            removed = storage.sweep(max_age)
        except (StoreError, OSError) as exc:
            log.warning("sweeping crash leftovers failed: %s", exc)
            return
        if removed:
            log.info("removed %d files left by writers that died", removed)

    thread = threading.Thread(target=run, name="oci-sweep", daemon=True)
    thread.start()
    return thread
