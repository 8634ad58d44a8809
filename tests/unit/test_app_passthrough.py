"""tags/list and referrers, authenticated mode, request log lines and prefetch wiring."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import gevent
import pytest
import requests
import responses
from flask.testing import FlaskClient

from tests.appclient import (
    API_VERSION,
    BLOB,
    BLOB_DIGEST,
    BLOB_PATH,
    IMMUTABLE,
    MANIFEST,
    MANIFEST_DIGEST,
    NAME,
    OCI_MANIFEST,
    REG,
    UP,
    fetch,
    make_app,
    manifest_headers,
    upstream_blob,
    upstream_manifest,
)

# -- pass-through endpoints ------------------------------------------------------------------------


def test_tags_list_is_passed_through_with_paging(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    mock.get(f"{UP}/v2/{NAME}/tags/list", json={"name": NAME, "tags": ["v1"]})
    for _ in range(2):
        answer = fetch(client, f"/v2/{NAME}/tags/list?n=10&last=v0&evil=1")
        assert json.loads(answer.data)["tags"] == ["v1"]
    assert len(mock.calls) == 2
    query = mock.calls[0].request.url.split("?", 1)[1]
    assert sorted(query.split("&")) == ["last=v0", "n=10"]


def test_tags_list_link_header_uses_the_client_side_name(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    mock.get(
        f"{UP}/v2/{NAME}/tags/list",
        json={"name": NAME, "tags": ["v1"]},
        headers={"Link": f'</v2/{NAME}/tags/list?last=v1&n=1>; rel="next"'},
    )
    answer = fetch(client, f"/v2/{REG}/{NAME}/tags/list?n=1")
    assert answer.headers["Link"] == f'</v2/{REG}/{NAME}/tags/list?last=v1&n=1>; rel="next"'


def test_referrers_are_passed_through(client: FlaskClient, mock: responses.RequestsMock) -> None:
    mock.get(f"{UP}/v2/{NAME}/referrers/{MANIFEST_DIGEST}", json={"manifests": []})
    for _ in range(2):
        answer = fetch(client, f"/v2/{NAME}/referrers/{MANIFEST_DIGEST}")
        assert answer.status == 200
        assert answer.headers["Docker-Distribution-API-Version"] == API_VERSION
    assert len(mock.calls) == 2


# -- authenticated mode ----------------------------------------------------------------------------


def test_authenticated_head_is_always_forwarded(
    auth_client: FlaskClient, mock: responses.RequestsMock
) -> None:
    upstream_blob(mock)
    mock.head(f"{UP}{BLOB_PATH}", status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
    fetch(auth_client, BLOB_PATH, headers={"Authorization": "Basic dTpw"})  # fills the cache
    answer = fetch(auth_client, BLOB_PATH, "HEAD", headers={"Authorization": "Basic dTpw"})
    assert answer.status == 401
    assert mock.calls[-1].request.method == "HEAD"
    assert mock.calls[-1].request.headers["Authorization"] == "Basic dTpw"


def test_authenticated_get_hit_checks_upstream_then_serves_cache(
    auth_client: FlaskClient, mock: responses.RequestsMock
) -> None:
    upstream_blob(mock)
    mock.head(f"{UP}{BLOB_PATH}", status=200, headers={"Content-Length": str(len(BLOB))})
    fetch(auth_client, BLOB_PATH, headers={"Authorization": "Basic dTpw"})
    answer = fetch(auth_client, BLOB_PATH, headers={"Authorization": "Basic dTpw"})
    assert (answer.status, answer.data) == (200, BLOB)
    assert answer.headers["Cache-Control"] == IMMUTABLE
    assert [c.request.method for c in mock.calls] == ["GET", "HEAD"]
    assert mock.calls[1].request.headers["Authorization"] == "Basic dTpw"


@pytest.mark.parametrize("status", [401, 403, 404])
def test_authenticated_get_hit_rejected_upstream_is_not_served(
    auth_client: FlaskClient, mock: responses.RequestsMock, status: int
) -> None:
    upstream_blob(mock)
    fetch(auth_client, BLOB_PATH, headers={"Authorization": "Basic dTpw"})
    mock.replace("GET", f"{UP}{BLOB_PATH}", status=status, json={"errors": [{"code": "DENIED"}]})
    mock.head(f"{UP}{BLOB_PATH}", status=status)
    answer = fetch(auth_client, BLOB_PATH, headers={"Authorization": "Basic revoked"})
    assert answer.status == status
    assert BLOB not in answer.data


def test_authenticated_manifest_hit_with_revoked_credentials(
    auth_client: FlaskClient, mock: responses.RequestsMock
) -> None:
    upstream_manifest(mock, MANIFEST_DIGEST)
    path = f"/v2/{NAME}/manifests/{MANIFEST_DIGEST}"
    fetch(auth_client, path, headers={"Authorization": "Basic dTpw"})
    mock.head(f"{UP}{path}", status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
    mock.replace("GET", f"{UP}{path}", status=401, json={"errors": [{"code": "UNAUTHORIZED"}]})
    answer = fetch(auth_client, path, headers={"Authorization": "Basic revoked"})
    assert answer.status == 401
    assert answer.data != MANIFEST


def test_authenticated_get_hit_with_upstream_down_is_502(
    auth_client: FlaskClient, mock: responses.RequestsMock
) -> None:
    upstream_blob(mock)
    fetch(auth_client, BLOB_PATH)
    mock.head(f"{UP}{BLOB_PATH}", body=requests.ConnectionError("down"))
    answer = fetch(auth_client, BLOB_PATH)
    assert answer.status == 502
    assert BLOB not in answer.data


def test_authenticated_tag_hit_that_moved_upstream_is_refetched(
    auth_client: FlaskClient, mock: responses.RequestsMock
) -> None:
    upstream_manifest(mock)
    fetch(auth_client, f"/v2/{NAME}/manifests/v1")
    moved = MANIFEST.replace(b"schemaVersion", b"schemaVersion ")
    moved_digest = "sha256:" + hashlib.sha256(moved).hexdigest()
    moved_headers = {
        "Content-Type": OCI_MANIFEST,
        "Content-Length": str(len(moved)),
        "Docker-Content-Digest": moved_digest,
    }
    mock.head(f"{UP}/v2/{NAME}/manifests/v1", headers=moved_headers)
    mock.replace("GET", f"{UP}/v2/{NAME}/manifests/v1", body=moved, headers=moved_headers)
    answer = fetch(auth_client, f"/v2/{NAME}/manifests/v1")
    assert answer.data == moved
    assert answer.headers["Docker-Content-Digest"] == moved_digest


def test_authenticated_tag_hit_unchanged_upstream_is_served_from_cache(
    auth_client: FlaskClient, mock: responses.RequestsMock
) -> None:
    upstream_manifest(mock)
    mock.head(f"{UP}/v2/{NAME}/manifests/v1", headers=manifest_headers())
    fetch(auth_client, f"/v2/{NAME}/manifests/v1")
    answer = fetch(auth_client, f"/v2/{NAME}/manifests/v1")
    assert answer.data == MANIFEST
    assert answer.headers["Cache-Control"] == "public, max-age=2419200"
    assert [c.request.method for c in mock.calls] == ["GET", "HEAD"]


# -- logging ---------------------------------------------------------------------------------------


def test_authorization_is_never_logged(
    client: FlaskClient, mock: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream_blob(mock)
    secret = "Bearer s3cr3t-t0k3n-value"
    fetch(client, BLOB_PATH, headers={"Authorization": secret})
    fetch(client, BLOB_PATH, headers={"Authorization": secret})
    mock.get(f"{UP}/v2/{NAME}/manifests/v1", status=401, json={"errors": []})
    fetch(client, f"/v2/{NAME}/manifests/v1", headers={"Authorization": secret})
    assert caplog.records  # the request lines were logged
    assert "s3cr3t" not in caplog.text


# -- prefetch wiring ------------------------------------------------------------------------------


def test_manifest_get_prefetches_its_config_and_head_does_not(
    tmp_path: Path, mock: responses.RequestsMock
) -> None:

    client = make_app(tmp_path, prefetch_concurrency=2).test_client()
    upstream_manifest(mock, MANIFEST_DIGEST)
    upstream_blob(mock)
    mock.head(f"{UP}/v2/{NAME}/manifests/{MANIFEST_DIGEST}", headers=manifest_headers())
    assert fetch(client, f"/v2/{NAME}/manifests/{MANIFEST_DIGEST}", "HEAD").status == 200
    gevent.sleep(0.1)
    assert [c.request.url for c in mock.calls if "/blobs/" in c.request.url] == []
    assert fetch(client, f"/v2/{NAME}/manifests/{MANIFEST_DIGEST}").status == 200
    for _ in range(50):
        gevent.sleep(0.02)
        if (tmp_path / "cache" / "blobs" / "sha256" / BLOB_DIGEST[7:]).exists():
            break
    blob_gets = [c.request.url for c in mock.calls if "/blobs/" in c.request.url]
    assert blob_gets == [f"{UP}{BLOB_PATH}"], "the config was prefetched"
    answer = fetch(client, BLOB_PATH)
    assert (answer.status, answer.data) == (200, BLOB)
    assert len([c for c in mock.calls if "/blobs/" in c.request.url]) == 1, "a hit"
