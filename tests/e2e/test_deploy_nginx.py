"""deploy/nginx/: Debian's nginx, with the shipped configuration, terminating TLS for real pulls.

The configuration files are used as shipped; only ports, file paths and the test CA's
certificate are substituted (each substitution must match, so the files cannot drift).
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.harness import ALIAS, BuiltImage, Registry, free_port, skopeo_pull, verify_pulled
from tests.harness.proxyproc import REPO_ROOT, ProxyServer
from tests.harness.seaweed import SeaweedFS

pytestmark = pytest.mark.e2e
NGINX_DIR = REPO_ROOT / "deploy" / "nginx"
PUBLIC_NAME = "localhost"  # the name clients use for nginx; in the test certificate's SANs


class ScratchCA:
    """A throw-away CA and a server certificate for localhost/127.0.0.1 signed by it."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "oci-pull-through test CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PUBLIC_NAME)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(PUBLIC_NAME),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        # skopeo's --src-cert-dir: every *.crt in it is a trusted CA.
        self.cert_dir = workdir / "trust"
        self.cert_dir.mkdir()
        self.ca_path = self.cert_dir / "ca.crt"
        self.ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        self.cert_path = workdir / "server.crt"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.key_path = workdir / "server.key"
        self.key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def _substitute(text: str, replacements: dict[str, str], name: str) -> str:
    """Apply each replacement; one that no longer matches means the shipped file drifted."""
    for old, new in replacements.items():
        assert old in text, f"deploy/nginx/{name} no longer contains {old!r}"
        text = text.replace(old, new)
    return text


class Nginx:
    """Debian's nginx in the foreground with deploy/nginx/ templated into a temp prefix."""

    def __init__(
        self,
        workdir: Path,
        ca: ScratchCA,
        backends: dict[str, int],
        site: str = "oci-pull-through.conf",
    ) -> None:
        """backends maps the shipped `server` address (e.g. 127.0.0.1:8080) to a real port."""
        self.workdir = workdir
        self.conf_dir = workdir / "conf"
        self.logs = workdir / "logs"
        self.conf_dir.mkdir(parents=True)
        self.logs.mkdir()
        self.port = free_port()
        common = {
            "/etc/nginx/oci-pull-through/": f"{self.conf_dir}/",
            "/var/log/nginx/": f"{self.logs}/",
        }
        main = _substitute(
            (NGINX_DIR / "nginx.conf").read_text(),
            {
                "/etc/nginx/oci-pull-through/oci-pull-through.conf;": f"{self.conf_dir}/{site};",
                **common,
                "/run/nginx-oci-pull-through.pid": str(workdir / "nginx.pid"),
            },
            "nginx.conf",
        )
        (self.conf_dir / "nginx.conf").write_text(main)
        site_text = _substitute(
            (NGINX_DIR / site).read_text(),
            {
                "/etc/nginx/oci-pull-through/": f"{self.conf_dir}/",
                "listen 443 ssl http2;": f"listen 127.0.0.1:{self.port} ssl http2;",
                "/etc/nginx/tls/oci-pull-through.crt": str(ca.cert_path),
                "/etc/nginx/tls/oci-pull-through.key": str(ca.key_path),
                **{f"server {old};": f"server 127.0.0.1:{new};" for old, new in backends.items()},
            },
            site,
        )
        (self.conf_dir / site).write_text(site_text)
        shutil.copy(NGINX_DIR / "proxy-params.conf", self.conf_dir / "proxy-params.conf")
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    def command(self, *extra: str) -> list[str]:
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        assert Path(exe).exists(), "nginx not found (scripts/install-test-deps.sh)"
        return [
            exe,
            "-p",
            f"{self.workdir}/",
            "-c",
            str(self.conf_dir / "nginx.conf"),
            "-e",
            str(self.logs / "startup.log"),
            *extra,
        ]

    def start(self) -> Nginx:
        test = subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)
        assert test.returncode == 0, f"nginx -t failed:\n{test.stderr}"
        self._stderr = open(self.logs / "stderr.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command("-g", "daemon off;"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"nginx exited:\n{self.error_log()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"nginx did not listen on {self.port}:\n{self.error_log()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful shutdown of master and workers
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def error_log(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")) if p.is_file()
        )

    def access_log(self) -> list[str]:
        path = self.logs / "oci-pull-through.access.log"
        return path.read_text().splitlines() if path.exists() else []

    @property
    def host(self) -> str:
        return f"{PUBLIC_NAME}:{self.port}"


@pytest.fixture
def ca(tmp_path: Path) -> ScratchCA:
    return ScratchCA(tmp_path / "ca")


@pytest.fixture
def make_nginx(tmp_path: Path, ca: ScratchCA) -> Iterator[Callable[..., Nginx]]:
    started: list[Nginx] = []

    def make(backends: dict[str, int], site: str = "oci-pull-through.conf") -> Nginx:
        nginx = Nginx(tmp_path / f"nginx{len(started)}", ca, backends, site)
        started.append(nginx)
        return nginx.start()

    yield make
    for nginx in started:
        nginx.stop()


def _pull_tls(ref: str, dest: Path, image: BuiltImage, ca: ScratchCA) -> None:
    """skopeo over verified TLS, trusting only the test CA."""
    proc = skopeo_pull(
        f"docker://{ref}", dest, tls_verify=True, extra_args=["--src-cert-dir", str(ca.cert_dir)]
    )
    assert proc.returncode == 0, proc.stderr
    verify_pulled(dest, image)


def test_nginx_tls_h2_in_front_of_gunicorn_hostless_and_path_encoded(
    make_proxy: Callable[..., ProxyServer],
    make_nginx: Callable[..., Nginx],
    upstream: Registry,
    alias_upstream: Registry,
    image: BuiltImage,
    ca: ScratchCA,
    tmp_path: Path,
) -> None:
    """The shipped single-instance site: TLS verified against the CA, HTTP/2, cold then warm."""
    proxy = make_proxy(
        {"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": f"{upstream.host},{ALIAS}"}
    )
    nginx = make_nginx({"127.0.0.1:8080": proxy.port})
    _pull_tls(f"{nginx.host}/e2e/app:v1", tmp_path / "cold", image, ca)
    assert proxy.wait_cached(image.blobs()) == []
    mark = upstream.mark()
    _pull_tls(f"{nginx.host}/e2e/app:v1", tmp_path / "warm", image, ca)
    assert upstream.blob_gets(since=mark) == [], "the warm pull through nginx is all hits"
    _pull_tls(f"{nginx.host}/{ALIAS}/e2e/app:v1", tmp_path / "path-encoded", image, ca)

    # skopeo speaks HTTP/1.1 over TLS (its transport does not enable HTTP/2): check h2 apart.
    layer = image.images[0].layers[-1]
    status, headers, body = _h2_get(nginx.port, f"/v2/e2e/app/blobs/{layer.digest}", ca)
    assert status == 200 and body == layer.data
    assert headers["docker-content-digest"] == layer.digest
    assert any("HTTP/2.0" in line and layer.digest in line for line in nginx.access_log())


def _tls_connect(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    """A TLS connection to nginx on loopback, verified for the public name."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname=PUBLIC_NAME)


def _h2_get(port: int, path: str, ca: ScratchCA) -> tuple[int, dict[str, str], bytes]:
    """One GET over TLS negotiated to HTTP/2 by ALPN (the h2 package gunicorn uses too)."""
    import h2.config
    import h2.connection
    import h2.events

    context = ssl.create_default_context(cafile=str(ca.ca_path))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with _tls_connect(port, context) as tls:
        assert tls.selected_alpn_protocol() == "h2", "nginx must offer HTTP/2 by ALPN"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(
            1,
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", f"{PUBLIC_NAME}:{port}"),
                (":path", path),
            ],
            end_stream=True,
        )
        tls.sendall(conn.data_to_send())
        status, headers, body, done = 0, {}, b"", False
        while not done:
            data = tls.recv(65536)
            assert data, "connection closed before the stream ended"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                    status = int(headers[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    done = True
            tls.sendall(conn.data_to_send())
    return status, headers, body


def test_nginx_untrusted_certificate_is_refused(
    make_proxy: Callable[..., ProxyServer],
    make_nginx: Callable[..., Nginx],
    upstream: Registry,
    tmp_path: Path,
) -> None:
    """The pull above verified TLS for real: without the CA, skopeo refuses nginx."""
    proxy = make_proxy({"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host})
    nginx = make_nginx({"127.0.0.1:8080": proxy.port})
    proc = skopeo_pull(f"docker://{nginx.host}/e2e/app:v1", tmp_path / "x", tls_verify=True)
    assert proc.returncode != 0
    assert "certificate" in proc.stderr.lower(), proc.stderr


class _Recorder(BaseHTTPRequestHandler):
    """A backend that records request headers and streams a body in two halves."""

    protocol_version = "HTTP/1.1"
    seen: list[dict[str, str]] = []
    release = threading.Event()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(200)
        self.send_header("Content-Length", "8")
        self.end_headers()
        self.wfile.write(b"half")
        self.wfile.flush()
        # The second half only once the client has the first: nginx must not buffer.
        type(self).release.wait(timeout=10)
        self.wfile.write(b"done")


def test_nginx_forwards_client_view_and_streams_unbuffered(
    make_nginx: Callable[..., Nginx], ca: ScratchCA
) -> None:
    """X-Forwarded-* carry nginx's public address and scheme; bodies are not buffered."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        nginx = make_nginx({"127.0.0.1:8080": server.server_address[1]})
        context = ssl.create_default_context(cafile=str(ca.ca_path))
        context.set_alpn_protocols(["http/1.1"])
        with _tls_connect(nginx.port, context) as tls:
            tls.sendall(
                f"GET /v2/ HTTP/1.1\r\nHost: {nginx.host}\r\nConnection: close\r\n\r\n".encode()
            )
            received = b""
            while b"half" not in received:
                chunk = tls.recv(65536)
                assert chunk, received
                received += chunk
            assert b"done" not in received
            _Recorder.release.set()
            while chunk:
                chunk = tls.recv(65536)
                received += chunk
        assert received.startswith(b"HTTP/1.1 200") and received.endswith(b"halfdone")
        headers = _Recorder.seen[-1]
        assert headers["x-forwarded-proto"] == "https"
        assert headers["x-forwarded-host"] == nginx.host
        assert headers["host"] == nginx.host
        assert headers["x-forwarded-port"] == str(nginx.port)
        assert headers["x-forwarded-for"] == "127.0.0.1"
    finally:
        _Recorder.release.set()
        server.shutdown()
        server.server_close()


def test_sharded_two_gunicorns_each_object_has_one_owner(
    make_proxy: Callable[..., ProxyServer],
    make_nginx: Callable[..., Nginx],
    upstream: Registry,
    image: BuiltImage,
    ca: ScratchCA,
    tmp_path: Path,
) -> None:
    """sharded.conf: each object has one owner, a blob one whatever repository names it."""
    env = {
        "UPSTREAM_REGISTRY": upstream.host,
        "INSECURE_REGISTRIES": upstream.host,
        "PREFETCH_CONCURRENCY": "0",  # as sharded.conf says: shards own their blobs
    }
    shards = [make_proxy(env), make_proxy(env)]
    nginx = make_nginx(
        {"127.0.0.1:8081": shards[0].port, "127.0.0.1:8082": shards[1].port}, site="sharded.conf"
    )
    _pull_tls(f"{nginx.host}/e2e/app:v1", tmp_path / "cold", image, ca)
    time.sleep(0.5)  # commits land just after the last byte
    owner = {}
    for digest in image.blobs():
        owners = [shard for shard in shards if shard.is_cached(digest)]
        assert len(owners) == 1, f"{digest} cached by {len(owners)} instances"
        owner[digest] = owners[0]
    mark = upstream.mark()
    _pull_tls(f"{nginx.host}/e2e/app:v1", tmp_path / "warm", image, ca)
    assert upstream.blob_gets(since=mark) == [], "the same URI must reach the same owner"

    # The same layers under a second repository name (a base image shared by two apps): the
    # blob URIs differ, but nginx hashes blobs on their digest, so each request reaches the
    # shard that already holds the blob: no upstream blob fetch, no second copy.
    image.push(f"docker://{upstream.host}/e2e/shard-twin:v1")
    mark = upstream.mark()
    _pull_tls(f"{nginx.host}/e2e/shard-twin:v1", tmp_path / "twin", image, ca)
    assert upstream.blob_gets(since=mark) == [], "every blob was a hit on its one owner"
    twin_blobs = [line for line in nginx.access_log() if "/e2e/shard-twin/blobs/sha256:" in line]
    assert len(twin_blobs) >= len(image.blobs()), twin_blobs
    time.sleep(0.5)
    for digest in image.blobs():
        owners = [shard for shard in shards if shard.is_cached(digest)]
        assert owners == [owner[digest]], f"{digest} moved or copied: {len(owners)} owners"


def test_nginx_passes_s3_redirects_through(
    make_proxy: Callable[..., ProxyServer],
    make_nginx: Callable[..., Nginx],
    upstream: Registry,
    image: BuiltImage,
    ca: ScratchCA,
    tmp_path: Path,
) -> None:
    """STORAGE_BACKEND=s3 behind nginx: warm blob GETs are 307s to presigned SeaweedFS URLs."""
    with SeaweedFS(tmp_path / "seaweed") as seaweed:
        proxy = make_proxy(
            {
                "UPSTREAM_REGISTRY": upstream.host,
                "INSECURE_REGISTRIES": upstream.host,
                "STORAGE_BACKEND": "s3",
                "S3_BUCKET": "nginx-e2e",
                **seaweed.env(),
            }
        )
        nginx = make_nginx({"127.0.0.1:8080": proxy.port})
        _pull_tls(f"{nginx.host}/e2e/app:v1", tmp_path / "cold", image, ca)
        time.sleep(0.5)
        before = len(nginx.access_log())
        mark = upstream.mark()
        _pull_tls(f"{nginx.host}/e2e/app:v1", tmp_path / "warm", image, ca)
        assert upstream.blob_gets(since=mark) == []
        warm_blobs = [line for line in nginx.access_log()[before:] if "/blobs/sha256:" in line]
        assert warm_blobs and all('" 307 ' in line for line in warm_blobs), warm_blobs


def test_token_realm_carries_nginx_public_address(
    make_proxy: Callable[..., ProxyServer],
    make_nginx: Callable[..., Nginx],
    upstream: Registry,
    image: BuiltImage,
    ca: ScratchCA,
    tmp_path: Path,
) -> None:
    """The /v2/ challenge names https://<nginx>/v2/token, and that realm answers through nginx."""
    proxy = make_proxy({"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host})
    nginx = make_nginx({"127.0.0.1:8080": proxy.port})
    status, headers, _ = _h2_get(nginx.port, "/v2/", ca)
    assert status == 401
    challenge = headers["www-authenticate"]
    assert f'realm="https://{nginx.host}/v2/token"' in challenge, challenge
    assert str(proxy.port) not in challenge
    status, _, body = _h2_get(
        nginx.port, "/v2/token?service=oci-pull-through&scope=repository:e2e/app:pull", ca
    )
    assert status == 200 and b'"token"' in body
    # skopeo follows that realm through nginx for a real pull.
    _pull_tls(f"{nginx.host}/e2e/app:v1", tmp_path / "pulled", image, ca)
    assert any("GET /v2/token?" in line for line in nginx.access_log())
