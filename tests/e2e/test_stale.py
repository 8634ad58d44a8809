"""Stale tags that users can rely on (issue 14, item 5): served on 429, 5xx and timeouts,
on 404 only when asked to, revalidated in the background without delaying anyone, and
never in authenticated mode (§15)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import requests

from tests.harness.fakeupstream import Behaviour, FakeUpstream
from tests.harness.images import EVERY_MANIFEST_TYPE
from tests.harness.proxyproc import ProxyServer
from tests.harness.scrape import metric

pytestmark = pytest.mark.e2e
ACCEPT = {"Accept": ", ".join(EVERY_MANIFEST_TYPE)}
REPO, TAG = "e2e/app", "v1"
PATH = f"/v2/{REPO}/manifests/{TAG}"
REVALIDATIONS = "oci_tag_revalidations_total"


def _proxy(make_proxy: Callable[..., ProxyServer], fake: FakeUpstream, **env: str) -> ProxyServer:
    return make_proxy(
        {
            "UPSTREAM_REGISTRY": fake.host,
            "INSECURE_REGISTRIES": fake.host,
            "TAG_TTL": "1s",
            "UPSTREAM_READ_TIMEOUT": "1",
            **env,
        }
    )


def _get(proxy: ProxyServer, **headers: str) -> requests.Response:
    return requests.get(f"{proxy.url}{PATH}", headers={**ACCEPT, **headers}, timeout=30)


def _primed(proxy: ProxyServer, digest: str) -> None:
    """Cache the tag, then let it go stale."""
    r = _get(proxy)
    assert r.status_code == 200, r.text
    assert r.headers["Docker-Content-Digest"] == digest
    assert "Age" not in r.headers, "a miss is not stale"
    time.sleep(1.5)


def _age(r: requests.Response) -> int:
    assert "Age" in r.headers, f"a stale answer carries Age: {dict(r.headers)}"
    return int(r.headers["Age"])


def test_stale_tag_is_served_on_429_503_and_timeout_with_age(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    digest, data = fake.manifest(REPO, TAG, "old")
    proxy = _proxy(make_proxy, fake)
    _primed(proxy, digest)
    failures = {
        "429": Behaviour(status=429, headers={"Retry-After": "3600"}),
        "503": Behaviour(status=503),
        "timeout": Behaviour(status=200, stall_before_headers=5.0),
    }
    for count, (name, behaviour) in enumerate(failures.items(), start=1):
        fake.routes[PATH] = behaviour
        started = time.monotonic()
        r = _get(proxy)
        assert r.status_code == 200, (name, r.text)
        assert r.headers["Docker-Content-Digest"] == digest, name
        assert r.content == data, name
        assert r.headers["Cache-Control"] == "public, max-age=0", name
        assert _age(r) >= 1, name
        assert time.monotonic() - started < 15, name
        assert metric(proxy, REVALIDATIONS, result="stale served") == count, name
    assert fake.count("HEAD", PATH) >= 3, "each was a real revalidation"
    assert fake.count("GET", PATH) == 1, "the stale copy is never replaced by an error"
    log = proxy.log()
    assert "upstream answered 429 to its HEAD; serving the cached copy" in log
    assert "upstream answered 503 to its HEAD; serving the cached copy" in log
    assert "timed out; serving the cached copy" in log


def test_404_is_forwarded_by_default_and_stale_only_when_enabled(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    digest, _ = fake.manifest(REPO, TAG, "old")
    default = _proxy(make_proxy, fake)
    opted_in = _proxy(make_proxy, fake, SERVE_STALE_ON_404="true")
    _primed(default, digest)
    _primed(opted_in, digest)
    del fake.routes[PATH]  # deleted upstream: the fake answers 404

    r = _get(default)
    assert r.status_code == 404, "by default upstream's 404 stands"
    assert metric(default, REVALIDATIONS, result="forwarded") == 1

    r = _get(opted_in)
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == digest
    assert _age(r) >= 1
    assert metric(opted_in, REVALIDATIONS, result="stale on 404") == 1
    assert "upstream answered 404 to its HEAD; serving the cached copy" in opted_in.log()


def test_background_revalidation_does_not_delay_the_client(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    old, old_data = fake.manifest(REPO, TAG, "old")
    proxy = _proxy(make_proxy, fake, TAG_REVALIDATE="background", UPSTREAM_READ_TIMEOUT="10")
    _primed(proxy, old)
    new, new_data = fake.manifest(REPO, TAG, "new")  # the tag moves upstream

    def slow_head(method: str, path: str, headers: dict[str, str]) -> Behaviour | None:
        if method == "HEAD" and path == PATH:
            return Behaviour(
                headers={
                    "Content-Type": "application/vnd.oci.image.manifest.v1+json",
                    "Docker-Content-Digest": new,
                    "Content-Length": str(len(new_data)),
                },
                stall_before_headers=3.0,
            )
        return None

    fake.responder = slow_head
    for _ in range(3):  # three clients while the slow check runs: one check upstream
        started = time.monotonic()
        r = _get(proxy)
        assert time.monotonic() - started < 1.0, "answered at once, not after the 3 s HEAD"
        assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == old
        assert r.content == old_data
        assert _age(r) >= 1
    assert metric(proxy, REVALIDATIONS, result="stale revalidating") == 3

    deadline = time.monotonic() + 15
    while True:
        r = _get(proxy)
        if r.headers["Docker-Content-Digest"] == new or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.headers["Docker-Content-Digest"] == new, "refreshed in the background"
    assert r.content == new_data
    assert "Age" not in r.headers, "the new one is fresh"
    assert fake.count("HEAD", PATH) == 1, "single-flighted: one revalidation"
    assert fake.count("GET", PATH) == 2, "the priming miss and the background refill"
    assert metric(proxy, REVALIDATIONS, result="changed") == 1


def test_authenticated_mode_still_fails_closed_when_upstream_is_down(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    """§15: every stale-serving knob on, and still no cached answer without upstream's 200."""
    digest, _ = fake.manifest(REPO, TAG, "old")
    proxy = _proxy(
        make_proxy,
        fake,
        PROXY_MODE="authenticated",
        TAG_REVALIDATE="background",
        SERVE_STALE_ON_404="true",
    )
    bearer = {"Authorization": "Bearer anything"}
    assert _get(proxy, **bearer).headers["Docker-Content-Digest"] == digest
    time.sleep(1.5)
    for behaviour in (Behaviour(status=503), Behaviour(status=404)):
        fake.routes[PATH] = behaviour
        r = _get(proxy, **bearer)
        assert r.status_code == behaviour.status, "upstream's own answer, not the cache"
        assert "Age" not in r.headers
    fake.stop()
    r = _get(proxy, **bearer)
    assert r.status_code == 502, r.text
    assert metric(proxy, REVALIDATIONS, result="stale served") == 0
    assert metric(proxy, REVALIDATIONS, result="stale revalidating") == 0
