"""app/storage/keys.py: the key layout of SPEC §8."""

from __future__ import annotations

import pytest

from app.storage import keys

DIGEST = "sha256:" + "ab" * 32


def test_blob_keys_are_by_digest_only() -> None:
    assert keys.blob(DIGEST) == f"blobs/sha256/{'ab' * 32}"
    assert keys.blob("sha512:" + "cd" * 64) == f"blobs/sha512/{'cd' * 64}"


def test_manifest_keys_are_under_registry_and_repository() -> None:
    by_tag = keys.manifest("ghcr.io", "org/app", "v1")
    by_digest = keys.manifest("ghcr.io", "org/app", DIGEST)
    assert by_tag.startswith("manifests/ghcr.io/org/app/")
    assert by_digest.startswith("manifests/ghcr.io/org/app/")
    assert by_tag != by_digest
    assert keys.manifest("quay.io", "org/app", "v1") != by_tag
    assert keys.manifest("ghcr.io", "org/other", "v1") != by_tag


def test_sidecar_suffix() -> None:
    assert keys.sidecar(keys.blob(DIGEST)) == f"blobs/sha256/{'ab' * 32}.meta.json"


@pytest.mark.parametrize("value", ["sha256:../../x", "v1", "sha256:" + "AB" * 32, ""])
def test_blob_key_needs_a_digest(value: str) -> None:
    with pytest.raises(ValueError):
        keys.blob(value)


def test_no_tag_key_is_another_keys_sidecar() -> None:
    tag_key = keys.manifest("r.test", "a", "v1")
    other = keys.manifest("r.test", "a", "v1.meta.json")
    assert other != keys.sidecar(tag_key)
    assert keys.sidecar(tag_key) not in {other, keys.manifest("r.test", "a", "manifest.meta.json")}
