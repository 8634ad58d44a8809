"""Image references as `warm` reads them, and platform matching; pure, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from app.errors import RegistryError
from app.oci import is_digest, is_valid_name, is_valid_tag, normalize_registry

DOCKER_HUB = "docker.io"


@dataclass(frozen=True)
class ImageRef:
    """registry/name:tag or registry/name@digest, normalised like Docker does."""

    registry: str
    name: str
    reference: str


def parse_image(image: str) -> ImageRef:
    """Docker's rules: a first component with '.' or ':' (or localhost) is the registry."""
    rest, reference = image.strip(), "latest"
    if "@" in rest:
        rest, reference = rest.split("@", 1)
        if not is_digest(reference):
            raise ValueError(f"not a digest: {reference!r}")
    else:
        last = rest.rsplit("/", 1)[-1]
        if ":" in last:
            rest, reference = rest.rsplit(":", 1)
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
    return ImageRef(registry, name, reference)


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
