"""The app in-process with upstream mocked (responses): constants, make_app and helpers.

The fixtures built on them (mock, client, auth_client) are in tests/conftest.py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import responses
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from app.config import TRANSPARENT, Config

REG = "registry.test"
UP = f"https://{REG}"
NAME = "org/app"

BLOB = b"layer bytes " * 1000
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
BLOB_PATH = f"/v2/{NAME}/blobs/{BLOB_DIGEST}"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EVERY_MANIFEST_TYPE = (
    f"{OCI_INDEX}, {OCI_MANIFEST}, application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": BLOB_DIGEST},
        "layers": [],
    }
).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
API_VERSION = "registry/2.0"
IMMUTABLE = "public, max-age=31536000, immutable"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    data: bytes


def make_app(tmp_path: Path, mode: str = TRANSPARENT, **kwargs: object) -> Flask:
    settings: dict[str, object] = {
        "storage_backend": "fs",
        "fs_root": str(tmp_path / "cache"),
        "upstream_registry": REG,
        # These tests count upstream calls per request; prefetch (background blob GETs after a
        # manifest GET) has its own tests below and in tests/unit/test_prefetcher.py.
        "prefetch_concurrency": 0,
        **kwargs,
    }
    config = Config(proxy_mode=mode, **settings)  # type: ignore[arg-type]
    return create_app(config)


def fetch(client: FlaskClient, path: str, method: str = "GET", **kwargs: object) -> Answer:
    """One request, body fully read and the response closed (as a server would)."""
    response = client.open(path, method=method, **kwargs)  # type: ignore[arg-type]
    try:
        return Answer(response.status_code, dict(response.headers), response.get_data())
    finally:
        response.close()


def upstream_blob(mock: responses.RequestsMock, body: bytes = BLOB, **headers: str) -> None:
    mock.get(
        f"{UP}{BLOB_PATH}",
        body=body,
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(body)),
            "Docker-Content-Digest": BLOB_DIGEST,
            "ETag": f'"{BLOB_DIGEST}"',
            **headers,
        },
    )


def manifest_headers(**extra: str) -> dict[str, str]:
    return {
        "Content-Type": OCI_MANIFEST,
        "Content-Length": str(len(MANIFEST)),
        "Docker-Content-Digest": MANIFEST_DIGEST,
        **extra,
    }


def upstream_manifest(mock: responses.RequestsMock, reference: str = "v1", **extra: str) -> None:
    mock.get(
        f"{UP}/v2/{NAME}/manifests/{reference}", body=MANIFEST, headers=manifest_headers(**extra)
    )


def error_code(answer: Answer) -> str:
    assert answer.headers["Content-Type"].startswith("application/json")
    return json.loads(answer.data)["errors"][0]["code"]
