"""`import`: an OCI image layout archive (an air-gap slice) loaded into the store.

Every object is checked against its digest before the first write, so a bad slice leaves
nothing behind, and again while it is written: only matching bytes are committed (§15).
Blobs first, manifests by digest next, tags last. No Flask here.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from app.commands.warmref import parse_image
from app.oci import BLOB, MANIFEST, is_digest, is_valid_tag
from app.policy import INDEX_TYPES, media_type
from app.slices import CHUNK, FOREIGN_LAYERS, MAX_MANIFEST, REF_NAME, REPOSITORY, SliceError
from app.storage import NotFound, ObjectMeta, Storage, StoreError, keys, put


@dataclass
class ImportPlan:
    """What a slice holds, verified: manifests (bytes in memory), blobs, tags."""

    manifests: dict[tuple[str, str, str], tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[str, tuple[int, str, str]] = field(default_factory=dict)  # size, type, source
    tags: list[tuple[str, str, str, str]] = field(
        default_factory=list
    )  # registry, name, tag, digest


def _destination(desc: dict, repository: str | None) -> tuple[str, str, str | None]:
    """(registry, name, tag or None) an index.json entry is imported under."""
    annotations = desc.get("annotations") or {}
    ref_name = str(annotations.get(REF_NAME, ""))
    tag: str | None = None
    full = None
    if "/" in ref_name:
        try:
            full = parse_image(ref_name)
        except ValueError:
            raise SliceError(f"index.json: {ref_name!r} is not an image reference") from None
        tag = full.tag if is_digest(full.reference) else full.reference
    elif ref_name:
        if not is_valid_tag(ref_name):
            raise SliceError(f"index.json: {ref_name!r} is not a tag")
        tag = ref_name
    where = repository or annotations.get(REPOSITORY)
    if where:
        if ":" in str(where).rsplit("/", 1)[-1] or "@" in str(where):
            raise SliceError(f"{where!r}: give a repository, without tag or digest")
        try:
            target = parse_image(str(where))
        except ValueError:
            raise SliceError(f"{where!r} is not a repository") from None
        return target.registry, target.name, tag
    if full is None:
        raise SliceError(
            f"index.json entry {desc.get('digest')} names no repository: use --repository"
        )
    return full.registry, full.name, tag


def _member_bytes(
    tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str, limit: int
) -> bytes:
    info = members.get(name)
    if info is None:
        raise SliceError(f"the slice has no {name}")
    if info.size > limit:
        raise SliceError(f"{name} is larger than {limit} bytes")
    fh = tar.extractfile(info)
    assert fh is not None
    return fh.read()


def _blob_name(digest: str) -> str:
    if not is_digest(digest):
        raise SliceError(f"{digest!r} is not a digest")
    return "blobs/" + digest.replace(":", "/", 1)


def read_plan(
    tar: tarfile.TarFile, repository: str | None
) -> tuple[ImportPlan, dict[str, tarfile.TarInfo]]:
    """Parse index.json and every manifest (each verified); list the blobs they need."""
    members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
    layout = json.loads(_member_bytes(tar, members, "oci-layout", 4096))
    if layout.get("imageLayoutVersion") != "1.0.0":
        raise SliceError("oci-layout: not an OCI image layout 1.0.0")
    index = json.loads(_member_bytes(tar, members, "index.json", MAX_MANIFEST))
    plan = ImportPlan()
    for desc in index.get("manifests", []):
        registry, name, tag = _destination(desc, repository)
        _walk(tar, members, plan, desc, registry, name, top=True)
        if tag is not None:
            plan.tags.append((registry, name, tag, desc["digest"]))
    if not plan.manifests:
        raise SliceError("index.json names no image")
    return plan, members


def _walk(
    tar: tarfile.TarFile,
    members: dict[str, tarfile.TarInfo],
    plan: ImportPlan,
    desc: dict,
    registry: str,
    name: str,
    top: bool = False,
) -> bool:
    digest, size = str(desc.get("digest", "")), int(desc.get("size", -1))
    blob_name = _blob_name(digest)
    if blob_name not in members and not top:
        return False  # a platform the slice left out (export --platform)
    data = _member_bytes(tar, members, blob_name, MAX_MANIFEST)
    algorithm = digest.split(":", 1)[0]
    if len(data) != size or f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}" != digest:
        raise SliceError(f"{blob_name} does not match its digest and size; nothing imported")
    doc = json.loads(data)
    kind = media_type(MANIFEST, doc.get("mediaType") or desc.get("mediaType"))
    plan.manifests[(registry, name, digest)] = (data, kind)
    if kind in INDEX_TYPES or "manifests" in doc:
        found = [
            _walk(tar, members, plan, child, registry, name) for child in doc.get("manifests", [])
        ]
        if not any(found):
            raise SliceError(f"{blob_name}: the slice holds none of its manifests")
        return True
    for blob in [doc.get("config", {}), *doc.get("layers", [])]:
        blob_digest = str(blob.get("digest", ""))
        if _blob_name(blob_digest) not in members:
            if str(blob.get("mediaType", "")).startswith(FOREIGN_LAYERS):
                continue
            raise SliceError(f"the slice lacks blob {blob_digest} of {registry}/{name}")
        plan.blobs.setdefault(
            blob_digest,
            (int(blob.get("size", -1)), str(blob.get("mediaType", "")), f"{registry}/{name}"),
        )
    return True


def _chunks(tar: tarfile.TarFile, info: tarfile.TarInfo) -> Iterator[bytes]:
    fh = tar.extractfile(info)
    assert fh is not None
    while chunk := fh.read(CHUNK):
        yield chunk


def _check_blob(tar: tarfile.TarFile, info: tarfile.TarInfo, digest: str, size: int) -> None:
    algorithm = digest.split(":", 1)[0]
    hasher = hashlib.new(algorithm)
    for chunk in _chunks(tar, info):
        hasher.update(chunk)
    if info.size != size or f"{algorithm}:{hasher.hexdigest()}" != digest:
        raise SliceError(f"{info.name} does not match its digest and size; nothing imported")


def _store_blob(
    storage: Storage,
    tar: tarfile.TarFile,
    info: tarfile.TarInfo,
    digest: str,
    kind: str,
    source: str,
) -> bool:
    """Write one blob, hashing as it goes; committed only on a match. False if already there."""
    key = keys.blob(digest)
    try:
        known = storage.stat(key)
    except NotFound:
        known = None
    if known is not None and known.digest == digest:
        if source not in known.sources:
            storage.update_meta(key, replace(known, sources=(*known.sources, source)))
        return False
    algorithm = digest.split(":", 1)[0]
    hasher = hashlib.new(algorithm)
    writer = storage.writer(key)
    try:
        for chunk in _chunks(tar, info):
            hasher.update(chunk)
            writer.write(chunk)
        if f"{algorithm}:{hasher.hexdigest()}" != digest:
            raise SliceError(f"{info.name} changed while it was imported; not committed")
        writer.commit(ObjectMeta(digest, info.size, media_type(BLOB, kind), sources=(source,)))
    except BaseException:
        writer.abort()
        raise
    return True


@dataclass
class Imported:
    """What an import added."""

    blobs: int = 0
    manifests: int = 0
    tags: list[str] = field(default_factory=list)


def import_archive(storage: Storage, path: str, repository: str | None = None) -> Imported:
    """Load a slice into the store, verifying every digest; nothing of a bad slice is kept."""
    try:
        tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by the with below
    except (OSError, tarfile.TarError) as exc:
        raise SliceError(f"{path}: {exc}") from None
    with tar:
        try:
            plan, members = read_plan(tar, repository)
            for digest, (size, _, _) in plan.blobs.items():
                _check_blob(tar, members[_blob_name(digest)], digest, size)
        except (ValueError, KeyError, TypeError, tarfile.TarError) as exc:
            raise SliceError(f"{path}: not a valid slice: {exc}") from None
        done = Imported()
        try:
            for digest, (_, kind, source) in plan.blobs.items():
                done.blobs += _store_blob(
                    storage, tar, members[_blob_name(digest)], digest, kind, source
                )
            for (registry, name, digest), (data, kind) in plan.manifests.items():
                meta = ObjectMeta(digest, len(data), kind, sources=(f"{registry}/{name}",))
                put(storage, keys.manifest(registry, name, digest), [data], meta)
                done.manifests += 1
            for registry, name, tag, digest in plan.tags:
                data, kind = plan.manifests[(registry, name, digest)]
                meta = ObjectMeta(digest, len(data), kind, sources=(f"{registry}/{name}",))
                put(storage, keys.manifest(registry, name, tag), [data], meta)
                done.tags.append(f"{registry}/{name}:{tag}")
        except (StoreError, OSError) as exc:
            raise SliceError(f"storing the slice failed: {exc}") from None
    return done
