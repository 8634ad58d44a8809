"""Manifests in-process: tags and digests, Accept, what may become a tag's entry."""

from __future__ import annotations

from pathlib import Path

import responses
from flask.testing import FlaskClient

from tests.appclient import (
    API_VERSION,
    EVERY_MANIFEST_TYPE,
    IMMUTABLE,
    MANIFEST,
    MANIFEST_DIGEST,
    NAME,
    OCI_INDEX,
    OCI_MANIFEST,
    UP,
    fetch,
    make_app,
    manifest_headers,
    upstream_manifest,
)

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
