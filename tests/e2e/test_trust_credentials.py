"""SPEC §15 "Credentials" and bounded work, attacked through the real proxy.

The legitimate upstreams are real docker-registry processes (htpasswd, and token auth with
its token server); the "attacker registry" is a FakeUpstream that records every header it
receives. Everything listens on 127.0.0.1; the attacker is reachable because it is listed in
INSECURE_REGISTRIES (the SSRF guard exempts it), exactly as a public registry would be.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.harness import PASSWORD, USER, BuiltImage, Registry, TokenServer
from tests.harness.fakeupstream import Behaviour, FakeUpstream, filler
from tests.harness.images import MT_OCI_INDEX, MT_OCI_MANIFEST
from tests.harness.proxyproc import ProxyServer

pytestmark = pytest.mark.e2e
BASIC_ALICE = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
ACCEPT = {"Accept": f"{MT_OCI_INDEX}, {MT_OCI_MANIFEST}"}
ATTACKER_TOKEN = "attacker-anonymous-token"
MiB = 1024 * 1024
HUGE = 300 * MiB
RSS_BOUND = 16 * MiB


# -- the parties ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_upstream(
    tmp_path_factory: pytest.TempPathFactory, image: BuiltImage
) -> Iterator[Registry]:
    """The legitimate private registry: htpasswd, private/app pullable only by alice."""
    work = tmp_path_factory.mktemp("basic-upstream")
    with Registry(work, auth="htpasswd", users={USER: PASSWORD}) as registry:
        image.push(f"docker://{registry.host}/private/app:v1", creds=f"{USER}:{PASSWORD}")
        yield registry


def _attacker(kind: str) -> FakeUpstream:
    """A registry that harvests credentials: asks for Basic (accepting anything) or Bearer."""
    fake = FakeUpstream()
    realm = f"http://{fake.host}/token"

    def respond(method: str, path: str, headers: dict[str, str]) -> Behaviour | None:
        authorized = any(k.lower() == "authorization" for k in headers)
        if path == "/token":
            return Behaviour(body=json.dumps({"token": ATTACKER_TOKEN}).encode())
        if kind == "basic":
            if authorized:
                return Behaviour(body=b"{}")
            return Behaviour(status=401, headers={"WWW-Authenticate": 'Basic realm="evil"'})
        if authorized:
            return Behaviour(status=404, body=b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
        challenge = f'Bearer realm="{realm}",service="evil"'
        return Behaviour(status=401, headers={"WWW-Authenticate": challenge}, body=b"{}")

    fake.responder = respond
    return fake


@pytest.fixture(params=["basic", "bearer"])
def attacker(request: pytest.FixtureRequest) -> Iterator[FakeUpstream]:
    """The attacker's registry, in both flavours of challenge."""
    with _attacker(request.param) as fake:
        yield fake


def _authorizations(fake: FakeUpstream) -> list[tuple[str, str]]:
    """(path, Authorization) of every request that carried one."""
    return [
        (path, value)
        for _, path, headers in fake.received
        for key, value in headers.items()
        if key.lower() == "authorization"
    ]


def _leaked(fake: FakeUpstream) -> list[tuple[str, str]]:
    """Authorizations the attacker received other than the anonymous token it handed out."""
    return [(p, v) for p, v in _authorizations(fake) if v != f"Bearer {ATTACKER_TOKEN}"]


def _start(
    make_proxy: Callable[..., ProxyServer], legit: str, *others: str, **env: str
) -> ProxyServer:
    return make_proxy(
        {
            "UPSTREAM_REGISTRY": legit,
            "INSECURE_REGISTRIES": ",".join((legit, *others)),
            "TOKEN_SECRET": "e2e-trust-secret-0123456789",
            **env,
        }
    )


def _token(
    proxy: ProxyServer, *scopes: str, auth: tuple[str, str] | None = None
) -> requests.Response:
    return requests.get(
        f"{proxy.url}/v2/token",
        params={"service": "oci-pull-through", "scope": list(scopes)},
        auth=auth,
        timeout=20,
    )


# -- (a) the token endpoint -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["transparent", "authenticated"])
def test_token_request_sends_no_credentials_to_an_unlisted_registry(
    make_proxy: Callable[..., ProxyServer],
    basic_upstream: Registry,
    attacker: FakeUpstream,
    mode: str,
) -> None:
    """docker pull cache/attacker/x with one login per proxy host: the login stays home."""
    proxy = _start(make_proxy, basic_upstream.host, attacker.host, PROXY_MODE=mode)
    r = _token(proxy, f"repository:{attacker.host}/x/y:pull", auth=(USER, PASSWORD))
    assert r.status_code == 200, r.text
    assert attacker.received, "the attacker's challenge was learned"
    assert _leaked(attacker) == [], "credentials reached the attacker's /v2/ or realm"
    # The grant is anonymous: the proxy token sends nothing (or the realm's anonymous token).
    bearer = {"Authorization": f"Bearer {r.json()['token']}"}
    requests.get(f"{proxy.url}/v2/{attacker.host}/x/y/manifests/v1", headers=bearer, timeout=20)
    assert _leaked(attacker) == []
    # The same login in the same request still works for the listed registry.
    scopes = (f"repository:{attacker.host}/x/y:pull", "repository:private/app:pull")
    r = _token(proxy, *scopes, auth=(USER, PASSWORD))
    assert r.status_code == 200, r.text
    bearer = {"Authorization": f"Bearer {r.json()['token']}", **ACCEPT}
    r = requests.get(f"{proxy.url}/v2/private/app/manifests/v1", headers=bearer, timeout=20)
    assert r.status_code == 200, r.text
    requests.get(f"{proxy.url}/v2/{attacker.host}/x/y/manifests/v1", headers=bearer, timeout=20)
    assert _leaked(attacker) == []


# -- (b) registry requests --------------------------------------------------------------------


@pytest.mark.parametrize("form", ["path", "ns"])
@pytest.mark.parametrize("presented", ["raw-basic", "raw-bearer", "proxy-token"])
def test_registry_request_forwards_no_client_authorization_to_an_unlisted_registry(
    make_proxy: Callable[..., ProxyServer],
    basic_upstream: Registry,
    attacker: FakeUpstream,
    form: str,
    presented: str,
) -> None:
    """Whatever Authorization the client holds, an unlisted registry is asked anonymously."""
    proxy = _start(make_proxy, basic_upstream.host, attacker.host)
    if presented == "raw-basic":
        authorization = BASIC_ALICE
    elif presented == "raw-bearer":
        authorization = "Bearer some-other-registry-token"
    else:  # a proxy token obtained for the legitimate registry (and naming the attacker too)
        scopes = ("repository:private/app:pull", f"repository:{attacker.host}/x/y:pull")
        r = _token(proxy, *scopes, auth=(USER, PASSWORD))
        assert r.status_code == 200, r.text
        authorization = f"Bearer {r.json()['token']}"
        attacker.received.clear()
    if form == "path":
        url = f"{proxy.url}/v2/{attacker.host}/x/y/manifests/v1"
    else:
        url = f"{proxy.url}/v2/x/y/manifests/v1?ns={attacker.host}"
    for path in (url, url.replace("/manifests/v1", "/blobs/sha256:" + "a" * 64)):
        requests.get(path, headers={"Authorization": authorization, **ACCEPT}, timeout=20)
    assert any("/x/y/" in p for _, p, _ in attacker.received), "the request went upstream"
    assert _leaked(attacker) == [], "the client's Authorization reached the attacker"


# -- (c) listed registries keep working ------------------------------------------------------


def _configs(legit: str, attacker: str) -> dict[str, dict[str, str]]:
    return {
        "explicit": {"UPSTREAM_REGISTRY": "docker.io", "CREDENTIAL_REGISTRIES": legit},
        "default-upstream": {},
        "default-allowed": {
            "UPSTREAM_REGISTRY": "docker.io",
            "ALLOWED_REGISTRIES": f"{legit},127.0.0.*",
        },
    }


@pytest.mark.parametrize("how", ["explicit", "default-upstream", "default-allowed"])
def test_listed_registry_still_gets_the_credentials(
    make_proxy: Callable[..., ProxyServer],
    basic_upstream: Registry,
    token_upstream: tuple[Registry, TokenServer],
    how: str,
) -> None:
    """CREDENTIAL_REGISTRIES (or its default) keeps private pulls working, and only there."""
    token_registry, tokens = token_upstream
    token_host = tokens.url.split("//", 1)[1]
    with _attacker("basic") as attacker:
        for legit in (basic_upstream.host, token_registry.host):
            env = {
                "PROXY_MODE": "authenticated",  # every request is checked upstream
                "UPSTREAM_REGISTRY": legit,
                "INSECURE_REGISTRIES": f"{legit},{token_host},{attacker.host}",
                "TOKEN_SECRET": "e2e-trust-secret-0123456789",
                **_configs(legit, attacker.host)[how],
            }
            proxy = make_proxy(env)
            repo = f"{legit}/private/app"
            scopes = (f"repository:{repo}:pull", f"repository:{attacker.host}/x/y:pull")
            r = _token(proxy, *scopes, auth=(USER, PASSWORD))
            assert r.status_code == 200, r.text
            bearer = {"Authorization": f"Bearer {r.json()['token']}", **ACCEPT}
            r = requests.get(f"{proxy.url}/v2/{repo}/manifests/v1", headers=bearer, timeout=20)
            assert r.status_code == 200, (legit, r.text)
            r = requests.get(f"{proxy.url}/v2/{repo}/manifests/v1", headers=ACCEPT, timeout=20)
            assert r.status_code == 401, "anonymous is still refused"
            if legit == basic_upstream.host:
                raw = {"Authorization": BASIC_ALICE, **ACCEPT}
                r = requests.get(f"{proxy.url}/v2/{repo}/manifests/v1", headers=raw, timeout=20)
                assert r.status_code == 200, "a raw Basic header still goes to a listed registry"
            r = requests.get(
                f"{proxy.url}/v2/{attacker.host}/x/y/manifests/v1", headers=bearer, timeout=20
            )
            proxy.stop()
        assert _leaked(attacker) == []


def test_credentials_do_not_follow_a_redirect_to_another_host(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    """A listed registry that redirects a blob elsewhere: the Authorization stays behind."""
    with FakeUpstream() as elsewhere:
        digest = "sha256:" + "c" * 64
        fake.routes[f"/v2/org/app/blobs/{digest}"] = Behaviour(
            status=307, headers={"Location": f"http://{elsewhere.host}/blob?sig=1"}
        )
        elsewhere.routes["/blob"] = Behaviour(body=b"not-the-blob")
        proxy = make_proxy(
            {
                "UPSTREAM_REGISTRY": fake.host,
                "INSECURE_REGISTRIES": f"{fake.host},{elsewhere.host}",
            }
        )
        r = requests.get(
            f"{proxy.url}/v2/org/app/blobs/{digest}",
            headers={"Authorization": BASIC_ALICE},
            timeout=20,
        )
        assert r.status_code == 200
        assert _authorizations(fake) == [(f"/v2/org/app/blobs/{digest}", BASIC_ALICE)]
        assert elsewhere.received and _authorizations(elsewhere) == []


# -- (d) bounded work ---------------------------------------------------------------------------


def _memory(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def _growth(proxy: ProxyServer, action: Callable[[], int]) -> tuple[int, int]:
    """(status the action saw, largest growth of a worker's peak RSS in bytes).

    The peak (VmHWM), not VmRSS afterwards: a body read whole and freed again leaves VmRSS
    where it was, but not the peak the worker needed while holding it.
    """
    pids = proxy.worker_pids()
    assert pids
    before = {pid: (_memory(pid, "VmHWM"), _memory(pid, "VmRSS")) for pid in pids}
    status = action()
    time.sleep(0.2)
    for pid in pids:
        rss = (_memory(pid, "VmRSS") - before[pid][1]) / MiB
        print(f"worker {pid}: VmRSS {rss:+.1f} MiB after the request")
    return status, max(_memory(pid, "VmHWM") - before[pid][0] for pid in pids)


def _status(url: str) -> Callable[[], int]:
    def run() -> int:
        with requests.get(url, headers=ACCEPT, stream=True, timeout=120) as r:
            return r.status_code

    return run


@pytest.fixture
def bounded_proxy(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> Callable[..., ProxyServer]:
    """One gunicorn worker, so the worker measured is the one that did the work."""

    def start(mode: str = "transparent") -> ProxyServer:
        return make_proxy(
            {
                "PROXY_MODE": mode,
                "UPSTREAM_REGISTRY": fake.host,
                "INSECURE_REGISTRIES": fake.host,
                "WEB_CONCURRENCY": "1",
                "TOKEN_SECRET": "e2e-trust-secret-0123456789",
            }
        )

    return start


@pytest.mark.parametrize("length", ["content-length", "close-delimited"])
def test_huge_401_body_is_a_clean_502_and_memory_stays_flat(
    bounded_proxy: Callable[..., ProxyServer], fake: FakeUpstream, length: str
) -> None:
    """A 300 MiB 401 body (kept for forwarding after the token retry) is capped at 64 KiB."""
    challenge = {"WWW-Authenticate": f'Bearer realm="http://{fake.host}/token",service="s"'}
    fake.routes["/token"] = Behaviour(body=b'{"token": "t"}')
    fake.routes["/v2/small/app/manifests/v1"] = Behaviour(status=401, headers=challenge, body=b"{}")
    fake.routes["/v2/big/app/manifests/v1"] = Behaviour(
        status=401,
        headers=challenge,
        stream=lambda: filler(HUGE),
        stream_length=HUGE if length == "content-length" else None,
    )
    proxy = bounded_proxy()
    warm = _status(f"{proxy.url}/v2/small/app/manifests/v1")
    assert warm() == 401 and warm() == 401
    status, grown = _growth(proxy, _status(f"{proxy.url}/v2/big/app/manifests/v1"))
    print(f"huge 401 body ({length}): status {status}, worker peak RSS +{grown / MiB:.1f} MiB")
    assert (status, grown < RSS_BOUND) == (502, True), f"{status}, +{grown / MiB:.1f} MiB"
    assert warm() == 401, "the worker still serves"


def _token_realm(fake: FakeUpstream, huge: bool) -> None:
    """fake asks for Bearer tokens from /realm, whose answer is small or 300 MiB of JSON."""
    challenge = {"WWW-Authenticate": f'Bearer realm="http://{fake.host}/realm",service="s"'}
    fake.routes["/v2/"] = Behaviour(status=401, headers=challenge, body=b"{}")
    for repo in ("warm", "tok"):
        fake.routes[f"/v2/{repo}/app/manifests/v1"] = Behaviour(
            status=401, headers=challenge, body=b"{}"
        )
    if not huge:
        fake.routes["/realm"] = Behaviour(body=b'{"token": "t"}')
        return
    fake.routes["/realm"] = Behaviour(
        body=b'{"token": "',
        stream=lambda: itertools.chain(filler(HUGE), [b'"}']),
        stream_length=HUGE + 2,
    )


def test_huge_anonymous_token_answer_is_a_failed_fetch_and_memory_stays_flat(
    bounded_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    """The anonymous token dance reads at most 1 MiB of a token answer."""
    _token_realm(fake, huge=False)
    proxy = bounded_proxy()
    warm = _status(f"{proxy.url}/v2/warm/app/manifests/v1")
    assert warm() == 401 and warm() == 401
    _token_realm(fake, huge=True)
    status, grown = _growth(proxy, _status(f"{proxy.url}/v2/tok/app/manifests/v1"))
    print(f"huge anonymous token answer: status {status}, worker peak RSS +{grown / MiB:.1f} MiB")
    assert (status, grown < RSS_BOUND) == (401, True), f"{status}, +{grown / MiB:.1f} MiB"
    assert any(p.startswith("/realm") for _, p in fake.requests[-3:]), "the realm was asked"


def test_huge_token_answer_at_the_token_endpoint_is_a_clean_502_and_memory_stays_flat(
    bounded_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    """The token proxy reads at most 1 MiB of the upstream realm's answer."""
    _token_realm(fake, huge=False)
    proxy = bounded_proxy("authenticated")
    warm = _status(f"{proxy.url}/v2/token?scope=repository:warm/app:pull")
    assert warm() == 200 and warm() == 200
    _token_realm(fake, huge=True)
    url = f"{proxy.url}/v2/token?scope=repository:tok/app:pull"
    status, grown = _growth(proxy, _status(url))
    print(
        f"huge token answer at /v2/token: status {status}, worker peak RSS +{grown / MiB:.1f} MiB"
    )
    assert (status, grown < RSS_BOUND) == (502, True), f"{status}, +{grown / MiB:.1f} MiB"


# -- (e) token requests are bounded ---------------------------------------------------------


def test_token_request_with_too_many_scopes_or_registries_is_400(
    make_proxy: Callable[..., ProxyServer], basic_upstream: Registry, fake: FakeUpstream
) -> None:
    """At most 10 scopes and 5 registries per token request, refused before any upstream I/O."""
    proxy = _start(make_proxy, basic_upstream.host, fake.host)
    eleven = [f"repository:private/app{i}:pull" for i in range(11)]
    six = [f"repository:reg{i}.example/org/app:pull" for i in range(6)]
    for scopes in (eleven, six):
        r = _token(proxy, *scopes, auth=(USER, PASSWORD))
        assert r.status_code == 400, r.text
        error = r.json()["errors"][0]
        assert error["code"] == "DENIED" and error["message"], error
    ten = [f"repository:private/app{i}:pull" for i in range(10)]
    assert _token(proxy, *ten, auth=(USER, PASSWORD)).status_code == 200
    five = [f"repository:{fake.host}/org/app{i}:pull" for i in range(5)]
    five[0] = "repository:private/app:pull"
    five += [f"repository:{fake.host}/org/x:pull", "repository:private/app:pull"]
    assert _token(proxy, *five, auth=(USER, PASSWORD)).status_code == 200
    assert fake.received, "two registries named, both asked"
