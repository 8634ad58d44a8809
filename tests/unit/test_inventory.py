"""What `ls` reads from the store, for both backends (app/inventory.py, app/commands/ls.py)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moto import mock_aws

from app.commands import ls
from app.inventory import Inventory, committed
from app.storage import ObjectMeta, Storage, keys, put
from app.storage.fs import FilesystemStorage
from app.storage.s3 import S3Storage
from app.storage.s3bucket import make_client

REG, NAME = "registry.test:5000", "org/app"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _put(storage: Storage, key: str, data: bytes, media_type: str, digest: str) -> None:
    put(storage, key, [data], ObjectMeta(digest, len(data), media_type))


def _fill(storage: Storage) -> dict[str, Any]:
    """A two-platform image tagged v1 and an untagged digest in another repository."""
    blobs = {name: name.encode() * 100 for name in ("cfg-a", "lay-a", "cfg-b", "lay-shared")}
    for data in blobs.values():
        _put(storage, keys.blob(_digest(data)), data, "application/octet-stream", _digest(data))
    children = []
    for cfg, layer in (("cfg-a", "lay-a"), ("cfg-b", "lay-shared")):
        doc = json.dumps(
            {
                "mediaType": MANIFEST_TYPE,
                "config": {"digest": _digest(blobs[cfg]), "size": 500},
                "layers": [{"digest": _digest(blobs[layer]), "size": 500}],
            }
        ).encode()
        _put(storage, keys.manifest(REG, NAME, _digest(doc)), doc, MANIFEST_TYPE, _digest(doc))
        children.append(doc)
    index = json.dumps(
        {"mediaType": INDEX_TYPE, "manifests": [{"digest": _digest(c)} for c in children]}
    ).encode()
    for reference in ("v1", _digest(index)):
        _put(storage, keys.manifest(REG, NAME, reference), index, INDEX_TYPE, _digest(index))
    lone = json.dumps(
        {"mediaType": MANIFEST_TYPE, "layers": [{"digest": _digest(blobs["lay-shared"])}]}
    )
    _put(
        storage,
        keys.manifest(REG, "other", _digest(lone.encode())),
        lone.encode(),
        MANIFEST_TYPE,
        _digest(lone.encode()),
    )
    size = len(index) + sum(len(c) for c in children) + sum(len(b) for b in blobs.values())
    return {
        "index": _digest(index),
        "size": size,
        "blobs": {_digest(b) for b in blobs.values()},
        "lone": _digest(lone.encode()),
        "lone_size": len(lone) + len(blobs["lay-shared"]),
    }


@pytest.fixture(params=["fs", "s3"])
def storage(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Storage]:
    if request.param == "fs":
        yield FilesystemStorage(str(tmp_path / "cache"))
        return
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        client = make_client()
        client.create_bucket(Bucket="inventory")
        client.put_object(
            Bucket="inventory", Key="another-instance/blobs/sha256/" + "0" * 64, Body=b"not ours"
        )
        yield S3Storage(client, "inventory", "cache/one")


def test_repositories_tags_and_sizes(storage: Storage) -> None:
    expected = _fill(storage)
    inventory = Inventory(storage)
    repos = {f"{r.registry}/{r.name}": r for r in inventory.repositories()}
    assert sorted(repos) == [f"{REG}/org/app", f"{REG}/other"]
    app = repos[f"{REG}/org/app"]
    assert [(t.tag, t.digest) for t in app.tags] == [("v1", expected["index"])]
    assert app.tags[0].blobs == expected["blobs"] and len(app.tags[0].manifests) == 3
    assert app.tags[0].size == app.size == expected["size"]
    other = repos[f"{REG}/other"]
    assert [(t.tag, t.digest, t.size) for t in other.tags] == [
        (None, expected["lone"], expected["lone_size"])
    ]
    assert set(inventory.blob_sizes()) == expected["blobs"], "other prefixes are not ours"


def test_uncommitted_objects_are_not_listed(storage: Storage) -> None:
    writer = storage.writer(keys.blob("sha256:" + "1" * 64))
    writer.write(b"half")
    assert committed(storage, "blobs/") == []
    writer.abort()


def test_ls_command_prints_a_table_and_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = _fill(FilesystemStorage(str(tmp_path / "cache")))
    for name, value in {
        "PROXY_MODE": "transparent",
        "STORAGE_BACKEND": "fs",
        "FS_ROOT": str(tmp_path / "cache"),
    }.items():
        monkeypatch.setenv(name, value)
    parser_args = type("Args", (), {"json": False})()
    assert ls.run(parser_args) == 0  # type: ignore[arg-type]
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["REPOSITORY", "TAG", "DIGEST", "SIZE", "STORED"]
    assert table[1].split()[:3] == [f"{REG}/org/app", "v1", expected["index"][:19]]
    assert table[-1].startswith("2 repositories, 2 tags, 4 blobs")
    parser_args.json = True  # type: ignore[attr-defined]
    assert ls.run(parser_args) == 0  # type: ignore[arg-type]
    doc = json.loads(capsys.readouterr().out)
    assert doc["repositories"][0]["tags"][0]["digest"] == expected["index"]
    assert doc["blobs"]["count"] == 4


def test_a_tags_data_objects_are_not_keys(tmp_path: Path) -> None:
    """SPEC §15: tag data lives under digest-named objects; Storage.list and committed skip them."""
    storage = FilesystemStorage(str(tmp_path / "cache"))
    key = keys.manifest("registry.test", "org/app", "v1")
    for data in (b"one", b"two"):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        put(storage, key, [data], ObjectMeta(digest, len(data), "application/json"))
    assert sorted(storage.list("manifests/")) == [key]
    assert committed(storage, "manifests/") == [key]
