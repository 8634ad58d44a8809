"""Air-gap slices (issue 14, item 6): export from a store, import into another, verified."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from app.cli import main
from app.sliceimport import import_archive
from app.slices import REF_NAME, REPOSITORY, SliceError, plan_export, write_archive
from app.storage import NotFound, ObjectMeta, keys, put
from app.storage.fs import FilesystemStorage

REG, NAME = "registry.test:5000", "org/app"
INDEX = "application/vnd.oci.image.index.v1+json"
IMAGE = "application/vnd.oci.image.manifest.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _d(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _desc(data: bytes, media_type: str, **extra: object) -> dict[str, object]:
    return {"mediaType": media_type, "digest": _d(data), "size": len(data), **extra}


def _cache(storage: FilesystemStorage) -> dict[str, bytes]:
    """A two-platform image cached under REG/NAME:v1, as the proxy stores it."""
    objects: dict[str, bytes] = {}
    children = []
    for arch in ("amd64", "arm64"):
        config = json.dumps({"architecture": arch, "os": "linux"}).encode()
        layer = f"layer of {arch}".encode() * 100
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": IMAGE,
                "config": _desc(config, "application/vnd.oci.image.config.v1+json"),
                "layers": [_desc(layer, LAYER)],
            }
        ).encode()
        for blob, kind in ((config, "application/vnd.oci.image.config.v1+json"), (layer, LAYER)):
            put(storage, keys.blob(_d(blob)), [blob], ObjectMeta(_d(blob), len(blob), kind))
            objects[_d(blob)] = blob
        key = keys.manifest(REG, NAME, _d(manifest))
        put(storage, key, [manifest], ObjectMeta(_d(manifest), len(manifest), IMAGE))
        objects[_d(manifest)] = manifest
        children.append(_desc(manifest, IMAGE, platform={"os": "linux", "architecture": arch}))
    index = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": children}).encode()
    for reference in ("v1", _d(index)):
        key = keys.manifest(REG, NAME, reference)
        put(storage, key, [index], ObjectMeta(_d(index), len(index), INDEX))
    objects[_d(index)] = index
    return objects


def _export(tmp_path: Path, platform: str | None = None) -> tuple[Path, dict[str, bytes]]:
    storage = FilesystemStorage(str(tmp_path / "source"))
    objects = _cache(storage)
    plan = plan_export(storage, [f"{REG}/{NAME}:v1"], platform)
    assert plan.missing == []
    out = tmp_path / "slice.tar"
    write_archive(storage, plan, str(out))
    return out, objects


def test_export_writes_an_oci_layout_with_ref_names(tmp_path: Path) -> None:
    out, objects = _export(tmp_path)
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        layout = json.loads(tar.extractfile("oci-layout").read())  # type: ignore[union-attr]
        for digest, data in objects.items():
            member = tar.extractfile("blobs/sha256/" + digest.split(":")[1])
            assert member is not None and member.read() == data
    assert layout == {"imageLayoutVersion": "1.0.0"}
    assert names == {"oci-layout", "index.json"} | {
        "blobs/sha256/" + d.split(":")[1] for d in objects
    }
    [entry] = index["manifests"]
    assert entry["annotations"] == {REF_NAME: f"{REG}/{NAME}:v1", REPOSITORY: f"{REG}/{NAME}"}
    assert entry["mediaType"] == INDEX
    assert not list(tmp_path.glob("*.partial"))


def test_export_names_everything_not_cached(tmp_path: Path) -> None:
    storage = FilesystemStorage(str(tmp_path / "source"))
    objects = _cache(storage)
    layer = next(d for d, b in objects.items() if b.startswith(b"layer of arm64"))
    storage.delete(keys.blob(layer))
    plan = plan_export(storage, [f"{REG}/{NAME}:v1", f"{REG}/{NAME}:v2"], None)
    assert plan.missing == [f"{REG}/{NAME}:v1 blob {layer}", f"{REG}/{NAME}:v2"]
    assert plan_export(storage, [f"{REG}/{NAME}:v1"], "linux/amd64").missing == []


def test_export_of_one_platform_keeps_the_index_and_that_platform_only(tmp_path: Path) -> None:
    out, objects = _export(tmp_path, "linux/amd64")
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
    arm = [d for d, b in objects.items() if b"arm64" in b and b"manifests" not in b]
    assert arm and not any("blobs/sha256/" + d.split(":")[1] in names for d in arm)
    target = FilesystemStorage(str(tmp_path / "target"))
    done = import_archive(target, str(out))
    assert done.tags == [f"{REG}/{NAME}:v1"], "the tag names the full index, as upstream does"
    with pytest.raises(SliceError, match="no platform"):
        plan_export(target, [f"{REG}/{NAME}:v1"], "windows/amd64")


def test_import_stores_blobs_manifests_and_tags_verified(tmp_path: Path) -> None:
    out, objects = _export(tmp_path)
    target = FilesystemStorage(str(tmp_path / "target"))
    done = import_archive(target, str(out))
    assert (done.blobs, done.manifests, done.tags) == (4, 3, [f"{REG}/{NAME}:v1"])
    tag = target.stat(keys.manifest(REG, NAME, "v1"))
    with target.open(keys.manifest(REG, NAME, "v1"), tag) as fh:
        assert _d(fh.read()) == tag.digest
    for digest, data in objects.items():
        key = keys.blob(digest) if tag.digest != digest and b"layers" not in data else None
        key = key or keys.manifest(REG, NAME, digest)
        meta = target.stat(key)
        with target.open(key, meta) as fh:
            assert fh.read() == data
    again = import_archive(target, str(out))
    assert again.blobs == 0, "blobs already there are not written twice"


def test_import_under_another_repository(tmp_path: Path) -> None:
    out, _ = _export(tmp_path)
    target = FilesystemStorage(str(tmp_path / "target"))
    done = import_archive(target, str(out), "mirror.local/team/app")
    assert done.tags == ["mirror.local/team/app:v1"]
    with pytest.raises(SliceError, match="without tag"):
        import_archive(target, str(out), "mirror.local/team/app:v2")


def test_a_corrupted_slice_is_refused_and_nothing_becomes_visible(tmp_path: Path) -> None:
    out, objects = _export(tmp_path)
    layer = next(d for d, b in objects.items() if b.startswith(b"layer of arm64"))
    raw = bytearray(out.read_bytes())
    at = raw.find(objects[layer])
    raw[at + 10] ^= 0x01  # one flipped bit in one layer
    out.write_bytes(bytes(raw))
    target = FilesystemStorage(str(tmp_path / "target"))
    with pytest.raises(SliceError, match="does not match its digest"):
        import_archive(target, str(out))
    assert list(target.list()) == [], "not one object of it"
    with pytest.raises(NotFound):
        target.stat(keys.manifest(REG, NAME, "v1"))


def test_the_commands_read_the_configured_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _cache(FilesystemStorage(str(tmp_path / "source")))
    monkeypatch.setenv("PROXY_MODE", "transparent")
    monkeypatch.setenv("STORAGE_BACKEND", "fs")
    monkeypatch.setenv("FS_ROOT", str(tmp_path / "source"))
    out = tmp_path / "slice.tar"
    assert main(["export", f"{REG}/{NAME}:v1", "-o", str(out)]) == 0
    assert main(["export", f"{REG}/{NAME}:nope", "-o", str(tmp_path / "x.tar")]) == 1
    assert f"not cached: {REG}/{NAME}:nope" in capsys.readouterr().err
    assert not (tmp_path / "x.tar").exists()
    monkeypatch.setenv("FS_ROOT", str(tmp_path / "target"))
    assert main(["import", str(out)]) == 0
    assert f"tags: {REG}/{NAME}:v1" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "missing.tar")]) == 1
