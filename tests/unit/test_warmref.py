"""Image references and platform choice of `warm` (app/commands/warmref.py)."""

from __future__ import annotations

import pytest

from app.commands.warmref import ImageRef, parse_image, platform_matches

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("image", "ref"),
    [
        ("alpine", ImageRef("docker.io", "library/alpine", "latest")),
        ("alpine:3", ImageRef("docker.io", "library/alpine", "3")),
        ("bitnami/redis:7", ImageRef("docker.io", "bitnami/redis", "7")),
        ("index.docker.io/alpine:3", ImageRef("docker.io", "library/alpine", "3")),
        ("ghcr.io/org/sub/app:v1.2", ImageRef("ghcr.io", "org/sub/app", "v1.2")),
        ("127.0.0.1:5000/e2e/app:v1", ImageRef("127.0.0.1:5000", "e2e/app", "v1")),
        ("localhost/app", ImageRef("localhost", "app", "latest")),
        (f"quay.io/org/app@{DIGEST}", ImageRef("quay.io", "org/app", DIGEST)),
    ],
)
def test_references_are_read_like_docker_does(image: str, ref: ImageRef) -> None:
    assert parse_image(image) == ref


@pytest.mark.parametrize(
    ("image", "ref"),
    [
        (f"alpine:3.20@{DIGEST}", ImageRef("docker.io", "library/alpine", DIGEST, "3.20")),
        (
            f"ghcr.io/org/app:v1.2@{DIGEST}",
            ImageRef("ghcr.io", "org/app", DIGEST, "v1.2"),
        ),
        (
            f"127.0.0.1:5000/e2e/app:v1@{DIGEST}",
            ImageRef("127.0.0.1:5000", "e2e/app", DIGEST, "v1"),
        ),
        (f"127.0.0.1:5000/e2e/app@{DIGEST}", ImageRef("127.0.0.1:5000", "e2e/app", DIGEST)),
    ],
)
def test_pinned_references_pull_the_digest_and_keep_the_tag(image: str, ref: ImageRef) -> None:
    """Renovate pins name:tag@digest: the digest is what is pulled, the tag only shown."""
    parsed = parse_image(image)
    assert parsed == ref
    assert parsed.reference == DIGEST


def test_a_plain_tag_has_no_separate_display_tag() -> None:
    assert parse_image("alpine:3").tag is None


@pytest.mark.parametrize(
    "image",
    [
        "",
        "UPPER/case",
        "app@sha256:short",
        "a/b:bad tag",
        "a:b:c",
        f"app:bad tag@{DIGEST}",
        f"app:-x@{DIGEST}",
        "app:v1@sha256:short",
        f"app:v1@{DIGEST}@{DIGEST}",
    ],
)
def test_bad_references(image: str) -> None:
    with pytest.raises(ValueError):
        parse_image(image)


def test_platforms() -> None:
    amd64 = {"os": "linux", "architecture": "amd64"}
    arm = {"os": "linux", "architecture": "arm", "variant": "v7"}
    assert platform_matches(amd64, None) and platform_matches(amd64, "linux/amd64")
    assert not platform_matches(amd64, "linux/arm64")
    assert platform_matches(arm, "linux/arm") and platform_matches(arm, "linux/arm/v7")
    assert not platform_matches(arm, "linux/arm/v6")
    assert not platform_matches({"os": "unknown", "architecture": "unknown"}, None)
