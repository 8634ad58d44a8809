"""What the cache holds: repositories, tags, digests and the bytes behind each (for `ls`).

Everything goes through the Storage protocol (Storage.list for the keys) and keys.parse
for what a key names; no key is taken apart here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from app.storage import NotFound, ObjectMeta, Storage, StoreError, keys


def committed(storage: Storage, prefix: str) -> list[str]:
    """Keys under prefix that have a sidecar, i.e. that exist (SPEC §8), sorted."""
    return sorted(storage.list(prefix))


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
                parsed = keys.parse(key)
                meta = self._stat(key)
                if parsed is not None and parsed.digest is not None and meta is not None:
                    sizes[parsed.digest] = meta.size
            self._blob_sizes = sizes
        return self._blob_sizes

    def repositories(self) -> list[Repository]:
        """Every repository with a cached manifest, its tags first, then untagged digests."""
        repos: dict[tuple[str, str], Repository] = {}
        tagged: dict[tuple[str, str], set[str]] = {}
        digests: dict[tuple[str, str], list[str]] = {}
        for key in committed(self.storage, "manifests/"):
            parsed = keys.parse(key)
            if parsed is None:
                continue
            registry, name = parsed.registry, parsed.name
            if parsed.tag is not None:
                meta = self._stat(key)
                if meta is None:
                    continue
                entry = self._entry(registry, name, parsed.tag, meta)
                repos.setdefault((registry, name), Repository(registry, name)).tags.append(entry)
                tagged.setdefault((registry, name), set()).add(meta.digest)
            elif parsed.digest is not None:
                digests.setdefault((registry, name), []).append(parsed.digest)
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
