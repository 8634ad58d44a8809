"""The key layout of the cache: the only code that knows where objects live.

Every component here has been validated by app.oci, so keys never contain
"..", empty segments or characters outside the registry grammars.
"""

from __future__ import annotations

from app.oci import is_digest

SIDECAR_SUFFIX = ".meta.json"


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
