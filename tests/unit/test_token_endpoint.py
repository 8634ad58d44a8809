"""The token proxy in-process (SPEC §12): /v2/ challenge, /v2/token, grants on registry requests."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from app.config import AUTHENTICATED, TRANSPARENT, Config

BEARER_REG, BASIC_REG, OPEN_REG = "bearer.test", "basic.test", "open.test"
REALM = "https://auth.bearer.test/token"
BASIC_ALICE = "Basic " + base64.b64encode(b"alice:pw").decode()
SECRET = "unit-test-token-secret"


@pytest.fixture
def mock() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def make_app(tmp_path: Path, mode: str = TRANSPARENT, **kwargs: object) -> Flask:
    settings: dict[str, object] = {
        "storage_backend": "fs",
        "fs_root": str(tmp_path / "cache"),
        "upstream_registry": OPEN_REG,
        "token_secret": SECRET,
        # §15: these tests' registries may receive credentials unless a test says otherwise
        "credential_registries": (BEARER_REG, BASIC_REG, OPEN_REG),
        **kwargs,
    }
    return create_app(Config(proxy_mode=mode, **settings))  # type: ignore[arg-type]


@pytest.fixture
def client(tmp_path: Path) -> FlaskClient:
    return make_app(tmp_path).test_client()


def _basic_v2(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
    if request.headers.get("Authorization") == BASIC_ALICE:
        return 200, {}, "{}"
    return 401, {"WWW-Authenticate": 'Basic realm="basic"'}, "{}"


def _upstreams(mock: responses.RequestsMock) -> None:
    mock.get(
        f"https://{BEARER_REG}/v2/",
        status=401,
        headers={"WWW-Authenticate": f'Bearer realm="{REALM}",service="bearer-svc"'},
    )
    mock.add_callback(responses.GET, f"https://{BASIC_REG}/v2/", callback=_basic_v2)
    mock.get(f"https://{OPEN_REG}/v2/", status=200, json={})


def _token(client: FlaskClient, *scopes: str, auth: str | None = None, query: str = "") -> str:
    qs = "&".join(f"scope={s}" for s in scopes)
    headers = {"Authorization": auth} if auth else {}
    answer = client.get(f"/v2/token?service=oci-pull-through&{qs}{query}", headers=headers)
    assert answer.status_code == 200, answer.data
    body = answer.get_json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] >= 60 and body["issued_at"].endswith("Z")
    assert answer.headers["Cache-Control"] == "no-store"
    return body["token"]


def test_v2_challenges_anonymous_clients_with_the_proxy_realm(client: FlaskClient) -> None:
    answer = client.get("/v2/")
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == (
        'Bearer realm="http://localhost/v2/token",service="oci-pull-through"'
    )
    assert answer.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert client.get("/v2/", headers={"Authorization": "Bearer whatever"}).status_code == 200


def test_public_url_and_trusted_forwarded_headers(tmp_path: Path) -> None:
    trusted = make_app(tmp_path).test_client()
    fwd = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "cache.example.com"}
    answer = trusted.get("/v2/", headers=fwd, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert 'realm="https://cache.example.com/v2/token"' in answer.headers["WWW-Authenticate"]
    answer = trusted.get("/v2/", headers=fwd, environ_base={"REMOTE_ADDR": "203.0.113.9"})
    assert 'realm="http://localhost/v2/token"' in answer.headers["WWW-Authenticate"]
    nets = make_app(tmp_path, forwarded_allow_ips=("10.0.0.0/8",)).test_client()
    answer = nets.get("/v2/", headers=fwd, environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert 'realm="https://cache.example.com/v2/token"' in answer.headers["WWW-Authenticate"]
    fixed = make_app(tmp_path, public_url="https://cache.internal:8443").test_client()
    answer = fixed.get("/v2/", headers=fwd, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert 'realm="https://cache.internal:8443/v2/token"' in answer.headers["WWW-Authenticate"]


def test_bearer_upstream_token_is_fetched_with_the_client_credentials(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    _upstreams(mock)
    mock.get(REALM, json={"token": "upstream-jwt", "expires_in": 120})
    token = _token(client, f"repository:{BEARER_REG}/org/app:pull", auth=BASIC_ALICE)
    realm_call = [c for c in mock.calls if c.request.url.startswith(REALM)][-1]
    query = parse_qs(urlsplit(realm_call.request.url).query)
    assert query == {"service": ["bearer-svc"], "scope": ["repository:org/app:pull"]}
    assert realm_call.request.headers["Authorization"] == BASIC_ALICE
    assert "upstream-jwt" not in token and "alice" not in token

    mock.get(f"https://{BEARER_REG}/v2/org/app/tags/list", json={"name": "org/app", "tags": []})
    answer = client.get(
        f"/v2/{BEARER_REG}/org/app/tags/list", headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.status_code == 200
    assert mock.calls[-1].request.headers["Authorization"] == "Bearer upstream-jwt"


def test_wrong_credentials_are_401(client: FlaskClient, mock: responses.RequestsMock) -> None:
    _upstreams(mock)
    mock.get(REALM, status=401, json={})
    answer = client.get(
        f"/v2/token?scope=repository:{BEARER_REG}/org/app:pull",
        headers={"Authorization": BASIC_ALICE},
    )
    assert answer.status_code == 401
    wrong = "Basic " + base64.b64encode(b"alice:wrong").decode()
    answer = client.get(
        f"/v2/token?scope=repository:{BASIC_REG}/org/app:pull", headers={"Authorization": wrong}
    )
    assert answer.status_code == 401


def test_basic_upstream_credentials_are_checked_sealed_and_sent_only_there(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    _upstreams(mock)
    mock.get(REALM, json={"token": "upstream-jwt"})
    token = _token(
        client,
        f"repository:{BASIC_REG}/org/app:pull",
        f"repository:{BEARER_REG}/org/app:pull",
        f"repository:{OPEN_REG}/org/app:pull",
        auth=BASIC_ALICE,
    )
    checks = [c for c in mock.calls if c.request.url == f"https://{BASIC_REG}/v2/"]
    assert checks[-1].request.headers["Authorization"] == BASIC_ALICE
    for registry, expected in (
        (BASIC_REG, BASIC_ALICE),
        (BEARER_REG, "Bearer upstream-jwt"),
        (OPEN_REG, None),
    ):
        mock.get(f"https://{registry}/v2/org/app/tags/list", json={"name": "org/app", "tags": []})
        client.get(
            f"/v2/{registry}/org/app/tags/list", headers={"Authorization": f"Bearer {token}"}
        )
        assert mock.calls[-1].request.headers.get("Authorization") == expected, registry


def test_tampered_token_counts_as_anonymous(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    _upstreams(mock)
    token = _token(client, f"repository:{BASIC_REG}/org/app:pull", auth=BASIC_ALICE)
    mock.get(f"https://{BASIC_REG}/v2/org/app/tags/list", json={})
    forged = token[:-5] + ("AAAAA" if not token.endswith("AAAAA") else "BBBBB")
    client.get(f"/v2/{BASIC_REG}/org/app/tags/list", headers={"Authorization": f"Bearer {forged}"})
    assert "Authorization" not in mock.calls[-1].request.headers


def test_upstream_401_becomes_the_proxy_challenge_with_client_scope(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    mock.get(
        f"https://{BASIC_REG}/v2/org/app/manifests/v1",
        status=401,
        headers={"WWW-Authenticate": 'Basic realm="basic"'},
        json={"errors": [{"code": "UNAUTHORIZED"}]},
    )
    answer = client.get(f"/v2/{BASIC_REG}/org/app/manifests/v1")
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == (
        'Bearer realm="http://localhost/v2/token",service="oci-pull-through",'
        f'scope="repository:{BASIC_REG}/org/app:pull"'
    )
    answer = client.get(f"/v2/org/app/manifests/v1?ns={BASIC_REG}")
    assert answer.headers["WWW-Authenticate"] == (
        f'Bearer realm="http://localhost/v2/token?ns={BASIC_REG}",service="oci-pull-through",'
        'scope="repository:org/app:pull"'
    )


def test_oauth2_password_post_and_unsupported_grants(
    client: FlaskClient, mock: responses.RequestsMock
) -> None:
    _upstreams(mock)
    mock.get(REALM, json={"token": "upstream-jwt"})
    answer = client.post(
        f"/v2/token?ns={BEARER_REG}",
        data={
            "grant_type": "password",
            "username": "alice",
            "password": "pw",
            "scope": "repository:org/app:pull",
            "service": "oci-pull-through",
            "client_id": "containerd-client",
        },
    )
    assert answer.status_code == 200 and answer.get_json()["access_token"].startswith("opt1.")
    realm_call = [c for c in mock.calls if c.request.url.startswith(REALM)][-1]
    assert realm_call.request.headers["Authorization"] == BASIC_ALICE
    answer = client.post("/v2/token", data={"grant_type": "refresh_token", "refresh_token": "x"})
    assert answer.status_code == 400, "containerd falls back to GET on 400"


def test_unreachable_upstream_transparent_anonymous_authenticated_502(
    tmp_path: Path, mock: responses.RequestsMock
) -> None:
    mock.get(f"https://{BEARER_REG}/v2/", body=requests.ConnectionError("down"))
    scope = f"/v2/token?scope=repository:{BEARER_REG}/org/app:pull"
    transparent = make_app(tmp_path).test_client()
    assert transparent.get(scope, headers={"Authorization": BASIC_ALICE}).status_code == 200
    authenticated = make_app(tmp_path, AUTHENTICATED).test_client()
    answer = authenticated.get(scope)
    assert answer.status_code == 502
    assert json.loads(answer.data)["errors"][0]["code"] == "UNAVAILABLE"


def test_token_endpoint_honours_allowlist_and_ssrf_guard(tmp_path: Path) -> None:
    client = make_app(tmp_path, allowed_registries=("*.example.com",)).test_client()
    answer = client.get("/v2/token?scope=repository:evil.test/org/app:pull")
    assert answer.status_code == 403
    client = make_app(tmp_path).test_client()
    answer = client.get("/v2/token?scope=repository:127.0.0.1:5000/org/app:pull")
    assert answer.status_code == 403, "loopback upstream refused by the SSRF guard"
    answer = client.get("/v2/token?scope=repository:Bad/Name:pull")
    assert answer.status_code == 400


# -- §15: credentials only for CREDENTIAL_REGISTRIES; bounded token requests ----------------------


def _authorizations(mock: responses.RequestsMock, prefix: str) -> list[str | None]:
    return [
        c.request.headers.get("Authorization")
        for c in mock.calls
        if c.request.url.startswith(prefix)
    ]


def test_unlisted_registries_get_no_credentials_and_an_anonymous_grant(
    tmp_path: Path, mock: responses.RequestsMock
) -> None:
    _upstreams(mock)
    mock.get(REALM, json={"token": "anonymous-jwt"})
    client = make_app(tmp_path, credential_registries=(OPEN_REG,)).test_client()
    scopes = (f"repository:{BEARER_REG}/org/app:pull", f"repository:{BASIC_REG}/org/app:pull")
    token = _token(client, *scopes, auth=BASIC_ALICE)
    assert _authorizations(mock, REALM) == [None], "the realm is asked anonymously"
    assert _authorizations(mock, f"https://{BASIC_REG}/") == [None], "only the challenge"
    for registry in (BEARER_REG, BASIC_REG):  # even an anonymous grant: the request is anonymous
        mock.get(f"https://{registry}/v2/org/app/tags/list", json={})
        client.get(
            f"/v2/{registry}/org/app/tags/list", headers={"Authorization": f"Bearer {token}"}
        )
        assert "Authorization" not in mock.calls[-1].request.headers, registry


def test_raw_authorization_is_not_forwarded_to_an_unlisted_registry(
    tmp_path: Path, mock: responses.RequestsMock
) -> None:
    client = make_app(tmp_path, credential_registries=(OPEN_REG,)).test_client()
    for registry, expected in ((BASIC_REG, None), (OPEN_REG, BASIC_ALICE)):
        mock.get(f"https://{registry}/v2/org/app/tags/list", json={})
        client.get(f"/v2/{registry}/org/app/tags/list", headers={"Authorization": BASIC_ALICE})
        assert mock.calls[-1].request.headers.get("Authorization") == expected, registry
        client.get(f"/v2/org/app/tags/list?ns={registry}", headers={"Authorization": BASIC_ALICE})
        assert mock.calls[-1].request.headers.get("Authorization") == expected, registry


@pytest.mark.parametrize(
    "scopes",
    [
        [f"repository:{OPEN_REG}/org/app{i}:pull" for i in range(11)],
        [" ".join(f"repository:{OPEN_REG}/org/app{i}:pull" for i in range(11))],
        [f"repository:reg{i}.test/org/app:pull" for i in range(6)],
    ],
    ids=["11-scopes", "11-scopes-in-one-parameter", "6-registries"],
)
def test_too_many_scopes_or_registries_is_400_before_any_upstream_request(
    client: FlaskClient, mock: responses.RequestsMock, scopes: list[str]
) -> None:
    qs = "&".join(f"scope={s}" for s in scopes)
    answer = client.get(f"/v2/token?{qs}", headers={"Authorization": BASIC_ALICE})
    assert answer.status_code == 400
    assert json.loads(answer.data)["errors"][0]["code"] == "DENIED"
    assert len(mock.calls) == 0


def test_oversized_token_answer_is_502_authenticated_anonymous_transparent(
    tmp_path: Path, mock: responses.RequestsMock
) -> None:
    _upstreams(mock)
    mock.get(REALM, body='{"token": "' + "t" * (1024 * 1024) + '"}')
    scope = f"/v2/token?scope=repository:{BEARER_REG}/org/app:pull"
    authenticated = make_app(tmp_path, AUTHENTICATED).test_client()
    answer = authenticated.get(scope, headers={"Authorization": BASIC_ALICE})
    assert answer.status_code == 502
    assert "larger than" in json.loads(answer.data)["errors"][0]["message"]
    transparent = make_app(tmp_path).test_client()
    assert transparent.get(scope, headers={"Authorization": BASIC_ALICE}).status_code == 200


def test_challenge_cache_is_bounded_and_drops_expired_entries(
    mock: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.auth import challenge as challenge_module
    from app.auth.challenge import ChallengeCache
    from app.upstream import Upstream

    now = [1000.0]
    monkeypatch.setattr(challenge_module.time, "monotonic", lambda: now[0])
    for i in range(4):
        mock.get(f"https://r{i}.test/v2/", json={})
    cache = ChallengeCache(Upstream(Config(proxy_mode=TRANSPARENT)), ttl=60, max_entries=3)
    cache.get("r0.test")
    now[0] += 61  # r0 expires
    cache.get("r1.test")
    cache.get("r2.test")
    cache.get("r3.test")
    assert len(cache) == 3 and "r0.test" not in cache._known, "expired dropped first"
    cache.get("r0.test")
    assert len(cache) == 3 and "r1.test" not in cache._known, "then the oldest"
    now[0] += 61
    calls = len(mock.calls)
    cache.get("r3.test")
    assert len(mock.calls) == calls + 1 and len(cache) == 3, "an expired entry is re-learned"
