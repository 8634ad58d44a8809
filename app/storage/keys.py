"""The key layout of the cache: the only code that knows where objects live.

Every component here has been validated by app.oci, so keys never contain
"..", empty segments or characters outside the registry grammars.

Layout (relative to FS_ROOT or S3_PREFIX):

  blobs/<alg>/<hex>                                        blob data (content-addressed)
  manifests/<registry>/<name>/_digests/<alg>/<hex>         manifest by digest (content-addressed)
  manifests/<registry>/<name>/_tags/<tag>/manifest         a tag's key (never a data object)
  manifests/<registry>/<name>/_tags/<tag>/manifest.<alg>-<hex>
                                                           the tag's data for one digest
  <key>.meta.json                                          sidecar: commit marker and metadata
  <key>.upload-<random>                                    S3 only: a large tag's upload in progress

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

from app.oci import is_digest

SIDECAR_SUFFIX = ".meta.json"
UPLOAD_INFIX = ".upload-"
_CONTENT_ADDRESSED = re.compile(r"(?:^blobs|/_digests)/(sha256|sha512)/([0-9a-f]+)$")
_TAG_DATA = re.compile(r"^(.*/_tags/[^/]+/manifest)\.(sha256|sha512)-([0-9a-f]+)$")


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


def data_owner(data_key: str) -> tuple[str, str] | None:
    """(key, digest) of a tag's digest-named data object; None for anything else."""
    match = _TAG_DATA.match(data_key)
    if match is None or not is_digest(f"{match[2]}:{match[3]}"):
        return None
    return match[1], f"{match[2]}:{match[3]}"


def upload(key: str, token: str) -> str:
    """A temporary object for a non-content-addressed key's multipart upload (S3)."""
    return f"{key}{UPLOAD_INFIX}{token}"


def is_key(name: str) -> bool:
    """False for names that are not keys or sidecars: a tag's data, an upload in progress."""
    return data_owner(name) is None and UPLOAD_INFIX not in name
