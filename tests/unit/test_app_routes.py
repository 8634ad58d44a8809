"""Routes that never reach upstream: write methods, /v2/, bad names, health and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import responses
from flask.testing import FlaskClient

from tests.appclient import (
    API_VERSION,
    BLOB_PATH,
    NAME,
    error_code,
    fetch,
)

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
