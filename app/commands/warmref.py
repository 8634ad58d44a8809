"""Image references as `warm` reads them, and platform matching; pure, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from app.errors import RegistryError
from app.oci import is_digest, is_valid_name, is_valid_tag, normalize_registry

DOCKER_HUB = "docker.io"


@dataclass(frozen=True)
class ImageRef:
    """registry/name:tag, registry/name@digest or both, normalised like Docker does."""

    registry: str
    name: str
    reference: str  # what is pulled: the digest when one is given, else the tag
    tag: str | None = None  # a pinned reference's tag (name:tag@digest), kept for display


def parse_image(image: str) -> ImageRef:
    """Docker's rules: a first component with '.' or ':' (or localhost) is the registry.

    name:tag@digest (a Renovate pin) pulls the digest, which wins over the tag.
    """
    rest, reference, tag = image.strip(), "latest", None
    if "@" in rest:
        rest, reference = rest.split("@", 1)
        if not is_digest(reference):
            raise ValueError(f"not a digest: {reference!r}")
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not is_valid_tag(tag):
            raise ValueError(f"not a tag: {tag!r}")
        if not is_digest(reference):
            reference, tag = tag, None
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        try:
            registry, name = normalize_registry(first), remainder
        except RegistryError as exc:
            raise ValueError(str(exc)) from None
    else:
        registry, name = DOCKER_HUB, rest
    if registry == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    if not is_valid_name(name) or not (is_digest(reference) or is_valid_tag(reference)):
        raise ValueError(f"not an image reference: {image!r}")
    return ImageRef(registry, name, reference, tag)


def platform_matches(platform: object, wanted: str | None) -> bool:
    """An index entry's platform against --platform os/arch[/variant] (None: every platform)."""
    if not isinstance(platform, dict):
        return wanted is None
    if platform.get("os") == "unknown":  # attestation manifests (buildx), not an image
        return False
    if wanted is None:
        return True
    os_name, _, rest = wanted.partition("/")
    arch, _, variant = rest.partition("/")
    if platform.get("os") != os_name or platform.get("architecture") != arch:
        return False
    return not variant or platform.get("variant") == variant
