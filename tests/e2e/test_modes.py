"""Every row of both SPEC §5 tables, against a real upstream that is stopped where a row says so."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.harness import PASSWORD, USER, BuiltImage, Registry, TokenServer
from tests.harness.images import EVERY_MANIFEST_TYPE
from tests.harness.proxyproc import ProxyServer

pytestmark = pytest.mark.e2e
ACCEPT = {"Accept": ", ".join(EVERY_MANIFEST_TYPE)}


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def _token(tokens: TokenServer, repo: str, creds: tuple[str, str] | None) -> str:
    r = requests.get(
        tokens.realm,
        params={"service": tokens.service, "scope": f"repository:{repo}:pull"},
        auth=creds,
        timeout=10,
    )
    r.raise_for_status()
    return r.json()["token"]


def _proxy_for(
    make_proxy: Callable[..., ProxyServer], registry: Registry, tokens: TokenServer, mode: str
) -> ProxyServer:
    token_host = tokens.url.split("//", 1)[1]
    return make_proxy(
        {
            "PROXY_MODE": mode,
            "UPSTREAM_REGISTRY": registry.host,
            "INSECURE_REGISTRIES": f"{registry.host},{token_host}",
        }
    )


def _alice(tokens: TokenServer) -> dict[str, str]:
    """Authorization with a token for the private repository, as the user allowed to pull it."""
    return {"Authorization": f"Bearer {_token(tokens, 'private/app', (USER, PASSWORD))}"}


@contextlib.contextmanager
def _stopped(registry: Registry) -> Iterator[None]:
    """The upstream is unreachable for the duration (the rows that say so)."""
    registry.stop()
    try:
        yield
    finally:
        registry.start()


def _layer(image: BuiltImage) -> str:
    return image.platform("linux/amd64").layers[-1].digest


# -- transparent ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["transparent", "authenticated"])
def test_v2_answers_the_proxy_challenge_with_upstream_up_or_down(
    make_proxy: Callable[..., ProxyServer],
    token_upstream: tuple[Registry, TokenServer],
    session: requests.Session,
    mode: str,
) -> None:
    """SPEC §12 supersedes the §5 /v2/ rows: the check is answered by the proxy itself."""
    registry, tokens = token_upstream
    proxy = _proxy_for(make_proxy, registry, tokens, mode)
    for upstream_up in (True, False):
        if not upstream_up:
            registry.stop()
        try:
            r = session.get(f"{proxy.url}/v2/", timeout=10)
            assert r.status_code == 401
            assert r.headers["WWW-Authenticate"].startswith(
                f'Bearer realm="{proxy.url}/v2/token",service="oci-pull-through"'
            )
            assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
            r = session.get(f"{proxy.url}/v2/", headers={"Authorization": "Bearer x"}, timeout=10)
            assert r.status_code == 200
        finally:
            if not upstream_up:
                registry.start()


def test_transparent_hits_ignore_authorization_and_survive_upstream_outage(
    make_proxy: Callable[..., ProxyServer],
    token_upstream: tuple[Registry, TokenServer],
    image: BuiltImage,
    session: requests.Session,
) -> None:
    """Miss (upstream up): forwarded with the client's credentials and filled; then HEAD and
    GET hits are served from cache with any Authorization, even with upstream stopped."""
    registry, tokens = token_upstream
    proxy = _proxy_for(make_proxy, registry, tokens, "transparent")
    layer = _layer(image)
    bearer = _alice(tokens)
    base = f"{proxy.url}/v2/private/app"
    r = session.get(f"{base}/blobs/{layer}", headers=bearer, timeout=10)
    assert r.status_code == 200 and r.content == image.all_blobs()[layer].data
    r = session.get(f"{base}/manifests/v1", headers={**bearer, **ACCEPT}, timeout=10)
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == image.ref_digest
    assert proxy.wait_cached([layer]) == []
    with _stopped(registry):
        garbage = {"Authorization": "Bearer not-a-token"}
        r = session.head(f"{base}/blobs/{layer}", headers=garbage, timeout=10)
        assert r.status_code == 200
        assert int(r.headers["Content-Length"]) == image.all_blobs()[layer].size
        assert r.headers["Docker-Content-Digest"] == layer
        r = session.get(f"{base}/blobs/{layer}", headers=garbage, timeout=10)
        assert r.status_code == 200 and r.content == image.all_blobs()[layer].data
        assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        r = session.get(f"{base}/manifests/v1", headers=ACCEPT, timeout=10)
        assert r.status_code == 200 and r.content == image.top.data
        # the 28-day tag lifetime, counting down from when it was stored (SPEC §13)
        scope, _, age = r.headers["Cache-Control"].partition(", max-age=")
        assert scope == "public" and 2419200 - 120 <= int(age) <= 2419200
        r = session.head(f"{base}/manifests/{image.ref_digest}", timeout=10)
        assert r.status_code == 200, "the tag's manifest is stored under its digest too"
        # miss, upstream down: 502 naming the registry
        missing = "sha256:" + "0" * 64
        r = session.get(f"{base}/blobs/{missing}", timeout=10)
        assert r.status_code == 502
        assert registry.host in r.json()["errors"][0]["message"]


def test_transparent_miss_forwards_client_credentials(
    make_proxy: Callable[..., ProxyServer],
    token_upstream: tuple[Registry, TokenServer],
    image: BuiltImage,
    session: requests.Session,
) -> None:
    """Without credentials the private repository is refused; with them it is served."""
    registry, tokens = token_upstream
    proxy = _proxy_for(make_proxy, registry, tokens, "transparent")
    url = f"{proxy.url}/v2/private/app/manifests/{image.ref_digest}"
    assert session.get(url, headers=ACCEPT, timeout=10).status_code == 401
    bearer = _alice(tokens)
    r = session.get(url, headers={**bearer, **ACCEPT}, timeout=10)
    assert r.status_code == 200 and r.content == image.top.data


# -- authenticated ----------------------------------------------------------------------------


def test_authenticated_head_always_forwarded(
    make_proxy: Callable[..., ProxyServer],
    token_upstream: tuple[Registry, TokenServer],
    image: BuiltImage,
    session: requests.Session,
) -> None:
    registry, tokens = token_upstream
    proxy = _proxy_for(make_proxy, registry, tokens, "authenticated")
    layer = _layer(image)
    bearer = _alice(tokens)
    url = f"{proxy.url}/v2/private/app/blobs/{layer}"
    assert session.get(url, headers=bearer, timeout=10).status_code == 200
    assert proxy.wait_cached([layer]) == []
    mark = registry.mark()
    assert session.head(url, headers=bearer, timeout=10).status_code == 200
    registry.wait_for_requests(
        lambda es: any(e.method == "HEAD" and layer in e.path for e in es), since=mark
    )
    assert session.head(url, timeout=10).status_code == 401, "cache not consulted for HEAD"
    with _stopped(registry):
        assert session.head(url, headers=bearer, timeout=10).status_code == 502


def test_authenticated_get_hit_checks_upstream_first(
    make_proxy: Callable[..., ProxyServer],
    token_upstream: tuple[Registry, TokenServer],
    image: BuiltImage,
    session: requests.Session,
) -> None:
    """200 -> served from cache; 401 -> forwarded; 404 -> forwarded; unreachable -> 502."""
    registry, tokens = token_upstream
    proxy = _proxy_for(make_proxy, registry, tokens, "authenticated")
    layer = _layer(image)
    data = image.all_blobs()[layer].data
    bearer = _alice(tokens)
    url = f"{proxy.url}/v2/private/app/blobs/{layer}"
    r = session.get(url, headers=bearer, timeout=10)  # GET miss: forwarded and filled
    assert r.status_code == 200 and r.content == data
    assert proxy.wait_cached([layer]) == []

    mark = registry.mark()
    r = session.get(url, headers=bearer, timeout=10)
    assert r.status_code == 200 and r.content == data
    assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    log = registry.wait_for_requests(
        lambda es: any(e.method == "HEAD" and layer in e.path for e in es), since=mark
    )
    assert [e for e in log if e.method == "GET" and layer in e.path] == [], "body from cache"

    # 401: a client the upstream rejects never gets the cached bytes
    r = session.get(url, timeout=10)
    assert r.status_code == 401 and data not in r.content
    r = session.get(url, headers={"Authorization": "Bearer forged"}, timeout=10)
    assert r.status_code == 401 and data not in r.content

    # 404: the blob is cached (keyed by digest) but not in this repository upstream
    anon_public = {"Authorization": f"Bearer {_token(tokens, 'public/other', None)}"}
    r = session.get(f"{proxy.url}/v2/public/other/blobs/{layer}", headers=anon_public, timeout=10)
    assert r.status_code == 404 and data not in r.content

    with _stopped(registry):
        r = session.get(url, headers=bearer, timeout=10)
        assert r.status_code == 502


def test_authenticated_cached_tag_is_checked_and_served(
    make_proxy: Callable[..., ProxyServer],
    token_upstream: tuple[Registry, TokenServer],
    image: BuiltImage,
    session: requests.Session,
) -> None:
    registry, tokens = token_upstream
    proxy = _proxy_for(make_proxy, registry, tokens, "authenticated")
    bearer = _alice(tokens)
    url = f"{proxy.url}/v2/private/app/manifests/v1"
    assert session.get(url, headers={**bearer, **ACCEPT}, timeout=10).status_code == 200
    mark = registry.mark()
    r = session.get(url, headers={**bearer, **ACCEPT}, timeout=10)
    assert r.status_code == 200 and r.content == image.top.data
    log = registry.wait_for_requests(
        lambda es: any(e.method == "HEAD" and "/manifests/v1" in e.path for e in es), since=mark
    )
    assert [e for e in log if e.method == "GET"] == []
    assert session.get(url, headers=ACCEPT, timeout=10).status_code == 401
