"""Issue 14 end to end: retries, the cache's own upstream credentials, a corporate forward
proxy (a real tinyproxy), a TLS registry signed by a private CA, dual-stack listening.

Everything listens on 127.0.0.1 or ::1; nothing reaches the internet.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.harness import PASSWORD, USER, BuiltImage, Registry, TokenServer
from tests.harness.fakeupstream import Behaviour, FakeUpstream, in_turn
from tests.harness.images import MT_OCI_INDEX, MT_OCI_MANIFEST
from tests.harness.ports import free_port
from tests.harness.proxyproc import ProxyServer

pytestmark = pytest.mark.e2e
ACCEPT = {"Accept": f"{MT_OCI_INDEX}, {MT_OCI_MANIFEST}"}
CA_NAME = "oci-pull-through-e2e-ca"


def manifest(proxy: ProxyServer, name: str, base: str | None = None) -> requests.Response:
    """GET a manifest through the proxy, as a client that sends no credentials."""
    url = f"{base or proxy.url}/v2/{name}/manifests/v1"
    return requests.get(url, headers=ACCEPT, timeout=30)


# -- retries ---------------------------------------------------------------------------------


def test_503_then_200_is_one_retry_and_one_client_success(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST}).encode()
    path = "/v2/org/app/manifests/v1"
    ok = Behaviour(body=body, headers={"Content-Type": MT_OCI_MANIFEST})
    fake.responder = in_turn(path, Behaviour(status=503, body=b"busy"), ok)
    proxy = make_proxy({"UPSTREAM_REGISTRY": fake.host, "INSECURE_REGISTRIES": fake.host})
    r = manifest(proxy, "org/app")
    assert r.status_code == 200, r.text
    assert r.content == body
    assert fake.count("GET", path) == 2  # the 503 and its one retry
    metrics = requests.get(f"{proxy.url}/metrics", timeout=10).text
    assert 'oci_upstream_retries_total{reason="503"} 1.0' in metrics


# -- UPSTREAM_AUTH_FILE ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_upstream(
    tmp_path_factory: pytest.TempPathFactory, image: BuiltImage
) -> Iterator[Registry]:
    """htpasswd registry: private/app only for alice."""
    work = tmp_path_factory.mktemp("basic-upstream")
    with Registry(work, auth="htpasswd", users={USER: PASSWORD}) as registry:
        image.push(f"docker://{registry.host}/private/app:v1", creds=f"{USER}:{PASSWORD}")
        yield registry


def auth_file(path: Path, *registries: str) -> str:
    """A Docker config.json with alice's login for each registry."""
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    path.write_text(json.dumps({"auths": {r: {"auth": auth} for r in registries}}))
    return str(path)


@pytest.mark.parametrize("kind", ["basic", "token"])
def test_auth_file_credentials_pull_for_clients_that_send_none(
    make_proxy: Callable[..., ProxyServer],
    basic_upstream: Registry,
    token_upstream: tuple[Registry, TokenServer],
    tmp_path: Path,
    kind: str,
) -> None:
    registry = basic_upstream if kind == "basic" else token_upstream[0]
    realm_host = token_upstream[1].url.split("//", 1)[1]  # a loopback realm: exempted
    env = {
        "UPSTREAM_REGISTRY": registry.host,
        "INSECURE_REGISTRIES": f"{registry.host},{realm_host}",
        "UPSTREAM_AUTH_FILE": auth_file(tmp_path / "config.json", registry.host),
    }
    proxy = make_proxy(env)
    r = manifest(proxy, "private/app")
    assert r.status_code == 200, r.text
    # the Docker token dance through the proxy: an anonymous proxy token, then the pull
    token = requests.get(
        f"{proxy.url}/v2/token", params={"scope": "repository:private/app:pull"}, timeout=20
    ).json()["token"]
    url = f"{proxy.url}/v2/private/app/manifests/v1"
    headers = {"Authorization": f"Bearer {token}", **ACCEPT}
    assert requests.get(url, headers=headers, timeout=20).status_code == 200
    # never in authenticated mode (SPEC §5)
    strict = make_proxy({**env, "PROXY_MODE": "authenticated", "TOKEN_SECRET": "x" * 20})
    assert manifest(strict, "private/app").status_code == 401
    assert "UPSTREAM_AUTH_FILE is ignored in authenticated mode" in strict.log()


# -- a corporate forward proxy: a real tinyproxy ---------------------------------------------


class Tinyproxy:
    """A private tinyproxy on 127.0.0.1 with its own config file and log."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.log_path = work / "tinyproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Tinyproxy:
        exe = shutil.which("tinyproxy")
        assert exe, "tinyproxy missing: run scripts/install-test-deps.sh as root"
        self.work.mkdir(parents=True, exist_ok=True)
        config = self.work / "tinyproxy.conf"
        config.write_text(
            f"Port {self.port}\nListen 127.0.0.1\nTimeout 30\nLogLevel Info\n"
            f'LogFile "{self.log_path}"\nPidFile "{self.work / "pid"}"\n'
            "MaxClients 50\nAllow 127.0.0.1\n"
        )
        with (self.work / "stdout").open("ab") as out:
            self.proc = subprocess.Popen([exe, "-d", "-c", str(config)], stdout=out, stderr=out)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("tinyproxy did not start")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connections(self) -> list[str]:
        """The host:port of every upstream connection tinyproxy opened."""
        text = self.log_path.read_text() if self.log_path.exists() else ""
        marker = "opensock: opening connection to "
        return [line.split(marker, 1)[1].strip() for line in text.splitlines() if marker in line]


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    with Tinyproxy(tmp_path / "tinyproxy") as proxy:
        yield proxy


def test_pulls_go_through_the_forward_proxy_and_the_guard_checks_the_target(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, tinyproxy: Tinyproxy
) -> None:
    egress = {"HTTP_PROXY": tinyproxy.url, "HTTPS_PROXY": tinyproxy.url}
    base = {"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host}
    proxy = make_proxy({**base, **egress})
    upstream.clear_log()
    r = manifest(proxy, "e2e/app")
    assert r.status_code == 200, r.text
    assert upstream.host in tinyproxy.connections()
    assert upstream.requests_log(), "the registry was reached (through the proxy)"
    # SSRF guard on the TARGET: a name resolving to loopback, not exempt, is refused before
    # anything is handed to the proxy (the proxy itself is on loopback and allowed).
    internal = f"127.0.0.3:{upstream.port}"
    r = requests.get(f"{proxy.url}/v2/{internal}/e2e/app/manifests/v1", timeout=20)
    assert r.status_code == 403, r.text
    assert internal not in tinyproxy.connections()
    # NO_PROXY: straight to the registry, the proxy sees nothing more
    direct = make_proxy({**base, **egress, "NO_PROXY": "127.0.0.1"})
    seen = len(tinyproxy.connections())
    assert manifest(direct, "e2e/app").status_code == 200
    assert len(tinyproxy.connections()) == seen


# -- a TLS registry signed by a private CA ---------------------------------------------------


def make_ca_and_leaf(work: Path) -> tuple[Path, Path, Path]:
    """A private CA and a leaf for 127.0.0.1 it signed: (ca.pem, leaf.pem, leaf.key)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (work / "ca.pem", work / "leaf.pem", work / "leaf.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class TLSRegistry(Registry):
    """The harness registry, switched to TLS after the image was pushed over plain HTTP."""

    def ping(self, timeout: float = 2.0) -> int:
        context = ssl._create_unverified_context()
        if not self.extra_config.get("http"):
            return super().ping(timeout)
        conn = http.client.HTTPSConnection(
            self.bind_host, self.port, timeout=timeout, context=context
        )
        try:
            conn.request("GET", "/v2/")
            return conn.getresponse().status
        finally:
            conn.close()


@pytest.fixture(scope="module")
def tls_upstream(
    tmp_path_factory: pytest.TempPathFactory, image: BuiltImage
) -> Iterator[tuple[TLSRegistry, Path]]:
    """An anonymous registry on https://127.0.0.1:PORT whose certificate a private CA signed."""
    work = tmp_path_factory.mktemp("tls-upstream")
    ca, leaf, key = make_ca_and_leaf(work)
    registry = TLSRegistry(work / "registry")
    with registry:
        image.push(f"docker://{registry.host}/e2e/app:v1")
        registry.extra_config = {"http": {"tls": {"certificate": str(leaf), "key": str(key)}}}
        registry.restart()
        yield registry, ca


def test_tls_registry_with_a_private_ca(
    make_proxy: Callable[..., ProxyServer],
    tls_upstream: tuple[TLSRegistry, Path],
    tinyproxy: Tinyproxy,
) -> None:
    registry, ca = tls_upstream
    # ALLOWED_REGISTRIES' explicit entry exempts the loopback registry from the SSRF guard
    base = {"UPSTREAM_REGISTRY": registry.host, "ALLOWED_REGISTRIES": registry.host}
    unknown = make_proxy(base)
    assert manifest(unknown, "e2e/app").status_code == 502  # the CA is not trusted: refused
    trusted = make_proxy({**base, "UPSTREAM_CA_BUNDLE": str(ca)})
    assert manifest(trusted, "e2e/app").status_code == 200
    # through the forward proxy (CONNECT), the same trust
    tunneled = make_proxy({**base, "UPSTREAM_CA_BUNDLE": str(ca), "HTTPS_PROXY": tinyproxy.url})
    assert manifest(tunneled, "e2e/app").status_code == 200
    assert registry.host in tinyproxy.connections()
    skip = make_proxy({**base, "TLS_SKIP_VERIFY_REGISTRIES": registry.host})
    assert manifest(skip, "e2e/app").status_code == 200
    assert "WITHOUT verifying TLS" in skip.log()


def test_tls_registry_trusted_through_the_os_trust_store(
    make_proxy: Callable[..., ProxyServer], tls_upstream: tuple[TLSRegistry, Path]
) -> None:
    """The CA is installed with update-ca-certificates for this test only, then removed."""
    registry, ca = tls_upstream
    installed = Path("/usr/local/share/ca-certificates") / f"{CA_NAME}.crt"
    assert shutil.which("update-ca-certificates"), "the ca-certificates package is needed"
    shutil.copyfile(ca, installed)
    try:
        subprocess.run(["update-ca-certificates"], check=True, capture_output=True, timeout=60)
        env = {"UPSTREAM_REGISTRY": registry.host, "ALLOWED_REGISTRIES": registry.host}
        proxy = make_proxy(env)
        assert manifest(proxy, "e2e/app").status_code == 200
    finally:
        installed.unlink(missing_ok=True)
        subprocess.run(
            ["update-ca-certificates", "--fresh"], check=True, capture_output=True, timeout=60
        )


# -- dual-stack listening --------------------------------------------------------------------


def test_listens_on_ipv6_loopback(upstream: Registry, tmp_path: Path) -> None:
    """LISTEN_ADDR=[::1]:PORT answers on ::1. The `:PORT` -> `[::]:PORT` mapping is unit tested
    (tests/unit/test_config.py): a test never listens on every interface."""
    port = free_port()  # free on 127.0.0.1; bound on ::1 (racy like every free_port)
    env = {
        "UPSTREAM_REGISTRY": upstream.host,
        "INSECURE_REGISTRIES": upstream.host,
        "LISTEN_ADDR": f"[::1]:{port}",
    }
    proxy = ProxyServer(tmp_path / "v6", env, port=port).start(wait=False)
    base = f"http://[::1]:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if requests.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, proxy.log()
            time.sleep(0.1)
        assert manifest(proxy, "e2e/app", base=base).status_code == 200
    finally:
        proxy.stop()
