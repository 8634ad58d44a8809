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


TAG = keys.manifest("[::1]:5000", "a/b/c", "v1.meta.json")
BY_DIGEST = keys.manifest("registry.test", "org/app", DIGEST)


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (keys.blob(DIGEST), keys.Parsed(keys.blob(DIGEST), "blob", "key", digest=DIGEST)),
        (
            keys.sidecar(keys.blob(DIGEST)),
            keys.Parsed(keys.blob(DIGEST), "blob", "sidecar", digest=DIGEST),
        ),
        (
            BY_DIGEST,
            keys.Parsed(BY_DIGEST, "manifest", "key", "registry.test", "org/app", digest=DIGEST),
        ),
        (TAG, keys.Parsed(TAG, "manifest", "key", "[::1]:5000", "a/b/c", tag="v1.meta.json")),
        (
            keys.sidecar(TAG),
            keys.Parsed(TAG, "manifest", "sidecar", "[::1]:5000", "a/b/c", tag="v1.meta.json"),
        ),
        (
            keys.data(TAG, DIGEST),
            keys.Parsed(TAG, "manifest", "data", "[::1]:5000", "a/b/c", "v1.meta.json", DIGEST),
        ),
        (
            keys.upload(TAG, "0123abcd"),
            keys.Parsed(TAG, "manifest", "upload", "[::1]:5000", "a/b/c", tag="v1.meta.json"),
        ),
    ],
)
def test_parse_reads_back_every_name_of_the_layout(stored: str, expected: keys.Parsed) -> None:
    assert keys.parse(stored) == expected


@pytest.mark.parametrize("tag", ["manifest", "_digests", "_tags", "v1.upload-ab", "x.sha256-ab"])
def test_parse_of_tags_that_look_like_layout_words(tag: str) -> None:
    key = keys.manifest("r.test", "org/app", tag)
    parsed = keys.parse(key)
    assert parsed is not None and (parsed.part, parsed.tag, parsed.name) == ("key", tag, "org/app")
    assert parsed.reference == tag
    sidecar = keys.parse(keys.sidecar(key))
    assert sidecar is not None and (sidecar.part, sidecar.key) == ("sidecar", key)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "blobs/sha256/" + "ab" * 31,  # not a digest
        "blobs/spool/big.meta.json",
        "blobs/sha256/.tmp-abc",
        "manifests/r.test/org/app/_tags/v1/manifest/extra",
        "manifests/r.test/_org/_tags/v1/manifest",  # no name component starts with "_"
        "manifests/r.test/_tags/v1/manifest",  # no name at all
        "manifests/r.test/org/app/_digests/sha256/" + "ab" * 32 + ".sha256-" + "ab" * 32,
        "other/blobs/sha256/" + "ab" * 32,
    ],
)
def test_parse_of_names_outside_the_layout_is_none(stored: str) -> None:
    assert keys.parse(stored) is None


def test_a_digest_manifests_reference_is_its_digest() -> None:
    parsed = keys.parse(BY_DIGEST)
    assert parsed is not None and parsed.reference == DIGEST and parsed.tag is None
