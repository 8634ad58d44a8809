"""The Flask app end to end in-process: routes, cache behaviour per mode, with upstream mocked."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gevent
import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from app.config import AUTHENTICATED, TRANSPARENT, Config

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


@pytest.fixture
def mock() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


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


@pytest.fixture
def client(tmp_path: Path) -> FlaskClient:
    return make_app(tmp_path).test_client()


@pytest.fixture
def auth_client(tmp_path: Path) -> FlaskClient:
    return make_app(tmp_path, AUTHENTICATED).test_client()


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


# -- routes that never reach upstream --------------------------------------------------------------


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
@pytest.mark.parametrize(
    "path", ["/v2/", f"/v2/{NAME}/manifests/v1", BLOB_PATH, f"/v2/{NAME}/blobs/uploads/"]
)
def test_write_methods_are_unsupported(
    client: FlaskClient, mock: responses.RequestsMock, method: str, path: str
) -> None:
    answer = fetch(client, path, method, data=b"x")
    assert answer.status == 405
    assert error_code(answer) == "UNSUPPORTED"
    assert answer.headers["Docker-Distribution-API-Version"] == API_VERSION
    assert len(mock.calls) == 0


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/Org/App/manifests/v1", "NAME_INVALID"),
        ("/v2/registry.test/org//app/manifests/v1", "NAME_INVALID"),
        ("/v2/org/app/manifests/-v1", "TAG_INVALID"),
        ("/v2/org/app/manifests/sha256:1234", "DIGEST_INVALID"),
        ("/v2/org/app/blobs/sha256:xyz", "DIGEST_INVALID"),
        ("/v2/org/app/blobs/latest", "DIGEST_INVALID"),
    ],
)
def test_grammar_errors(
    client: FlaskClient, mock: responses.RequestsMock, path: str, code: str
) -> None:
    answer = fetch(client, path)
    assert answer.status == 400
    assert error_code(answer) == code
    assert answer.headers["Docker-Distribution-API-Version"] == API_VERSION
    assert len(mock.calls) == 0


@pytest.mark.parametrize(
    "path",
    [
        "/v2/..%2f..%2fetc/manifests/v1",
        "/v2/registry.test/..%2F..%2Fetc%2Fpasswd/manifests/v1",
        "/v2/org/app/manifests/..%2F..%2Fx",
    ],
)
def test_encoded_traversal_is_rejected_before_io(
    client: FlaskClient, mock: responses.RequestsMock, tmp_path: Path, path: str
) -> None:
    answer = fetch(client, path)
    assert answer.status in (400, 404)
    assert len(mock.calls) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_invalid_ns_registry(client: FlaskClient, mock: responses.RequestsMock) -> None:
    answer = fetch(client, f"/v2/{NAME}/manifests/v1?ns=user@evil.test")
    assert answer.status == 400
    assert error_code(answer) == "NAME_INVALID"
    assert len(mock.calls) == 0


def test_healthz(client: FlaskClient) -> None:
    answer = fetch(client, "/healthz")
    assert (answer.status, answer.data) == (200, b"ok")


@pytest.mark.parametrize("mode_client", ["client", "auth_client"])
def test_version_check_answers_the_proxy_challenge_without_upstream(
    mode_client: str, request: pytest.FixtureRequest, mock: responses.RequestsMock
) -> None:
    """SPEC §12: /v2/ is answered locally, so it works whatever state upstream is in."""
    client: FlaskClient = request.getfixturevalue(mode_client)
    answer = fetch(client, "/v2/")
    assert answer.status == 401
    challenge = answer.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="http://localhost/v2/token"')
    assert 'service="oci-pull-through"' in challenge
    assert answer.headers["Docker-Distribution-API-Version"] == API_VERSION
    answer = client.get("/v2/", headers={"Authorization": "Bearer anything"})
    assert answer.status_code == 200
    assert len(mock.calls) == 0


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


# -- manifests -------------------------------------------------------------------------------------


def test_tag_manifest_miss_is_stored_under_tag_and_digest(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    upstream_manifest(mock)
    first = fetch(client, f"/v2/{NAME}/manifests/v1", headers={"Accept": EVERY_MANIFEST_TYPE})
    assert (first.status, first.data) == (200, MANIFEST)
    assert first.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
    assert len(mock.calls) == 1

    by_digest = fetch(client, f"/v2/{NAME}/manifests/{MANIFEST_DIGEST}")
    assert (by_digest.status, by_digest.data) == (200, MANIFEST)
    assert by_digest.headers["Cache-Control"] == IMMUTABLE
    assert by_digest.headers["Content-Type"] == OCI_MANIFEST

    by_tag = fetch(client, f"/v2/{NAME}/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert (by_tag.status, by_tag.data) == (200, MANIFEST)
    assert by_tag.headers["Cache-Control"] == "public, max-age=2419200"
    assert by_tag.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
    assert by_tag.headers["Content-Length"] == str(len(MANIFEST))
    assert by_tag.headers["Docker-Distribution-API-Version"] == API_VERSION
    assert len(mock.calls) == 1


def test_a_narrow_accept_answer_is_stored_by_digest_only(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    """§15 Tags: a registry may pick one platform for such a client; not the tag's entry."""
    upstream_manifest(mock)
    fetch(client, f"/v2/{NAME}/manifests/v1", headers={"Accept": OCI_MANIFEST})
    by_digest = fetch(client, f"/v2/{NAME}/manifests/{MANIFEST_DIGEST}")
    assert (by_digest.status, by_digest.data, len(mock.calls)) == (200, MANIFEST, 1)
    fetch(client, f"/v2/{NAME}/manifests/v1", headers={"Accept": EVERY_MANIFEST_TYPE})
    assert len(mock.calls) == 2, "the tag was not cached from the narrow answer"
    fetch(client, f"/v2/{NAME}/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert len(mock.calls) == 2, "the full answer is the tag's entry"


def test_manifest_head_hit(client: FlaskClient, mock: responses.RequestsMock) -> None:
    upstream_manifest(mock)
    fetch(client, f"/v2/{NAME}/manifests/v1")
    answer = fetch(client, f"/v2/{NAME}/manifests/v1", "HEAD")
    assert answer.status == 200
    assert answer.data == b""
    assert answer.headers["Content-Length"] == str(len(MANIFEST))
    assert answer.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
    assert len(mock.calls) == 1


def test_docker_hub_forms_share_one_cache_entry(
    tmp_path: Path, mock: responses.RequestsMock
) -> None:
    client = make_app(tmp_path, upstream_registry="docker.io").test_client()
    mock.get(
        f"https://registry-1.docker.io/v2/library/alpine/manifests/{MANIFEST_DIGEST}",
        body=MANIFEST,
        headers=manifest_headers(),
    )
    for path in (
        f"/v2/alpine/manifests/{MANIFEST_DIGEST}",
        f"/v2/library/alpine/manifests/{MANIFEST_DIGEST}",
        f"/v2/docker.io/alpine/manifests/{MANIFEST_DIGEST}",
        f"/v2/index.docker.io/library/alpine/manifests/{MANIFEST_DIGEST}",
        f"/v2/alpine/manifests/{MANIFEST_DIGEST}?ns=registry-1.docker.io",
    ):
        answer = fetch(client, path)
        assert (answer.status, answer.data) == (200, MANIFEST), path
    assert len(mock.calls) == 1


def test_cached_tag_not_served_when_accept_excludes_its_type(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    upstream_manifest(mock)
    fetch(client, f"/v2/{NAME}/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert len(mock.calls) == 1
    answer = fetch(client, f"/v2/{NAME}/manifests/v1", headers={"Accept": OCI_INDEX})
    assert len(mock.calls) == 2  # went upstream
    assert mock.calls[1].request.headers["Accept"] == OCI_INDEX
    assert answer.status == 200


def test_cached_tag_served_when_one_of_several_accept_headers_matches(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    upstream_manifest(mock)
    fetch(client, f"/v2/{NAME}/manifests/v1")
    answer = fetch(
        client,
        f"/v2/{NAME}/manifests/v1",
        headers=[("Accept", OCI_INDEX), ("Accept", OCI_MANIFEST)],
    )
    assert (answer.status, answer.data) == (200, MANIFEST)
    assert len(mock.calls) == 1


def test_all_accept_headers_are_forwarded(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    upstream_manifest(mock)
    fetch(
        client,
        f"/v2/{NAME}/manifests/v1",
        headers=[("Accept", OCI_INDEX), ("Accept", OCI_MANIFEST)],
    )
    sent = [v.strip() for v in mock.calls[0].request.headers["Accept"].split(",")]
    assert sent == [OCI_INDEX, OCI_MANIFEST]


def test_latest_is_not_cached_by_default(client: FlaskClient, mock: responses.RequestsMock) -> None:
    upstream_manifest(mock, "latest")
    for _ in range(2):
        assert fetch(client, f"/v2/{NAME}/manifests/latest").data == MANIFEST
    assert len(mock.calls) == 2


def test_latest_cached_when_enabled(tmp_path: Path, mock: responses.RequestsMock) -> None:
    client = make_app(tmp_path, cache_latest_tag=True).test_client()
    upstream_manifest(mock, "latest")
    fetch(client, f"/v2/{NAME}/manifests/latest")
    answer = fetch(client, f"/v2/{NAME}/manifests/latest")
    assert answer.data == MANIFEST
    assert answer.headers["Cache-Control"] == "public, max-age=3600"
    assert len(mock.calls) == 1


def test_tags_not_cached_when_disabled(tmp_path: Path, mock: responses.RequestsMock) -> None:
    client = make_app(tmp_path, cache_tag_manifests=False).test_client()
    upstream_manifest(mock)
    for _ in range(2):
        assert fetch(client, f"/v2/{NAME}/manifests/v1").data == MANIFEST
    assert len(mock.calls) == 2


def test_tag_manifest_with_wrong_digest_header_is_not_cached(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    upstream_manifest(mock, **{"Docker-Content-Digest": "sha256:" + "0" * 64})
    for _ in range(2):
        assert fetch(client, f"/v2/{NAME}/manifests/v1").data == MANIFEST
    assert len(mock.calls) == 2


def test_digest_manifest_with_wrong_bytes_is_not_cached(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    wrong = "sha256:" + "1" * 64
    mock.get(f"{UP}/v2/{NAME}/manifests/{wrong}", body=MANIFEST, headers=manifest_headers())
    for _ in range(2):
        assert fetch(client, f"/v2/{NAME}/manifests/{wrong}").data == MANIFEST
    assert len(mock.calls) == 2


def test_manifest_404_forwarded_and_not_cached(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    mock.get(f"{UP}/v2/{NAME}/manifests/v1", status=404, json={"errors": []})
    for _ in range(2):
        assert fetch(client, f"/v2/{NAME}/manifests/v1").status == 404
    assert len(mock.calls) == 2


def test_per_user_headers_are_not_replayed(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    upstream_manifest(mock, **{"Set-Cookie": "s=1", "WWW-Authenticate": "Bearer realm=x"})
    first = fetch(client, f"/v2/{NAME}/manifests/v1")
    assert "Set-Cookie" not in first.headers  # §15: not even to the client that fetched it
    hit = fetch(client, f"/v2/{NAME}/manifests/v1")
    assert len(mock.calls) == 1
    assert "Set-Cookie" not in hit.headers
    assert "WWW-Authenticate" not in hit.headers


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
    import gevent

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
