"""Blobs in-process: miss then hit, ranges, verification, headers, addressing forms."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import gevent
import requests
import responses
from flask.testing import FlaskClient

from tests.appclient import (
    API_VERSION,
    BLOB,
    BLOB_DIGEST,
    BLOB_PATH,
    IMMUTABLE,
    NAME,
    REG,
    UP,
    error_code,
    fetch,
    make_app,
    upstream_blob,
)

# -- blobs -----------------------------------------------------------------------------------------


def test_blob_miss_then_hit(client: FlaskClient, mock: responses.RequestsMock) -> None:
    upstream_blob(mock, **{"Set-Cookie": "session=secret", "X-Upstream": "yes"})
    first = fetch(client, BLOB_PATH)
    assert first.status == 200
    assert first.data == BLOB
    assert first.headers["Docker-Distribution-API-Version"] == API_VERSION
    assert len(mock.calls) == 1

    second = fetch(client, BLOB_PATH)
    assert len(mock.calls) == 1  # served from cache
    assert second.status == 200
    assert second.data == BLOB
    assert second.headers["Content-Length"] == str(len(BLOB))
    assert second.headers["Docker-Content-Digest"] == BLOB_DIGEST
    assert second.headers["ETag"] == f'"{BLOB_DIGEST}"'
    assert second.headers["Content-Type"] == "application/octet-stream"
    assert "X-Upstream" not in second.headers  # §15: the registry's own headers only
    assert second.headers["Cache-Control"] == IMMUTABLE
    assert second.headers["Docker-Distribution-API-Version"] == API_VERSION
    assert "Set-Cookie" not in second.headers


def test_all_addressing_forms_share_the_cached_blob(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    upstream_blob(mock)
    fetch(client, BLOB_PATH)
    for path in (
        f"/v2/{REG}/{NAME}/blobs/{BLOB_DIGEST}",
        f"/v2/{NAME}/blobs/{BLOB_DIGEST}?ns={REG}",
        f"/v2/other/repo/blobs/{BLOB_DIGEST}",  # blobs are shared across repositories
    ):
        answer = fetch(client, path)
        assert (answer.status, answer.data) == (200, BLOB), path
    assert len(mock.calls) == 1


def test_blob_head_hit(client: FlaskClient, mock: responses.RequestsMock) -> None:
    upstream_blob(mock)
    fetch(client, BLOB_PATH)
    answer = fetch(client, BLOB_PATH, "HEAD")
    assert answer.status == 200
    assert answer.headers["Content-Length"] == str(len(BLOB))
    assert answer.headers["Docker-Content-Digest"] == BLOB_DIGEST
    assert answer.data == b""
    assert len(mock.calls) == 1


def test_transparent_hit_ignores_authorization(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    upstream_blob(mock)
    fetch(client, BLOB_PATH)
    answer = fetch(client, BLOB_PATH, headers={"Authorization": "Bearer whatever"})
    assert (answer.status, answer.data) == (200, BLOB)
    assert len(mock.calls) == 1


def test_range_on_a_hit(client: FlaskClient, mock: responses.RequestsMock) -> None:
    upstream_blob(mock)
    fetch(client, BLOB_PATH)
    answer = fetch(client, BLOB_PATH, headers={"Range": "bytes=10-19"})
    assert answer.status == 206
    assert answer.data == BLOB[10:20]
    assert answer.headers["Content-Range"] == f"bytes 10-19/{len(BLOB)}"
    assert answer.headers["Content-Length"] == "10"
    suffix = fetch(client, BLOB_PATH, headers={"Range": "bytes=-5"})
    assert (suffix.status, suffix.data) == (206, BLOB[-5:])
    assert len(mock.calls) == 1


def test_unsatisfiable_range_on_a_hit(client: FlaskClient, mock: responses.RequestsMock) -> None:
    upstream_blob(mock)
    fetch(client, BLOB_PATH)
    answer = fetch(client, BLOB_PATH, headers={"Range": f"bytes={len(BLOB) + 10}-{len(BLOB) + 20}"})
    assert answer.status == 416
    assert answer.headers["Content-Range"] == f"bytes */{len(BLOB)}"
    assert len(mock.calls) == 1


def test_open_ended_range_past_the_end_is_416(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    """A client resuming a download it already has in full asks for bytes=SIZE-."""
    upstream_blob(mock)
    fetch(client, BLOB_PATH)
    answer = fetch(client, BLOB_PATH, headers={"Range": f"bytes={len(BLOB)}-"})
    assert answer.status == 416
    assert answer.headers["Content-Range"] == f"bytes */{len(BLOB)}"


def test_blob_head_miss_is_forwarded_and_not_cached(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    mock.head(
        f"{UP}{BLOB_PATH}",
        headers={"Content-Length": str(len(BLOB)), "Docker-Content-Digest": BLOB_DIGEST},
    )
    upstream_blob(mock)
    head = fetch(client, BLOB_PATH, "HEAD")
    assert head.status == 200
    assert head.data == b""
    assert head.headers["Docker-Content-Digest"] == BLOB_DIGEST
    assert fetch(client, BLOB_PATH).data == BLOB
    assert [c.request.method for c in mock.calls] == ["HEAD", "GET"]


def test_blob_redirect_to_cdn_is_followed_and_cached(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    mock.get(f"{UP}{BLOB_PATH}", status=307, headers={"Location": "https://cdn.test/layer?sig=abc"})
    mock.get("https://cdn.test/layer", body=BLOB, headers={"Content-Length": str(len(BLOB))})
    first = fetch(client, BLOB_PATH, headers={"Authorization": "Bearer registry-token"})
    assert (first.status, first.data) == (200, BLOB)
    assert "Authorization" not in mock.calls[1].request.headers  # never sent to the CDN
    second = fetch(client, BLOB_PATH)
    assert (second.status, second.data) == (200, BLOB)
    assert len(mock.calls) == 2


def test_range_on_a_miss_is_forwarded_and_not_cached(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    mock.get(
        f"{UP}{BLOB_PATH}",
        status=206,
        body=BLOB[:10],
        headers={"Content-Range": f"bytes 0-9/{len(BLOB)}", "Content-Length": "10"},
    )
    answer = fetch(client, BLOB_PATH, headers={"Range": "bytes=0-9"})
    assert (answer.status, answer.data) == (206, BLOB[:10])
    assert mock.calls[0].request.headers["Range"] == "bytes=0-9"
    fetch(client, BLOB_PATH, headers={"Range": "bytes=0-9"})
    assert len(mock.calls) == 2


def test_blob_with_wrong_digest_is_forwarded_but_not_cached(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    tampered = b"not the layer " * 100
    upstream_blob(mock, body=tampered)
    first = fetch(client, BLOB_PATH)
    assert (first.status, first.data) == (200, tampered)
    second = fetch(client, BLOB_PATH)
    assert second.data == tampered
    assert len(mock.calls) == 2  # nothing was committed, so the second request went upstream


def test_truncated_blob_is_not_cached(client: FlaskClient, mock: responses.RequestsMock) -> None:
    mock.get(
        f"{UP}{BLOB_PATH}",
        body=BLOB[:100],
        headers={"Content-Length": str(len(BLOB)), "Content-Type": "application/octet-stream"},
    )
    # The short body surfaces as an error mid-stream (the client sees a broken transfer).
    with contextlib.suppress(Exception):
        fetch(client, BLOB_PATH)
    mock.replace("GET", f"{UP}{BLOB_PATH}", body=BLOB, headers={"Content-Length": str(len(BLOB))})
    assert fetch(client, BLOB_PATH).data == BLOB
    assert len(mock.calls) == 2


def test_client_leaving_after_the_body_arrived_still_commits_once(
    client: FlaskClient, mock: responses.RequestsMock, tmp_path: Path
) -> None:
    """The fetch outlives its client (app/flight.py): a complete, verified body is committed.

    Abandoning a fetch nobody reads any more needs a slow upstream; that is
    tests/e2e/test_faults.py::test_client_disconnect_mid_download_leaves_no_partial_object.
    """
    upstream_blob(mock)
    response = client.get(BLOB_PATH, buffered=False)
    first = next(iter(response.response))
    assert first and BLOB.startswith(first)
    response.close()  # the client went away before the stream ended
    gevent.sleep(0.1)
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert [f for f in files if f.startswith(".tmp-")] == []
    assert fetch(client, BLOB_PATH).data == BLOB
    assert len(mock.calls) == 1, "the committed blob is a hit"


def test_upstream_404_is_forwarded_and_not_cached(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    body = {"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown"}]}
    mock.get(f"{UP}{BLOB_PATH}", status=404, json=body)
    for _ in range(2):
        answer = fetch(client, BLOB_PATH)
        assert answer.status == 404
        assert json.loads(answer.data) == body
        assert answer.headers["Docker-Distribution-API-Version"] == API_VERSION
    assert len(mock.calls) == 2


def test_upstream_401_is_forwarded_with_its_body_and_the_proxy_challenge(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    challenge = f'Bearer realm="https://auth.test/token",service="{REG}",scope="repository:x:pull"'
    body = {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}
    mock.get(
        f"{UP}/v2/{NAME}/manifests/v1",
        status=401,
        json=body,
        headers={"WWW-Authenticate": challenge},
    )
    mock.get("https://auth.test/token", status=500)  # the anonymous token exchange fails
    answer = fetch(client, f"/v2/{NAME}/manifests/v1")
    assert answer.status == 401
    assert json.loads(answer.data) == body
    # SPEC §12: the realm becomes the proxy's token endpoint, the scope the client-side name
    assert answer.headers["WWW-Authenticate"] == (
        'Bearer realm="http://localhost/v2/token",service="oci-pull-through",'
        f'scope="repository:{NAME}:pull"'
    )


def test_upstream_unreachable_is_502_naming_the_registry(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    mock.get(f"{UP}{BLOB_PATH}", body=requests.ConnectionError("connection refused"))
    answer = fetch(client, BLOB_PATH)
    assert answer.status == 502
    assert answer.headers["Content-Type"].startswith("application/json")
    assert REG in json.loads(answer.data)["errors"][0]["message"]
    assert answer.headers["Docker-Distribution-API-Version"] == API_VERSION


def test_registry_outside_allowlist_is_403(tmp_path: Path, mock: responses.RequestsMock) -> None:
    client = make_app(tmp_path, allowed_registries=("ghcr.io",)).test_client()
    answer = fetch(client, BLOB_PATH)
    assert answer.status == 403
    assert error_code(answer) == "DENIED"
    assert len(mock.calls) == 0
