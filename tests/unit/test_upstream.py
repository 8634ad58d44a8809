"""app/upstream.py: header forwarding, the anonymous token dance, errors, allowlist, schemes."""

from __future__ import annotations

import base64
import http.server
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from app.auth.tokencache import TokenCache
from app.bodies import MAX_ERROR_BODY, MAX_TOKEN_BODY, TooLarge, iter_body, read_limited
from app.config import AUTHENTICATED, TRANSPARENT, Config
from app.errors import Denied, UpstreamUnavailable
from app.upstream import ClientHeaders, Upstream, parse_bearer_challenge

REG = "registry.test"
NAME = "org/app"
PATH = f"/v2/{NAME}/manifests/v1"
URL = f"https://{REG}{PATH}"
REALM = "https://auth.test/token"
CHALLENGE = f'Bearer realm="{REALM}",service="registry.test",scope="repository:{NAME}:pull"'


@pytest.fixture
def mock() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def make(mode: str = TRANSPARENT, **kwargs: object) -> Upstream:
    """REG is a credential registry (§15) unless a test says otherwise."""
    kwargs.setdefault("credential_registries", (REG,))
    return Upstream(Config(proxy_mode=mode, **kwargs))  # type: ignore[arg-type]


def query(call: responses.Call) -> dict[str, list[str]]:
    return parse_qs(urlsplit(call.request.url).query)


def token_calls(mock: responses.RequestsMock) -> list[responses.Call]:
    return [c for c in mock.calls if c.request.url.startswith(REALM)]


def registry_calls(mock: responses.RequestsMock) -> list[responses.Call]:
    return [c for c in mock.calls if c.request.url.startswith(f"https://{REG}/")]


def add_token(mock: responses.RequestsMock, token: str = "anon-1", expires_in: int = 300) -> None:
    mock.get(REALM, json={"token": token, "expires_in": expires_in})


def needs_token(mock: responses.RequestsMock, url: str = URL, token: str = "anon-1") -> None:
    """Upstream answers 401 with a challenge unless the anonymous token is presented."""

    def callback(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        if request.headers.get("Authorization") == f"Bearer {token}":
            return 200, {"Docker-Content-Digest": "sha256:" + "0" * 64}, "manifest"
        return 401, {"WWW-Authenticate": CHALLENGE}, '{"errors":[]}'

    mock.add_callback("GET", url, callback=callback)


# -- header forwarding -----------------------------------------------------------------------------


def test_forwards_authorization_accept_and_user_agent(mock: responses.RequestsMock) -> None:
    mock.get(URL, body="ok")
    client = ClientHeaders(
        authorization="Basic dXNlcjpwdw==",
        accept=(
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json, */*;q=0.1",
        ),
        user_agent="containerd/2.0",
        range="bytes=0-9",
    )
    response = make().send("GET", REG, PATH, client, name=NAME)
    assert response.status_code == 200
    headers = mock.calls[0].request.headers
    assert headers["Authorization"] == "Basic dXNlcjpwdw=="
    accept = [v.strip() for v in headers["Accept"].split(",")]
    assert accept == [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "*/*;q=0.1",
    ]
    assert headers["User-Agent"] == "containerd/2.0"
    assert "Range" not in headers
    assert "If-Range" not in headers


def test_range_forwarded_only_when_asked(mock: responses.RequestsMock) -> None:
    blob_path = f"/v2/{NAME}/blobs/sha256:{'a' * 64}"
    mock.get(f"https://{REG}{blob_path}", body="x", status=206)
    client = ClientHeaders(range="bytes=5-", if_range='"etag-1"')
    make().send("GET", REG, blob_path, client, name=NAME, forward_range=True)
    headers = mock.calls[0].request.headers
    assert headers["Range"] == "bytes=5-"
    assert headers["If-Range"] == '"etag-1"'


def test_no_authorization_sent_when_client_sent_none(mock: responses.RequestsMock) -> None:
    mock.get(URL, body="ok")
    make().send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert "Authorization" not in mock.calls[0].request.headers


def test_compression_is_off(mock: responses.RequestsMock) -> None:
    mock.get(URL, body="ok")
    make().send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert mock.calls[0].request.headers["Accept-Encoding"] == "identity"


def test_query_parameters_are_passed(mock: responses.RequestsMock) -> None:
    mock.get(f"https://{REG}/v2/{NAME}/tags/list", json={"tags": []})
    make().send(
        "GET", REG, f"/v2/{NAME}/tags/list", ClientHeaders(), name=NAME, params=[("n", "10")]
    )
    assert query(mock.calls[0]) == {"n": ["10"]}


def test_redirect_does_not_carry_credentials_to_another_host(
    mock: responses.RequestsMock,
) -> None:
    blob_path = f"/v2/{NAME}/blobs/sha256:{'b' * 64}"
    mock.get(
        f"https://{REG}{blob_path}", status=307, headers={"Location": "https://cdn.test/blob?sig=1"}
    )
    mock.get("https://cdn.test/blob", body="layer")
    client = ClientHeaders(authorization="Bearer client-token")
    response = make().send("GET", REG, blob_path, client, name=NAME, follow_redirects=True)
    assert response.content == b"layer"
    assert mock.calls[0].request.headers["Authorization"] == "Bearer client-token"
    assert "Authorization" not in mock.calls[1].request.headers


# -- §15 credentials go only to CREDENTIAL_REGISTRIES ----------------------------------------------


@pytest.mark.parametrize("authorization", ["Basic dXNlcjpwdw==", "Bearer someone-elses"])
def test_client_authorization_is_dropped_for_a_registry_not_listed(
    mock: responses.RequestsMock, authorization: str
) -> None:
    needs_token(mock)
    add_token(mock)
    upstream = make(credential_registries=("other.test",))
    assert not upstream.may_send_credentials(REG)
    response = upstream.send("GET", REG, PATH, ClientHeaders(authorization), name=NAME)
    assert response.status_code == 200, "anonymous, with the anonymous token dance"
    sent = [c.request.headers.get("Authorization") for c in mock.calls]
    assert sent == [None, None, "Bearer anon-1"]


@pytest.mark.parametrize("mode", [TRANSPARENT, AUTHENTICATED])
def test_default_credential_registries_are_upstream_and_explicit_allowed(
    mock: responses.RequestsMock, mode: str
) -> None:
    mock.get(URL, body="ok")
    mock.get(f"https://ghcr.io{PATH}", body="ok")
    mock.get(f"https://evil.test{PATH}", body="ok")
    upstream = Upstream(
        Config(proxy_mode=mode, upstream_registry=REG, allowed_registries=("ghcr.io", "*.test"))
    )
    client = ClientHeaders(authorization="Basic dXNlcjpwdw==")
    for registry in (REG, "ghcr.io", "evil.test"):
        upstream.send("GET", registry, PATH, client, name=NAME)
    sent = [c.request.headers.get("Authorization") for c in mock.calls]
    assert sent == ["Basic dXNlcjpwdw==", "Basic dXNlcjpwdw==", None]


def test_docker_hub_credentials_by_any_alias(mock: responses.RequestsMock) -> None:
    mock.get(f"https://registry-1.docker.io{PATH}", body="ok")
    upstream = Upstream(Config(proxy_mode=TRANSPARENT, credential_registries=("docker.io",)))
    upstream.send("GET", "docker.io", PATH, ClientHeaders("Basic eA=="), name=NAME)
    assert mock.calls[0].request.headers["Authorization"] == "Basic eA=="


def test_redirect_not_followed_unless_asked(mock: responses.RequestsMock) -> None:
    mock.get(URL, status=307, headers={"Location": "https://cdn.test/x"})
    response = make().send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert response.status_code == 307
    assert len(mock.calls) == 1


# -- URLs ------------------------------------------------------------------------------------------


def test_https_by_default_and_http_for_insecure_registries(mock: responses.RequestsMock) -> None:
    mock.get("http://insecure.test:5000/v2/", body="{}")
    mock.get(f"https://{REG}/v2/", body="{}")
    upstream = make(insecure_registries=frozenset({"insecure.test:5000"}))
    upstream.send("GET", "insecure.test:5000", "/v2/", ClientHeaders())
    upstream.send("GET", REG, "/v2/", ClientHeaders())
    assert [c.request.url for c in mock.calls] == [
        "http://insecure.test:5000/v2/",
        f"https://{REG}/v2/",
    ]


def test_docker_hub_is_reached_at_its_api_host(mock: responses.RequestsMock) -> None:
    mock.get("https://registry-1.docker.io/v2/library/alpine/manifests/3", body="m")
    make().send("GET", "docker.io", "/v2/library/alpine/manifests/3", ClientHeaders())
    assert mock.calls[0].request.url == "https://registry-1.docker.io/v2/library/alpine/manifests/3"


# -- allowlist -------------------------------------------------------------------------------------


def test_registry_outside_allowlist_is_denied_without_a_request(
    mock: responses.RequestsMock,
) -> None:
    upstream = make(allowed_registries=("*.example.com", "ghcr.io"))
    with pytest.raises(Denied) as info:
        upstream.send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert info.value.status == 403
    assert info.value.code == "DENIED"
    assert len(mock.calls) == 0


def test_registry_inside_allowlist_is_reached(mock: responses.RequestsMock) -> None:
    mock.get("https://a.example.com/v2/", body="{}")
    upstream = make(allowed_registries=("*.example.com",))
    assert upstream.send("GET", "a.example.com", "/v2/", ClientHeaders()).status_code == 200


def test_ipv6_registry_in_allowlist_is_allowed() -> None:
    make(allowed_registries=("[fd00::5]:5000",)).check_allowed("[fd00::5]:5000")


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        requests.ConnectionError("refused"),
        requests.ConnectTimeout("connect timed out"),
        requests.ReadTimeout("read timed out"),
    ],
)
def test_transport_errors_raise_upstream_unavailable(
    mock: responses.RequestsMock, error: Exception
) -> None:
    mock.get(URL, body=error)
    with pytest.raises(UpstreamUnavailable) as info:
        make().send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert info.value.status == 502
    assert REG in info.value.message


def test_upstream_error_statuses_are_returned_not_raised(mock: responses.RequestsMock) -> None:
    mock.get(URL, status=404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
    response = make().send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert response.status_code == 404


# -- anonymous token exchange ----------------------------------------------------------------------


def test_anonymous_token_exchange_and_retry(mock: responses.RequestsMock) -> None:
    needs_token(mock)
    add_token(mock)
    client = ClientHeaders(accept=("application/vnd.oci.image.manifest.v1+json",))
    response = make().send("GET", REG, PATH, client, name=NAME)
    assert response.status_code == 200
    assert response.content == b"manifest"
    tokens = token_calls(mock)
    assert len(tokens) == 1
    assert query(tokens[0]) == {"service": ["registry.test"], "scope": [f"repository:{NAME}:pull"]}
    registry = registry_calls(mock)
    assert len(registry) == 2
    retry = registry[1].request.headers
    assert retry["Authorization"] == "Bearer anon-1"
    assert retry["Accept"] == "application/vnd.oci.image.manifest.v1+json"


def test_challenge_scope_is_used_as_given(mock: responses.RequestsMock) -> None:
    scope = "repository:other/name:pull,push"
    mock.get(
        URL,
        status=401,
        headers={"WWW-Authenticate": f'Bearer realm="{REALM}",service="svc.test",scope="{scope}"'},
    )
    mock.get(URL, body="ok")
    add_token(mock)
    make().send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert query(token_calls(mock)[0]) == {"service": ["svc.test"], "scope": [scope]}


def test_token_is_cached_and_reused(mock: responses.RequestsMock) -> None:
    needs_token(mock)
    add_token(mock)
    upstream = make()
    upstream.send("GET", REG, PATH, ClientHeaders(), name=NAME)
    mock.calls.reset()
    response = upstream.send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert response.status_code == 200
    assert token_calls(mock) == []
    registry = registry_calls(mock)
    assert len(registry) == 1  # straight to the cached token, no 401 round trip
    assert registry[0].request.headers["Authorization"] == "Bearer anon-1"


def test_token_cache_is_per_registry(mock: responses.RequestsMock) -> None:
    needs_token(mock)
    needs_token(mock, url=f"https://other.test{PATH}")
    add_token(mock)
    upstream = make()
    upstream.send("GET", REG, PATH, ClientHeaders(), name=NAME)
    upstream.send("GET", "other.test", PATH, ClientHeaders(), name=NAME)
    assert len(token_calls(mock)) == 2


def test_token_cache_is_per_scope(mock: responses.RequestsMock) -> None:
    needs_token(mock)
    other_path = "/v2/org/other/manifests/v1"

    def callback(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        if request.headers.get("Authorization") == "Bearer anon-1":
            return 200, {}, "m"
        challenge = (
            f'Bearer realm="{REALM}",service="registry.test",scope="repository:org/other:pull"'
        )
        return 401, {"WWW-Authenticate": challenge}, ""

    mock.add_callback("GET", f"https://{REG}{other_path}", callback=callback)
    add_token(mock)
    upstream = make()
    upstream.send("GET", REG, PATH, ClientHeaders(), name=NAME)
    upstream.send("GET", REG, other_path, ClientHeaders(), name="org/other")
    scopes = [query(c)["scope"] for c in token_calls(mock)]
    assert scopes == [[f"repository:{NAME}:pull"], ["repository:org/other:pull"]]


def test_expired_token_is_not_reused(mock: responses.RequestsMock) -> None:
    needs_token(mock)
    add_token(mock, expires_in=1)
    upstream = make()
    upstream.send("GET", REG, PATH, ClientHeaders(), name=NAME)
    time.sleep(1.1)
    response = upstream.send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert response.status_code == 200
    assert len(token_calls(mock)) == 2


def test_rejected_cached_token_is_replaced(mock: responses.RequestsMock) -> None:
    needs_token(mock, token="anon-2")
    mock.get(REALM, json={"token": "anon-1", "expires_in": 300})
    mock.get(REALM, json={"token": "anon-2", "expires_in": 300})
    upstream = make()
    # First call: anon-1 is fetched, rejected, and the original 401 forwarded.
    assert upstream.send("GET", REG, PATH, ClientHeaders(), name=NAME).status_code == 401
    response = upstream.send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert response.status_code == 200
    assert registry_calls(mock)[-1].request.headers["Authorization"] == "Bearer anon-2"


@pytest.mark.parametrize(
    "token_reply",
    [
        {"status": 500, "body": "boom"},
        {"status": 200, "body": "not json"},
        {"status": 200, "json": {"expires_in": 60}},
        {"status": 403, "json": {"token": "no"}},
        {"body": requests.ConnectionError("auth down")},
    ],
)
def test_token_failure_forwards_original_401(
    mock: responses.RequestsMock, token_reply: dict[str, object]
) -> None:
    mock.get(URL, status=401, headers={"WWW-Authenticate": CHALLENGE}, body="original")
    mock.get(REALM, **token_reply)  # type: ignore[arg-type]
    response = make().send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert response.status_code == 401
    assert response.content == b"original"
    assert response.headers["WWW-Authenticate"] == CHALLENGE
    assert len(registry_calls(mock)) == 1


def test_retry_also_401_forwards_original(mock: responses.RequestsMock) -> None:
    mock.get(URL, status=401, headers={"WWW-Authenticate": CHALLENGE}, body="original")
    mock.get(URL, status=401, headers={"WWW-Authenticate": CHALLENGE}, body="retry")
    add_token(mock)
    response = make().send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert response.status_code == 401
    assert response.content == b"original"
    assert len(registry_calls(mock)) == 2  # retried once, not more


def test_non_bearer_challenge_is_forwarded(mock: responses.RequestsMock) -> None:
    mock.get(URL, status=401, headers={"WWW-Authenticate": 'Basic realm="x"'})
    response = make().send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert response.status_code == 401
    assert len(mock.calls) == 1


def test_transparent_mode_retries_rejected_client_credentials(
    mock: responses.RequestsMock,
) -> None:
    needs_token(mock)
    add_token(mock)
    client = ClientHeaders(authorization="Bearer wrong-realm-token")
    response = make(TRANSPARENT).send("GET", REG, PATH, client, name=NAME)
    assert response.status_code == 200
    registry = registry_calls(mock)
    assert [c.request.headers["Authorization"] for c in registry] == [
        "Bearer wrong-realm-token",
        "Bearer anon-1",
    ]
    # The client's credentials are not handed to the token realm, another host.
    assert "Authorization" not in token_calls(mock)[0].request.headers


def test_authenticated_mode_does_not_retry_rejected_client_credentials(
    mock: responses.RequestsMock,
) -> None:
    needs_token(mock)
    add_token(mock)
    client = ClientHeaders(authorization="Bearer wrong-realm-token")
    response = make(AUTHENTICATED).send("GET", REG, PATH, client, name=NAME)
    assert response.status_code == 401
    assert token_calls(mock) == []
    assert len(registry_calls(mock)) == 1


def test_authenticated_mode_still_does_the_anonymous_dance(mock: responses.RequestsMock) -> None:
    needs_token(mock)
    add_token(mock)
    response = make(AUTHENTICATED).send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert response.status_code == 200


def test_authenticated_mode_never_uses_cached_anonymous_token_for_a_client_with_credentials(
    mock: responses.RequestsMock,
) -> None:
    needs_token(mock)
    add_token(mock)
    upstream = make(AUTHENTICATED)
    upstream.send("GET", REG, PATH, ClientHeaders(), name=NAME)  # caches anon-1
    mock.calls.reset()
    client = ClientHeaders(authorization="Bearer revoked")
    assert upstream.send("GET", REG, PATH, client, name=NAME).status_code == 401
    assert [c.request.headers["Authorization"] for c in mock.calls] == ["Bearer revoked"]


def test_token_dance_can_be_disabled(mock: responses.RequestsMock) -> None:
    mock.get(f"https://{REG}/v2/", status=401, headers={"WWW-Authenticate": CHALLENGE})
    add_token(mock)
    response = make().send("GET", REG, "/v2/", ClientHeaders(), token_dance=False)
    assert response.status_code == 401
    assert token_calls(mock) == []


# -- §15 bounded work ------------------------------------------------------------------------------


def test_kept_401_body_beyond_64_kib_is_a_clean_502(mock: responses.RequestsMock) -> None:
    big = "x" * (MAX_ERROR_BODY + 1)
    mock.get(URL, status=401, headers={"WWW-Authenticate": CHALLENGE}, body=big)
    add_token(mock)
    with pytest.raises(UpstreamUnavailable) as info:
        make().send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert info.value.status == 502 and REG in info.value.message


def test_kept_401_body_within_the_cap_is_forwarded(mock: responses.RequestsMock) -> None:
    body = "y" * MAX_ERROR_BODY
    mock.get(URL, status=401, headers={"WWW-Authenticate": CHALLENGE}, body=body)
    add_token(mock)
    response = make().send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert response.status_code == 401
    assert b"".join(iter_body(response, REG)) == body.encode()


@pytest.mark.parametrize(
    "reply",
    [
        '{"token": "' + "t" * MAX_TOKEN_BODY + '"}',
        "[1, 2]",
        "not json",
    ],
)
def test_oversized_or_bad_anonymous_token_answer_is_a_failed_fetch(
    mock: responses.RequestsMock, reply: str
) -> None:
    mock.get(URL, status=401, headers={"WWW-Authenticate": CHALLENGE}, body="{}")
    mock.get(REALM, body=reply)
    response = make().send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert response.status_code == 401, "the original 401 is forwarded"


def test_read_limited_counts_bytes_read_not_content_length(mock: responses.RequestsMock) -> None:
    mock.get(
        URL, body="z" * 100, headers={"Content-Length": "10"}, auto_calculate_content_length=False
    )
    response = make().send("GET", REG, PATH, ClientHeaders(), name=NAME)
    with pytest.raises(TooLarge):
        read_limited(response, 50)


def test_token_cache_is_bounded_and_drops_expired_entries() -> None:
    cache = TokenCache(max_entries=3)
    cache.put(REG, "a", "ta", 300)
    cache.put(REG, "b", "tb", 0)  # already expired
    cache.put(REG, "c", "tc", 300)
    cache.put(REG, "d", "td", 300)
    assert len(cache) == 3 and cache.get(REG, "b") is None, "the expired entry went first"
    cache.put(REG, "e", "te", 300)
    assert len(cache) == 3 and cache.get(REG, "a") is None, "then the oldest"
    assert [cache.get(REG, s) for s in "cde"] == ["tc", "td", "te"]


# -- parse_bearer_challenge ------------------------------------------------------------------------


def test_parse_bearer_challenge() -> None:
    assert parse_bearer_challenge(CHALLENGE) == {
        "realm": REALM,
        "service": "registry.test",
        "scope": f"repository:{NAME}:pull",
    }


def test_parse_bearer_challenge_scheme_case_and_unquoted_values() -> None:
    assert parse_bearer_challenge('bearer realm="https://a.test/t", service=svc') == {
        "realm": "https://a.test/t",
        "service": "svc",
    }


def test_parse_bearer_challenge_keeps_commas_inside_quotes() -> None:
    header = 'Bearer realm="https://a.test/t",scope="repository:a:pull,push"'
    parsed = parse_bearer_challenge(header)
    assert parsed is not None
    assert parsed["scope"] == "repository:a:pull,push"


@pytest.mark.parametrize(
    "header", [None, "", 'Basic realm="x"', "Bearer", 'Bearer service="svc"', "Negotiate abc"]
)
def test_parse_bearer_challenge_rejects(header: str | None) -> None:
    assert parse_bearer_challenge(header) is None


# -- the SSRF guard covers token realms and redirect targets (real sockets, no mocks) --------------


class _RegistryHandler(http.server.BaseHTTPRequestHandler):
    """A registry that sends every client somewhere else: a token realm or a redirect."""

    target = ""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if "/blobs/" in self.path:
            self.send_response(307)
            self.send_header("Location", self.target)
        else:
            self.send_response(401)
            self.send_header(
                "WWW-Authenticate", f'Bearer realm="{self.target}",service="s",scope="x"'
            )
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """An internal service that must never be contacted."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.3)
    yield sock
    sock.close()


@pytest.fixture
def registry_server() -> Iterator[tuple[str, type[_RegistryHandler]]]:
    handler = type("Handler", (_RegistryHandler,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()
    thread.join()


def _never_contacted(sock: socket.socket) -> None:
    with pytest.raises(TimeoutError):
        conn, _ = sock.accept()
        conn.close()


def test_internal_token_realm_is_refused(
    registry_server: tuple[str, type[_RegistryHandler]], listener: socket.socket
) -> None:
    registry, handler = registry_server
    handler.target = f"http://localhost:{listener.getsockname()[1]}/token"
    upstream = make(insecure_registries=frozenset({registry}))  # exempts the registry only
    with pytest.raises(Denied):
        upstream.send("GET", registry, PATH, ClientHeaders(), name=NAME)
    _never_contacted(listener)


def test_metadata_address_token_realm_is_refused(
    registry_server: tuple[str, type[_RegistryHandler]],
) -> None:
    registry, handler = registry_server
    handler.target = "http://169.254.169.254/latest/meta-data/"
    upstream = make(insecure_registries=frozenset({registry}))
    with pytest.raises(Denied):
        upstream.send("GET", registry, PATH, ClientHeaders(), name=NAME)


def test_internal_redirect_target_is_refused(
    registry_server: tuple[str, type[_RegistryHandler]], listener: socket.socket
) -> None:
    registry, handler = registry_server
    handler.target = f"http://localhost:{listener.getsockname()[1]}/blob"
    upstream = make(insecure_registries=frozenset({registry}))
    blob_path = f"/v2/{NAME}/blobs/sha256:{'c' * 64}"
    with pytest.raises(Denied):
        upstream.send("GET", registry, blob_path, ClientHeaders(), name=NAME, follow_redirects=True)
    _never_contacted(listener)


def test_internal_registry_not_exempt_is_refused(listener: socket.socket) -> None:
    registry = f"127.0.0.1:{listener.getsockname()[1]}"
    upstream = make(insecure_registries=frozenset())  # allowed by "*", but "*" never exempts
    with pytest.raises(Denied) as info:
        upstream.send("GET", registry, PATH, ClientHeaders(), name=NAME)
    assert info.value.status == 403
    _never_contacted(listener)


# -- WWW-Authenticate: every header, every challenge (issue 14) -----------------------------------


def test_merged_header_takes_the_bearer_realm_not_the_last_realm() -> None:
    merged = f'Bearer realm="{REALM}",service="reg", Basic realm="evil"'
    assert parse_bearer_challenge(merged) == {"realm": REALM, "service": "reg"}
    assert parse_bearer_challenge(['Basic realm="x"', f'Bearer realm="{REALM}"']) == {
        "realm": REALM
    }
    assert parse_bearer_challenge('Basic realm="x, realm=y"') is None


def test_two_www_authenticate_headers_are_parsed_one_by_one(mock: responses.RequestsMock) -> None:
    add_token(mock)
    headers = [("WWW-Authenticate", 'Basic realm="a, b"'), ("WWW-Authenticate", CHALLENGE)]

    def callback(request: requests.PreparedRequest) -> tuple[int, list[tuple[str, str]], str]:
        if request.headers.get("Authorization") == "Bearer anon-1":
            return 200, [], "manifest"
        return 401, headers, "{}"

    mock.add_callback("GET", URL, callback=callback)
    assert make().send("GET", REG, PATH, ClientHeaders(), name=NAME).status_code == 200
    assert len(token_calls(mock)) == 1


# -- UPSTREAM_AUTH_FILE (issue 14) ---------------------------------------------------------------

AUTH_USER, AUTH_PASS = "cacheuser", "cache-pw"
AUTH_BASIC = "Basic " + base64.b64encode(f"{AUTH_USER}:{AUTH_PASS}".encode()).decode()


def auth_file(tmp_path: Path, registry: str = REG) -> str:
    path = tmp_path / "config.json"
    entry = {"auth": base64.b64encode(f"{AUTH_USER}:{AUTH_PASS}".encode()).decode()}
    path.write_text(json.dumps({"auths": {registry: entry}}))
    return str(path)


def test_configured_credentials_go_to_the_challenge_realm(
    mock: responses.RequestsMock, tmp_path: Path
) -> None:
    mock.get(REALM, json={"token": "paid-1"})
    needs_token(mock, token="paid-1")
    upstream = make(upstream_auth_file=auth_file(tmp_path))
    assert upstream.send("GET", REG, PATH, ClientHeaders(), name=NAME).status_code == 200
    [call] = token_calls(mock)
    assert call.request.headers["Authorization"] == AUTH_BASIC
    assert all(c.request.headers.get("Authorization") != AUTH_BASIC for c in registry_calls(mock))
    # the token is cached apart from anonymous ones
    upstream.send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert len(token_calls(mock)) == 1


def test_configured_identity_token_is_an_oauth2_refresh_grant(
    mock: responses.RequestsMock, tmp_path: Path
) -> None:
    """A config.json identitytoken (docker login to an OAuth2 registry) is exchanged by the
    form POST of the distribution token spec, never sent as Basic, and the token is reused."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {REG: {"identitytoken": "refresh-123"}}}))
    mock.post(REALM, json={"access_token": "oauth-1", "expires_in": 300})
    needs_token(mock, token="oauth-1")
    upstream = make(upstream_auth_file=str(path))
    assert upstream.send("GET", REG, PATH, ClientHeaders(), name=NAME).status_code == 200
    [call] = token_calls(mock)
    assert call.request.method == "POST"
    assert "Authorization" not in call.request.headers
    assert call.request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    form = parse_qs(str(call.request.body))
    assert form == {
        "grant_type": ["refresh_token"],
        "refresh_token": ["refresh-123"],
        "client_id": ["oci-pull-through"],
        "service": ["registry.test"],
        "scope": [f"repository:{NAME}:pull"],
    }
    assert urlsplit(call.request.url).query == "", "the secret is not in the URL"
    upstream.send("GET", REG, PATH, ClientHeaders(), name=NAME)
    assert len(token_calls(mock)) == 1


def test_configured_credentials_as_basic(mock: responses.RequestsMock, tmp_path: Path) -> None:
    def callback(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        if request.headers.get("Authorization") == AUTH_BASIC:
            return 200, {}, "manifest"
        return 401, {"WWW-Authenticate": 'Basic realm="r"'}, "{}"

    mock.add_callback("GET", URL, callback=callback)
    upstream = make(upstream_auth_file=auth_file(tmp_path))
    assert upstream.send("GET", REG, PATH, ClientHeaders(), name=NAME).status_code == 200


@pytest.mark.parametrize("case", ["authenticated", "client sent credentials", "other registry"])
def test_configured_credentials_are_not_used(
    mock: responses.RequestsMock, tmp_path: Path, case: str
) -> None:
    mock.get(REALM, json={"token": "anon-1"})
    needs_token(mock, token="never")
    mode = AUTHENTICATED if case == "authenticated" else TRANSPARENT
    path = auth_file(tmp_path, "other.test" if case == "other registry" else REG)
    client = (
        ClientHeaders(authorization="Basic Y2xpZW50OnB3") if "client" in case else ClientHeaders()
    )
    make(mode, upstream_auth_file=path).send("GET", REG, PATH, client, name=NAME)
    sent = [c.request.headers.get("Authorization") for c in mock.calls]
    assert AUTH_BASIC not in sent


def test_configured_credentials_never_follow_a_redirect_target_challenge(
    mock: responses.RequestsMock, tmp_path: Path
) -> None:
    blob = f"/v2/{NAME}/blobs/sha256:{'c' * 64}"
    mock.get(f"https://{REG}{blob}", status=307, headers={"Location": "https://cdn.test/b"})
    evil = 'Bearer realm="https://cdn.test/token"'
    mock.get("https://cdn.test/b", status=401, headers={"WWW-Authenticate": evil})
    mock.get("https://cdn.test/token", json={"token": "t"})
    upstream = make(upstream_auth_file=auth_file(tmp_path))
    upstream.send("GET", REG, blob, ClientHeaders(), name=NAME, follow_redirects=True)
    assert all(c.request.headers.get("Authorization") != AUTH_BASIC for c in mock.calls)


def test_auth_file_is_reread_when_a_secret_update_swaps_the_symlink(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text('{"auths": {}}')
    (tmp_path / "new").mkdir()
    auth_file(tmp_path / "new", REG)
    link = tmp_path / "config.json"
    link.symlink_to(tmp_path / "old" / "config.json")
    upstream = make(upstream_auth_file=str(link))
    assert upstream.configured_credentials(REG) is None
    swap = tmp_path / "swap"
    swap.symlink_to(tmp_path / "new" / "config.json")
    os.replace(swap, link)  # what the kubelet does with ..data
    creds = upstream.configured_credentials(REG)
    assert creds is not None and creds.username == AUTH_USER
    (tmp_path / "new" / "config.json").write_text("not json")
    assert upstream.configured_credentials(REG) is None  # unusable: nothing is sent
