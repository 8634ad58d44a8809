"""SPEC §12 with real clients: skopeo, containerd's ctr and oras-py, through the token proxy.

Upstreams (port-less aliases on port 80): anonymous (upstream.test), htpasswd with bcrypt
(upstream2.test) and token auth (upstream3.test). Every client x upstream x mode x
addressing form where it makes sense; each cell starts from a cold cache.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.harness import (
    PASSWORD,
    USER,
    BuiltImage,
    Registry,
    TokenServer,
    ensure_alias,
    skopeo_pull,
    verify_pulled,
)
from tests.harness.containerd import Containerd, write_mirror
from tests.harness.oras_client import OrasPullError, oras_pull
from tests.harness.proxyproc import ProxyServer

pytestmark = pytest.mark.e2e
ANON, BASIC, TOKEN = "upstream.test", "upstream2.test", "upstream3.test"
ADDRESSES = {ANON: "127.0.0.2", BASIC: "127.0.0.3", TOKEN: "127.0.0.4"}
GOOD, WRONG = f"{USER}:{PASSWORD}", f"{USER}:not-the-password"
SECRET = "e2e-token-secret-0123456789"


@dataclass(frozen=True)
class Case:
    """One pull: which repository, which credentials, whether it must succeed."""

    upstream: str
    repo: str
    creds: str | None
    ok: bool

    @property
    def id(self) -> str:
        who = {None: "anon", GOOD: "creds", WRONG: "wrong"}[self.creds]
        return f"{self.upstream.split('.')[0]}-{self.repo.split('/')[0]}-{who}"


CASES = [
    Case(ANON, "public/app", None, True),
    Case(BASIC, "private/app", GOOD, True),
    Case(BASIC, "private/app", None, False),
    Case(BASIC, "private/app", WRONG, False),
    Case(TOKEN, "public/app", None, True),
    Case(TOKEN, "private/app", GOOD, True),
    Case(TOKEN, "private/app", None, False),
    Case(TOKEN, "private/app", WRONG, False),
]
FORMS = {
    "skopeo": ("path", "hostless"),
    "ctr": ("path", "ns", "hostless"),
    "oras": ("path", "hostless"),
}
CELLS = [
    pytest.param(client, form, case, id=f"{client}-{form}-{case.id}")
    for client, forms in FORMS.items()
    for form in forms
    for case in CASES
]


@dataclass
class World:
    """The module's upstreams, token server, proxies and containerd."""

    registries: dict[str, Registry]
    tokens: TokenServer
    containerd: Containerd
    workdir: Path
    proxies: dict[tuple[str, str], ProxyServer]

    def proxy(self, mode: str, default: str = ANON) -> ProxyServer:
        """A running proxy in this mode whose UPSTREAM_REGISTRY is `default` (started once)."""
        key = (mode, default)
        if key not in self.proxies:
            insecure = [*self.registries, self.tokens.url.split("//", 1)[1]]
            env = {
                "PROXY_MODE": mode,
                "UPSTREAM_REGISTRY": default,
                "INSECURE_REGISTRIES": ",".join(insecure),
                # §15: path-encoded upstreams other than UPSTREAM_REGISTRY get credentials
                # only when listed
                "CREDENTIAL_REGISTRIES": ",".join(self.registries),
                "TOKEN_SECRET": SECRET,
                "CACHE_LATEST_TAG": "true",
            }
            name = f"proxy-{mode}-{default.split('.')[0]}"
            self.proxies[key] = ProxyServer(self.workdir / name, env).start()
        return self.proxies[key]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, image: BuiltImage) -> Iterator[World]:
    work = tmp_path_factory.mktemp("token-proxy")
    for alias, ip in ADDRESSES.items():
        ensure_alias(alias, ip)
    tokens = TokenServer(
        work / "tokens",
        users={USER: PASSWORD},
        acl={USER: {"*": ["*"]}},
        anonymous_pull=["public/*"],
    ).start()
    registries: dict[str, Registry] = {}
    containerd = Containerd(work / "containerd")
    world = World(registries, tokens, containerd, work, {})
    try:
        for alias, auth in ((ANON, "anonymous"), (BASIC, "htpasswd"), (TOKEN, "token")):
            registry = Registry(
                work / alias,
                host=ADDRESSES[alias],
                port=80,
                hostname=alias,
                auth=auth,  # type: ignore[arg-type]
                users={USER: PASSWORD} if auth == "htpasswd" else None,
                token_server=tokens if auth == "token" else None,
            ).start()
            registries[alias] = registry
            repos = ("public/app",) if auth == "anonymous" else ("public/app", "private/app")
            for repo in repos:
                creds = None if auth == "anonymous" else GOOD
                image.push(f"docker://{registry.host}/{repo}:v1", creds=creds)
        containerd.start()
        yield world
    finally:
        for proxy in world.proxies.values():
            proxy.stop()
        containerd.stop()
        for registry in registries.values():
            registry.stop()
        tokens.stop()


def _clear_cache(proxy: ProxyServer) -> None:
    for part in ("blobs", "manifests"):
        shutil.rmtree(proxy.fs_root / part, ignore_errors=True)


def _pull(
    world: World, client: str, form: str, case: Case, proxy: ProxyServer, dest: Path
) -> tuple[bool, str]:
    """Pull the case's image with one client; (succeeded, what it said)."""
    repo = case.repo if form in ("ns", "hostless") else f"{case.upstream}/{case.repo}"
    if client == "skopeo":
        proc = skopeo_pull(f"docker://{proxy.host}/{repo}:v1", dest, creds=case.creds)
        return proc.returncode == 0, proc.stderr
    if client == "ctr":
        if form == "ns":
            hosts = dest / "hosts"
            # the real registry is unreachable from this config: only the mirror can answer
            write_mirror(hosts, case.upstream, f"http://{proxy.host}", "http://127.0.0.1:9")
            proc = world.containerd.pull(
                f"{case.upstream}/{repo}:v1", user=case.creds, hosts_dir=hosts
            )
        else:
            proc = world.containerd.pull(f"{proxy.host}/{repo}:v1", user=case.creds)
        return proc.returncode == 0, f"namespace={proc.args[4]} {proc.stdout}{proc.stderr}"
    creds = tuple(case.creds.split(":", 1)) if case.creds else None
    try:
        oras_pull(proxy.host, repo, "v1", dest, creds)  # type: ignore[arg-type]
    except OrasPullError as exc:
        return False, str(exc)
    return True, ""


@pytest.mark.parametrize("mode", ["transparent", "authenticated"])
@pytest.mark.parametrize(("client", "form", "case"), CELLS)
def test_matrix(
    world: World, image: BuiltImage, tmp_path: Path, mode: str, client: str, form: str, case: Case
) -> None:
    """Public pulls anonymously; private only with the right credentials; wrong ones are 401."""
    proxy = world.proxy(mode, case.upstream if form == "hostless" else ANON)
    _clear_cache(proxy)
    ok, said = _pull(world, client, form, case, proxy, tmp_path / "pulled")
    assert ok == case.ok, said
    if not ok:
        assert "401" in said or "unauthorized" in said.lower(), said
    elif client == "skopeo":
        verify_pulled(tmp_path / "pulled", image)
    elif client == "ctr":
        amd64 = image.platform("linux/amd64")
        wanted = {amd64.manifest_digest, *(b.digest for b in amd64.blobs())}
        assert wanted <= world.containerd.content_digests(said.split("namespace=", 1)[1].split()[0])


def _proxy_token(proxy: ProxyServer, scope: str, creds: tuple[str, str] | None = None) -> str:
    r = requests.get(
        f"{proxy.url}/v2/token",
        params={"service": "oci-pull-through", "scope": scope},
        auth=creds,
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return r.json()["token"]


@pytest.mark.parametrize("upstream", [BASIC, TOKEN])
def test_authenticated_cached_private_blob_never_served_to_rejected_clients(
    world: World, image: BuiltImage, tmp_path: Path, upstream: str
) -> None:
    proxy = world.proxy("authenticated")
    registry = world.registries[upstream]
    _clear_cache(proxy)
    src = f"docker://{proxy.host}/{upstream}/private/app:v1"
    proc = skopeo_pull(src, tmp_path / "alice", creds=GOOD)
    assert proc.returncode == 0, proc.stderr
    layer = image.platform("linux/amd64").layers[-1]
    assert proxy.wait_cached([layer.digest]) == []

    scope = f"repository:{upstream}/private/app:pull"
    anonymous = _proxy_token(proxy, scope)
    url = f"{proxy.url}/v2/{upstream}/private/app/blobs/{layer.digest}"
    mark = registry.mark()
    for headers in ({}, {"Authorization": f"Bearer {anonymous}"}, {"Authorization": "Bearer x"}):
        r = requests.get(url, headers=headers, timeout=10)
        assert r.status_code == 401 and layer.data not in r.content
        challenge = r.headers["WWW-Authenticate"]
        assert f'realm="{proxy.url}/v2/token"' in challenge and f'scope="{scope}"' in challenge
    log = registry.wait_for_requests(
        lambda es: sum(e.method == "HEAD" and layer.digest in e.path for e in es) >= 3, since=mark
    )
    assert {e.status for e in log if layer.digest in e.path} == {401}, "upstream refused each"
    r = requests.get(f"{proxy.url}/v2/token", params={"scope": scope}, auth=(USER, "nope"))
    assert r.status_code == 401
    proc = skopeo_pull(src, tmp_path / "anon")
    assert proc.returncode != 0 and "unauthorized" in proc.stderr.lower()

    alice = _proxy_token(proxy, scope, (USER, PASSWORD))
    r = requests.get(url, headers={"Authorization": f"Bearer {alice}"}, timeout=10)
    assert r.status_code == 200 and r.content == layer.data
    assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable", "from cache"


def test_transparent_upstream_stopped_clients_pull_again_from_cache(
    world: World, image: BuiltImage, tmp_path: Path
) -> None:
    proxy = world.proxy("transparent")
    _clear_cache(proxy)
    repo = f"{TOKEN}/private/app"
    creds = (USER, PASSWORD)
    proc = skopeo_pull(f"docker://{proxy.host}/{repo}:v1", tmp_path / "s1", creds=GOOD)
    assert proc.returncode == 0, proc.stderr
    assert world.containerd.pull(f"{proxy.host}/{repo}:v1", user=GOOD).returncode == 0
    oras_pull(proxy.host, repo, "v1", tmp_path / "o1", creds)
    assert proxy.wait_cached(image.blobs()) == []
    world.registries[TOKEN].stop()
    world.tokens.stop()  # the upstream and its token service are both gone
    try:
        proc = skopeo_pull(f"docker://{proxy.host}/{repo}:v1", tmp_path / "s2", creds=GOOD)
        assert proc.returncode == 0, proc.stderr
        verify_pulled(tmp_path / "s2", image)
        proc = world.containerd.pull(f"{proxy.host}/{repo}:v1", user=GOOD)
        assert proc.returncode == 0, proc.stderr
        oras_pull(proxy.host, repo, "v1", tmp_path / "o2", creds)
        r = requests.get(f"{proxy.url}/v2/token", params={"scope": f"repository:{repo}:pull"})
        assert r.status_code == 200, "transparent: anonymous proxy token while upstream is down"
        keep = ("PROXY_MODE", "UPSTREAM_REGISTRY", "INSECURE_REGISTRIES", "TOKEN_SECRET")
        env = {k: world.proxy("authenticated").env[k] for k in keep}
        with ProxyServer(tmp_path / "fresh", env) as fresh:  # no pooled connection, no memo
            status, _ = _challenge(f"{fresh.url}/v2/token?scope=repository:{repo}:pull")
        assert status == 502, "authenticated: upstream unreachable"
    finally:
        world.tokens.start()
        world.registries[TOKEN].start()


def test_one_token_for_scopes_on_several_upstreams(world: World, image: BuiltImage) -> None:
    proxy = world.proxy("authenticated")
    scopes = [f"repository:{u}/private/app:pull" for u in (BASIC, TOKEN)]
    scopes.append(f"repository:{ANON}/public/app:pull")
    r = requests.get(
        f"{proxy.url}/v2/token", params={"scope": scopes}, auth=(USER, PASSWORD), timeout=10
    )
    assert r.status_code == 200
    bearer = {"Authorization": f"Bearer {r.json()['token']}"}
    digest = image.ref_digest
    accept = {"Accept": "application/vnd.oci.image.index.v1+json"}
    for repo in (f"{BASIC}/private/app", f"{TOKEN}/private/app", f"{ANON}/public/app"):
        r = requests.get(
            f"{proxy.url}/v2/{repo}/manifests/{digest}", headers={**bearer, **accept}, timeout=10
        )
        assert r.status_code == 200 and r.content == image.top.data, repo


def test_containerd_uses_oauth2_post_and_realm_carries_ns(world: World, tmp_path: Path) -> None:
    proxy = world.proxy("authenticated")
    hosts = tmp_path / "hosts"
    write_mirror(hosts, TOKEN, f"http://{proxy.host}", "http://127.0.0.1:9")
    proc = world.containerd.pull(f"{TOKEN}/private/app:v1", user=GOOD, hosts_dir=hosts)
    assert proc.returncode == 0, proc.stderr
    assert f"POST {TOKEN}/private/app token - 200" in proxy.log()
    r = requests.get(f"{proxy.url}/v2/private/app/manifests/v1?ns={TOKEN}", timeout=10)
    assert r.status_code == 401
    assert f'realm="{proxy.url}/v2/token?ns={TOKEN}"' in r.headers["WWW-Authenticate"]


def _challenge(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """Status and WWW-Authenticate of GET url (the response is dropped: gunicorn's graceful
    stop would otherwise wait for its keep-alive connection)."""
    with requests.get(url, headers=headers, timeout=10) as r:
        return r.status_code, r.headers.get("WWW-Authenticate", "")


@pytest.mark.parametrize("server", ["gunicorn", "flask"])
def test_v2_challenge_public_url_from_trusted_forwarded_headers(
    world: World, tmp_path: Path, server: str
) -> None:
    env = {"PROXY_MODE": "transparent", "UPSTREAM_REGISTRY": ANON, "INSECURE_REGISTRIES": ANON}
    fwd = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "cache.example.com"}
    with ProxyServer(tmp_path / "p", env, server=server) as proxy:
        assert _challenge(f"{proxy.url}/v2/") == (
            401,
            f'Bearer realm="{proxy.url}/v2/token",service="oci-pull-through"',
        )
        status, challenge = _challenge(f"{proxy.url}/v2/", fwd)
        assert 'realm="https://cache.example.com/v2/token"' in challenge
        assert _challenge(f"{proxy.url}/v2/", {"Authorization": "Bearer x"})[0] == 200
    env["FORWARDED_ALLOW_IPS"] = "10.9.9.9"
    env["PUBLIC_URL"] = "https://cache.internal:8443"
    with ProxyServer(tmp_path / "q", env, server=server) as proxy:
        challenge = _challenge(f"{proxy.url}/v2/", fwd)[1]
        assert 'realm="https://cache.internal:8443/v2/token"' in challenge
    del env["PUBLIC_URL"]
    with ProxyServer(tmp_path / "r", env, server=server) as proxy:
        challenge = _challenge(f"{proxy.url}/v2/", fwd)[1]
        assert f'realm="{proxy.url}/v2/token"' in challenge, "untrusted peer"
