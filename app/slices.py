"""Air-gap slices: cached images as an OCI image layout archive, and such an archive loaded
back into a store (issue 14, item 6). A site with no upstream seeds its cache this way.

Export reads only the store (manifests by tag or digest, blobs by digest) and checks every
object's digest on the way out. Import checks every object twice: all of them before the
first write (a bad slice leaves nothing behind), then each again while it is written, so
only bytes that match their digest are ever committed (§15). Blobs first, manifests by
digest next, tags last: a tag never names what is not there. No Flask here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO

from app.commands.warmref import ImageRef, parse_image, platform_matches
from app.oci import is_digest
from app.policy import IMAGE_TYPES, INDEX_TYPES
from app.storage import NotFound, ObjectMeta, Storage, keys

REF_NAME = "org.opencontainers.image.ref.name"
REPOSITORY = "io.github.oci-pull-through.repository"  # registry/name it was cached under
MAX_MANIFEST = 4 * 1024 * 1024
CHUNK = 1024 * 1024
FOREIGN_LAYERS = (
    "application/vnd.oci.image.layer.nondistributable",
    "application/vnd.docker.image.rootfs.foreign",
)


class SliceError(Exception):
    """What makes an export or import impossible, as the one line the command prints."""


@dataclass
class Planned:
    """One object of a slice: where it is stored, its sidecar, and a manifest's bytes."""

    key: str
    meta: ObjectMeta
    data: bytes | None = None


@dataclass
class ExportPlan:
    """index.json's entries and every object they need, or what is not cached."""

    entries: list[dict[str, object]] = field(default_factory=list)
    objects: dict[str, Planned] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def _digest(data: bytes, algorithm: str) -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _blob_path(digest: str) -> str:
    algorithm, hex_part = digest.split(":", 1)
    return f"blobs/{algorithm}/{hex_part}"


def _read_manifest(storage: Storage, key: str, meta: ObjectMeta) -> bytes:
    if meta.size > MAX_MANIFEST:
        raise SliceError(f"cached manifest {key} is larger than {MAX_MANIFEST} bytes")
    with storage.open(key, meta) as fh:
        data = fh.read()
    if _digest(data, meta.digest.split(":", 1)[0]) != meta.digest:
        raise SliceError(f"cached manifest {key} does not match its digest {meta.digest}")
    return data


def plan_export(storage: Storage, images: list[str], platform: str | None) -> ExportPlan:
    """What `export` writes for these images (every platform of an index, or one)."""
    plan = ExportPlan()
    for image in images:
        try:
            ref = parse_image(image)
        except ValueError as exc:
            raise SliceError(str(exc)) from None
        shown = (
            f"{ref.registry}/{ref.name}{'@' if is_digest(ref.reference) else ':'}{ref.reference}"
        )
        key = keys.manifest(ref.registry, ref.name, ref.reference)
        try:
            meta = storage.stat(key)
        except NotFound:
            plan.missing.append(shown)
            continue
        annotations = {REF_NAME: shown, REPOSITORY: f"{ref.registry}/{ref.name}"}
        plan.entries.append(
            {
                "mediaType": meta.media_type,
                "digest": meta.digest,
                "size": meta.size,
                "annotations": annotations,
            }
        )
        _plan_manifest(storage, plan, ref, shown, key, meta, platform)
    return plan


def _plan_manifest(
    storage: Storage,
    plan: ExportPlan,
    ref: ImageRef,
    shown: str,
    key: str,
    meta: ObjectMeta,
    platform: str | None,
) -> None:
    data = _read_manifest(storage, key, meta)
    plan.objects.setdefault(
        meta.digest, Planned(keys.manifest(ref.registry, ref.name, meta.digest), meta, data)
    )
    doc = json.loads(data)
    kind = doc.get("mediaType") or meta.media_type
    if kind in INDEX_TYPES or "manifests" in doc:
        children = [
            m for m in doc.get("manifests", []) if platform_matches(m.get("platform"), platform)
        ]
        if not children:
            raise SliceError(f"{shown} has no platform {platform}")
        for child in children:
            child_key = keys.manifest(ref.registry, ref.name, child["digest"])
            try:
                child_meta = storage.stat(child_key)
            except NotFound:
                plan.missing.append(f"{shown} manifest {child['digest']}")
                continue
            _plan_manifest(storage, plan, ref, shown, child_key, child_meta, platform)
        return
    if kind not in IMAGE_TYPES and "layers" not in doc:
        raise SliceError(f"{shown}: manifest type {kind} cannot go into a slice")
    for desc in [doc.get("config", {}), *doc.get("layers", [])]:
        digest = desc.get("digest", "")
        try:
            blob_meta = storage.stat(keys.blob(digest))
        except (NotFound, ValueError):
            if not str(desc.get("mediaType", "")).startswith(FOREIGN_LAYERS):
                plan.missing.append(f"{shown} blob {digest}")
            continue
        plan.objects.setdefault(digest, Planned(keys.blob(digest), blob_meta))


class _Hashing(io.RawIOBase):
    """A reader that hashes what passes through it."""

    def __init__(self, source: BinaryIO, algorithm: str) -> None:
        self.source = source
        self.hash = hashlib.new(algorithm)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self.source.read(size)
        self.hash.update(chunk)
        return chunk


def _tar_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def write_archive(storage: Storage, plan: ExportPlan, path: str) -> int:
    """Write the slice to path (whole or not at all); its size in bytes."""
    partial = f"{path}.partial"
    try:
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            _tar_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            for digest, obj in plan.objects.items():
                info = tarfile.TarInfo(_blob_path(digest))
                info.size, info.mode = obj.meta.size, 0o644
                if obj.data is not None:
                    tar.addfile(info, io.BytesIO(obj.data))
                    continue
                with storage.open(obj.key, obj.meta) as fh:
                    reader = _Hashing(fh, digest.split(":", 1)[0])
                    tar.addfile(info, reader)
                if f"{digest.split(':', 1)[0]}:{reader.hash.hexdigest()}" != digest:
                    raise SliceError(f"cached blob {digest} does not match its digest")
            index = {"schemaVersion": 2, "mediaType": INDEX_TYPES[0], "manifests": plan.entries}
            _tar_bytes(tar, "index.json", json.dumps(index, indent=2).encode())
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise
    return os.path.getsize(path)
