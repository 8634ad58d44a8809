"""What the cache holds: repositories, tags, digests and the bytes behind each (for `ls`).

Listing is the one thing the Storage protocol does not offer (the proxy never needs it),
so list_keys() knows both backends; everything else goes through the protocol.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from app.storage import NotFound, ObjectMeta, Storage, StoreError, keys
from app.storage.keys import SIDECAR_SUFFIX

_TAGS, _DIGESTS, _MANIFEST = "/_tags/", "/_digests/", "/manifest"


def list_keys(storage: Storage, prefix: str) -> Iterator[str]:
    """Every storage key under prefix (content-addressed data and sidecars), in any order.

    A tag's digest-named data objects and in-progress uploads are not keys: left out.
    """
    for key in _list_raw(storage, prefix):
        if keys.is_key(key):
            yield key


def _list_raw(storage: Storage, prefix: str) -> Iterator[str]:
    """Every stored name under prefix."""
    from app.storage.fs import TEMP_PREFIX, FilesystemStorage

    if isinstance(storage, FilesystemStorage):
        top = os.path.join(storage.root, prefix)
        for directory, _, files in os.walk(top):
            for name in files:
                if not name.startswith(TEMP_PREFIX):
                    path = os.path.join(directory, name)
                    yield os.path.relpath(path, storage.root).replace(os.sep, "/")
        return
    from app.storage.s3 import S3Storage

    if isinstance(storage, S3Storage):
        strip = len(storage.object_key(""))
        pages = storage.client.get_paginator("list_objects_v2").paginate(
            Bucket=storage.bucket, Prefix=storage.object_key(prefix)
        )
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"][strip:]
        return
    raise TypeError(f"cannot list a {type(storage).__name__}")


def committed(storage: Storage, prefix: str) -> list[str]:
    """Keys under prefix that have a sidecar, i.e. that exist (SPEC §8)."""
    return sorted(
        key[: -len(SIDECAR_SUFFIX)]
        for key in list_keys(storage, prefix)
        if key.endswith(SIDECAR_SUFFIX)
    )


@dataclass
class TagEntry:
    """One cached tag (or an untagged digest when tag is None)."""

    tag: str | None
    digest: str
    media_type: str
    stored_at: float
    size: int  # cached bytes of the image: its manifests and the blobs they name
    manifests: dict[str, int] = field(default_factory=dict)
    blobs: set[str] = field(default_factory=set)


@dataclass
class Repository:
    """A cached repository of one registry."""

    registry: str
    name: str
    tags: list[TagEntry] = field(default_factory=list)
    size: int = 0  # cached bytes behind all its tags, each manifest and blob counted once


class Inventory:
    """Reads the cache once: manifests per repository, blob sizes from their sidecars."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._blob_sizes: dict[str, int] | None = None

    def blob_sizes(self) -> dict[str, int]:
        """digest -> size of every cached blob."""
        if self._blob_sizes is None:
            sizes: dict[str, int] = {}
            for key in committed(self.storage, "blobs/"):
                algorithm, _, hex_part = key.removeprefix("blobs/").partition("/")
                meta = self._stat(key)
                if meta is not None:
                    sizes[f"{algorithm}:{hex_part}"] = meta.size
            self._blob_sizes = sizes
        return self._blob_sizes

    def repositories(self) -> list[Repository]:
        """Every repository with a cached manifest, its tags first, then untagged digests."""
        repos: dict[tuple[str, str], Repository] = {}
        tagged: dict[tuple[str, str], set[str]] = {}
        digests: dict[tuple[str, str], list[str]] = {}
        for key in committed(self.storage, "manifests/"):
            path = key.removeprefix("manifests/")
            if _TAGS in path and path.endswith(_MANIFEST):
                repo, _, tag = path.removesuffix(_MANIFEST).partition(_TAGS)
                registry, _, name = repo.partition("/")
                meta = self._stat(key)
                if meta is None:
                    continue
                entry = self._entry(registry, name, tag, meta)
                repos.setdefault((registry, name), Repository(registry, name)).tags.append(entry)
                tagged.setdefault((registry, name), set()).add(meta.digest)
            elif _DIGESTS in path:
                repo, _, digest_path = path.partition(_DIGESTS)
                registry, _, name = repo.partition("/")
                digests.setdefault((registry, name), []).append(digest_path.replace("/", ":", 1))
        for (registry, name), found in digests.items():
            repo = repos.setdefault((registry, name), Repository(registry, name))
            children = {c for t in repo.tags for c in self._children(registry, name, t.digest)}
            for digest in found:
                if digest in tagged.get((registry, name), set()) or digest in children:
                    continue
                meta = self._stat(keys.manifest(registry, name, digest))
                if meta is not None:
                    repo.tags.append(self._entry(registry, name, None, meta))
        sizes = self.blob_sizes()
        for repo in repos.values():
            manifests = {d: n for t in repo.tags for d, n in t.manifests.items()}
            blobs = {b for t in repo.tags for b in t.blobs}
            repo.size = sum(manifests.values()) + sum(sizes.get(b, 0) for b in blobs)
        return sorted(repos.values(), key=lambda r: (r.registry, r.name))

    def _entry(self, registry: str, name: str, tag: str | None, meta: ObjectMeta) -> TagEntry:
        manifests, blobs = self._closure(registry, name, meta.digest)
        sizes = self.blob_sizes()
        size = sum(manifests.values()) + sum(sizes.get(b, 0) for b in blobs)
        return TagEntry(tag, meta.digest, meta.media_type, meta.stored_at, size, manifests, blobs)

    def _closure(self, registry: str, name: str, digest: str) -> tuple[dict[str, int], set[str]]:
        """Cached manifests (digest -> size) reachable from digest, and the blobs they name."""
        manifests: dict[str, int] = {}
        blobs: set[str] = set()
        pending = [digest]
        while pending:
            current = pending.pop()
            if current in manifests:
                continue
            doc, size = self._manifest(registry, name, current)
            if doc is None:
                continue
            manifests[current] = size
            pending += [m["digest"] for m in doc.get("manifests", []) if "digest" in m]
            config = doc.get("config")
            if isinstance(config, dict) and "digest" in config:
                blobs.add(config["digest"])
            blobs.update(layer["digest"] for layer in doc.get("layers", []) if "digest" in layer)
        return manifests, blobs

    def _children(self, registry: str, name: str, digest: str) -> list[str]:
        doc, _ = self._manifest(registry, name, digest)
        return [m["digest"] for m in (doc or {}).get("manifests", []) if "digest" in m]

    def _manifest(self, registry: str, name: str, digest: str) -> tuple[dict | None, int]:
        try:
            with self.storage.open(keys.manifest(registry, name, digest)) as fh:
                data = fh.read()
            doc = json.loads(data)
        except (NotFound, StoreError, ValueError):
            return None, 0
        return (doc if isinstance(doc, dict) else None), len(data)

    def _stat(self, key: str) -> ObjectMeta | None:
        try:
            return self.storage.stat(key)
        except (NotFound, StoreError):
            return None
