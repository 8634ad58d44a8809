"""Fixtures for end-to-end tests: real registries, real images, the real proxy on loopback."""

from __future__ import annotations

import itertools
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import (
    ALIAS,
    ALIAS_IP,
    PASSWORD,
    USER,
    BuiltImage,
    Registry,
    TokenServer,
    build_image,
    ensure_alias,
)
from tests.harness.fakeupstream import FakeUpstream
from tests.harness.proxyproc import ProxyServer
from tests.harness.seaweed import SeaweedFS

REQUIRED = ("docker-registry", "skopeo", "htpasswd", "strace")


@pytest.fixture(scope="session", autouse=True)
def _tools() -> None:
    """Missing tools fail the suite; they are never a reason to skip."""
    missing = [tool for tool in REQUIRED if shutil.which(tool) is None]
    assert not missing, f"end-to-end tests need {missing}: run scripts/install-test-deps.sh as root"


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """A two-platform image (OCI index) with small gzip layers."""
    return build_image(tmp_path_factory.mktemp("layout"), "v1", layer_sizes=(4096, 300_000))


@pytest.fixture(scope="session")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """A single-platform image with an 8 MiB uncompressed layer, for streaming tests."""
    return build_image(
        tmp_path_factory.mktemp("big-layout"),
        "big",
        platforms=("linux/amd64",),
        layer_sizes=(8 * 1024 * 1024,),
        compression="none",
    )


@pytest.fixture(scope="module")
def upstream(
    tmp_path_factory: pytest.TempPathFactory, image: BuiltImage, big_image: BuiltImage
) -> Iterator[Registry]:
    """An anonymous registry on 127.0.0.1 holding e2e/app:v1 and e2e/big:big."""
    with Registry(tmp_path_factory.mktemp("upstream")) as registry:
        image.push(f"docker://{registry.host}/e2e/app:v1")
        big_image.push(f"docker://{registry.host}/e2e/big:big")
        yield registry


@pytest.fixture(scope="module")
def alias_upstream(
    tmp_path_factory: pytest.TempPathFactory, image: BuiltImage
) -> Iterator[Registry]:
    """An anonymous registry reachable by the port-less name upstream.test (127.0.0.2:80)."""
    ensure_alias(ALIAS, ALIAS_IP)
    with Registry(
        tmp_path_factory.mktemp("alias-upstream"), host=ALIAS_IP, port=80, hostname=ALIAS
    ) as registry:
        image.push(f"docker://{registry.host}/e2e/app:v1")
        yield registry


@pytest.fixture(scope="module")
def token_upstream(
    tmp_path_factory: pytest.TempPathFactory, image: BuiltImage
) -> Iterator[tuple[Registry, TokenServer]]:
    """A token-auth registry: public/app pullable anonymously, private/app only by alice."""
    work = tmp_path_factory.mktemp("token-upstream")
    tokens = TokenServer(
        work / "tokens",
        users={USER: PASSWORD},
        acl={USER: {"*": ["*"]}},
        anonymous_pull=["public/*"],
    )
    with tokens, Registry(work / "registry", auth="token", token_server=tokens) as registry:
        for repo in ("public/app", "private/app"):
            image.push(f"docker://{registry.host}/{repo}:v1", creds=f"{USER}:{PASSWORD}")
        yield registry, tokens


_prefixes = itertools.count()


@pytest.fixture(params=["fs", "s3"])
def backend(request: pytest.FixtureRequest) -> dict[str, str]:
    """Environment selecting a storage backend, so a test runs against both."""
    if request.param == "fs":
        return {"STORAGE_BACKEND": "fs"}
    server: SeaweedFS = request.getfixturevalue("seaweed_server")
    return {
        "STORAGE_BACKEND": "s3",
        **server.env(),
        "S3_BUCKET": "e2e-cache",
        "S3_PREFIX": f"t{next(_prefixes)}",
    }


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    """A scriptable, misbehaving upstream for faults a real registry will not produce."""
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyServer]]:
    """Start proxies with the given environment; all are stopped at the end of the test."""
    started: list[ProxyServer] = []

    def make(env: dict[str, str] | None = None, **kwargs: object) -> ProxyServer:
        proxy = ProxyServer(tmp_path / f"proxy{len(started)}", env or {}, **kwargs)  # type: ignore[arg-type]
        started.append(proxy)
        return proxy.start()

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A loopback socket that records whether anyone connected to it (tests.harness.ports)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()
