"""The key layout of the cache: the only code that knows where objects live.

Every component here has been validated by app.oci, so keys never contain
"..", empty segments or characters outside the registry grammars.

Layout (relative to FS_ROOT or S3_PREFIX), like distribution's paths.go:

  blobs/<alg>/<hex>                                       blob: key and data (content-addressed)
  blobs/<alg>/<hex>.meta.json                             its sidecar
  manifests/<registry>/<name>/_digests/<alg>/<hex>        manifest by digest: key and data
  manifests/<registry>/<name>/_digests/<alg>/<hex>.meta.json
                                                          its sidecar
  manifests/<registry>/<name>/_tags/<tag>/manifest        a tag's key (never a data object)
  manifests/<registry>/<name>/_tags/<tag>/manifest.meta.json
                                                          its sidecar
  manifests/<registry>/<name>/_tags/<tag>/manifest.<alg>-<hex>
                                                          the tag's data for one digest
  manifests/<registry>/<name>/_tags/<tag>/manifest.upload-<hex>
                                                          S3 only: a large tag's upload in progress
  .tmp-<random> in any directory                          fs only: a writer's temp file (fs.py)

<alg> is sha256 or sha512, <name> has one or more "/"-separated components (none starts
with "_", so "/_tags/" and "/_digests/" are unambiguous), <registry> has no "/".
The sidecar (<key>.meta.json) is the commit marker and holds the ObjectMeta.

The sidecar names the data it describes (SPEC §15): a content-addressed key's data is the
key itself, since every writer stores identical bytes there; a tag's data is named after
its digest, so two fills of one tag with different bytes never write the same object and
the sidecar, replaced in one atomic step, always describes the data it names. Data of a
tag that moved is left behind at commit and removed later by eviction (app/eviction.py).
A tag's data name ends in "<alg>-<hex>", never in ".meta.json", and lives in the tag's
own directory next to only its key and sidecar, so it collides with nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from app.oci import is_digest

SIDECAR_SUFFIX = ".meta.json"
UPLOAD_INFIX = ".upload-"
_CONTENT_ADDRESSED = re.compile(r"(?:^blobs|/_digests)/(sha256|sha512)/([0-9a-f]+)$")
_BLOB = re.compile(r"blobs/(sha256|sha512)/([0-9a-f]+)")
_MANIFEST = re.compile(
    r"manifests/(?P<registry>[^/]+)/(?P<name>[^_/][^/]*(?:/[^_/][^/]*)*)/"
    r"(?:_digests/(?P<alg>sha256|sha512)/(?P<hex>[0-9a-f]+)|_tags/(?P<tag>[^/]+)/manifest)"
)
_TAG_DATA = re.compile(r"(.*/_tags/[^/]+/manifest)\.(sha256|sha512)-([0-9a-f]+)")
_UPLOAD = re.compile(r"(.*/_tags/[^/]+/manifest)" + re.escape(UPLOAD_INFIX) + r"[0-9a-f]+")

Kind = Literal["blob", "manifest"]
Part = Literal["key", "data", "sidecar", "upload"]


@dataclass(frozen=True)
class Parsed:
    """What one stored name is: which object it belongs to, and which part of it."""

    key: str  # the object's storage key
    kind: Kind
    part: Part  # "key": the key itself (a content-addressed key's data); "data": a tag's data
    registry: str = ""  # manifests only
    name: str = ""  # manifests only
    tag: str | None = None  # a tag's key, sidecar, data and uploads
    digest: str | None = None  # the key's own digest, or the digest a tag's data holds

    @property
    def reference(self) -> str:
        """The tag or digest a client names this manifest (or blob) by."""
        return self.tag if self.tag is not None else self.digest or ""


def _digest_path(digest: str) -> str:
    if not is_digest(digest):
        raise ValueError(f"not a digest: {digest!r}")
    algorithm, hex_part = digest.split(":", 1)
    return f"{algorithm}/{hex_part}"


def blob(digest: str) -> str:
    """Blobs are shared by every registry and repository: keyed by digest alone."""
    return f"blobs/{_digest_path(digest)}"


def manifest(registry: str, name: str, reference: str) -> str:
    """Manifests live under their registry and repository, by digest or by tag."""
    if is_digest(reference):
        return f"manifests/{registry}/{name}/_digests/{_digest_path(reference)}"
    # The trailing segment keeps a tag such as "v1.meta.json" from colliding with a sidecar.
    return f"manifests/{registry}/{name}/_tags/{reference}/manifest"


def sidecar(key: str) -> str:
    """The commit marker and metadata of an object."""
    return key + SIDECAR_SUFFIX


def content_digest(key: str) -> str | None:
    """The digest a content-addressed key (blob, manifest by digest) names; None for a tag."""
    match = _CONTENT_ADDRESSED.search(key)
    if match is None or not is_digest(f"{match[1]}:{match[2]}"):
        return None
    return f"{match[1]}:{match[2]}"


def data(key: str, digest: str) -> str:
    """The data object of key holding the bytes whose digest is digest (see the layout above).

    ValueError when key is content-addressed by another digest: it can hold no other bytes.
    """
    own = content_digest(key)
    if own is not None:
        if own != digest:
            raise ValueError(f"{key} holds {own}, not {digest}")
        return key
    algorithm, hex_part = _digest_path(digest).split("/", 1)
    return f"{key}.{algorithm}-{hex_part}"


def segments(stored: str) -> list[str]:
    """The "/"-separated segments of a stored name (a path's parts); ValueError if unsafe."""
    parts = stored.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"unsafe storage key {stored!r}")
    return parts


def upload(key: str, token: str) -> str:
    """A temporary object for a non-content-addressed key's multipart upload (S3)."""
    return f"{key}{UPLOAD_INFIX}{token}"


def _parse_key(key: str) -> Parsed | None:
    """A storage key itself (blob, manifest by digest or tag); None for anything else."""
    if match := _BLOB.fullmatch(key):
        digest = f"{match[1]}:{match[2]}"
        return Parsed(key, "blob", "key", digest=digest) if is_digest(digest) else None
    match = _MANIFEST.fullmatch(key)
    if match is None:
        return None
    registry, name = match["registry"], match["name"]
    if match["tag"] is not None:
        return Parsed(key, "manifest", "key", registry, name, tag=match["tag"])
    digest = f"{match['alg']}:{match['hex']}"
    if not is_digest(digest):
        return None
    return Parsed(key, "manifest", "key", registry, name, digest=digest)


def parse(stored: str) -> Parsed | None:
    """What a stored name (key, sidecar, a tag's data, an upload) is; None if not in the layout."""
    if stored.endswith(SIDECAR_SUFFIX):
        owner = _parse_key(stored.removesuffix(SIDECAR_SUFFIX))
        return None if owner is None else _with(owner, part="sidecar")
    if match := _TAG_DATA.fullmatch(stored):
        owner, digest = _parse_key(match[1]), f"{match[2]}:{match[3]}"
        if owner is None or not is_digest(digest):
            return None
        return _with(owner, part="data", digest=digest)
    if match := _UPLOAD.fullmatch(stored):
        owner = _parse_key(match[1])
        return None if owner is None else _with(owner, part="upload")
    return _parse_key(stored)


def _with(owner: Parsed, part: Part, digest: str | None = None) -> Parsed:
    return Parsed(
        owner.key, owner.kind, part, owner.registry, owner.name, owner.tag, digest or owner.digest
    )
