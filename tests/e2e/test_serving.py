"""Serving: zero-copy hits, TLS with an in-memory certificate, h2c, drain, CLI, flask run."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import h2.connection
import h2.events
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tests.harness import BuiltImage, Registry
from tests.harness.fakeupstream import Behaviour, FakeUpstream
from tests.harness.proxyproc import BIN_DIR, REPO_ROOT, ProxyServer

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024


def _layer(big_image: BuiltImage) -> tuple[str, bytes]:
    blob = big_image.platform("linux/amd64").layers[0]
    return blob.digest, blob.data


def _warm(proxy: ProxyServer, digest: str, data: bytes) -> str:
    url = f"{proxy.url}/v2/e2e/big/blobs/{digest}"
    assert requests.get(url, timeout=20).content == data
    assert proxy.wait_cached([digest]) == []
    return url


def test_filesystem_hits_use_sendfile(
    make_proxy: Callable[..., ProxyServer],
    upstream: Registry,
    big_image: BuiltImage,
    tmp_path: Path,
) -> None:
    """Whole-file and Range hits go out through os.sendfile, not read() into Python."""
    proxy = make_proxy(
        {
            "UPSTREAM_REGISTRY": upstream.host,
            "INSECURE_REGISTRIES": upstream.host,
            "WEB_CONCURRENCY": "1",
        }
    )
    digest, data = _layer(big_image)
    url = _warm(proxy, digest, data)
    (worker,) = proxy.worker_pids()
    trace = tmp_path / "strace.out"
    tracer = subprocess.Popen(
        ["strace", "-f", "-e", "trace=sendfile,setsockopt", "-o", str(trace), "-p", str(worker)],
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)  # strace attaches asynchronously
        r = requests.get(url, timeout=20)
        assert r.status_code == 200 and r.content == data
        r = requests.get(url, headers={"Range": "bytes=1000-2099999"}, timeout=20)
        assert r.status_code == 206 and r.content == data[1000:2100000]
        assert r.headers["Content-Range"] == f"bytes 1000-2099999/{len(data)}"
        time.sleep(0.5)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=10)
    sent = 0
    calls = 0
    for line in trace.read_text().splitlines():
        if (
            "sendfile(" in line
            and "= " in line
            and "resumed" not in line
            or ("sendfile resumed" in line)
        ):
            result = line.rsplit("= ", 1)[1].split()[0]
            if result.isdigit():
                calls += 1
                sent += int(result)
    assert calls >= 2, trace.read_text()[-2000:]
    assert sent == len(data) + 2099000, f"sendfile carried {sent} bytes in {calls} calls"
    # corked while sendfile runs, uncorked after (full segments, as nginx's tcp_nopush)
    corks = [line for line in trace.read_text().splitlines() if "TCP_CORK" in line]
    assert [c.split("TCP_CORK, [")[1][0] for c in corks] == ["1", "0", "1", "0"], corks


def test_range_edge_cases_on_hits(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, big_image: BuiltImage
) -> None:
    proxy = make_proxy({"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host})
    digest, data = _layer(big_image)
    url = _warm(proxy, digest, data)
    r = requests.get(url, headers={"Range": "bytes=-100"}, timeout=10)
    assert r.status_code == 206 and r.content == data[-100:]
    r = requests.get(url, headers={"Range": f"bytes={len(data)}-"}, timeout=10)
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"
    r = requests.get(url, headers={"Range": "bytes=0-0", "If-Range": '"other"'}, timeout=10)
    assert r.status_code == 200 and len(r.content) == len(data)
    r = requests.head(url, timeout=10)
    assert r.headers["Accept-Ranges"] == "bytes" and int(r.headers["Content-Length"]) == len(data)


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_self_signed_tls_in_memory_with_http2(make_proxy: Callable[..., ProxyServer]) -> None:
    proxy = make_proxy({"GENERATE_SELF_SIGNED_TLS": "true"}, tls=True)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.selected_alpn_protocol() == "h2"
        der = tls.getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "host.docker.internal"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.days >= 3650
    r = requests.get(f"{proxy.url}/healthz", verify=False, timeout=10)
    assert r.status_code == 200
    # No certificate on disk: the file gunicorn loads is an anonymous memory file.
    assert proxy.proc is not None
    fds = Path(f"/proc/{proxy.proc.pid}/fd")
    targets = [os.readlink(p) for p in fds.iterdir()]
    assert any(t.startswith("/memfd:oci-pull-through-tls") for t in targets), targets
    assert not list(REPO_ROOT.glob("*.pem")) and not list(proxy.workdir.rglob("*.pem"))


def _h2c_get(port: int, path: str) -> tuple[int, bytes]:
    """One request over cleartext HTTP/2 with prior knowledge."""
    conn = h2.connection.H2Connection()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [
                (":method", "GET"),
                (":path", path),
                (":scheme", "http"),
                (":authority", f"127.0.0.1:{port}"),
            ],
            end_stream=True,
        )
        sock.sendall(conn.data_to_send())
        status, body, done = 0, bytearray(), False
        while not done:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded):
                    done = True
            sock.sendall(conn.data_to_send())
    return status, bytes(body)


def test_h2c_and_http11_on_the_same_port(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, big_image: BuiltImage
) -> None:
    proxy = make_proxy({"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host})
    digest, data = _layer(big_image)
    assert _h2c_get(proxy.port, "/healthz") == (200, b"ok")
    status, body = _h2c_get(proxy.port, f"/v2/e2e/big/blobs/{digest}")  # miss, streamed
    assert status == 200 and body == data
    assert proxy.wait_cached([digest]) == []
    status, body = _h2c_get(proxy.port, f"/v2/e2e/big/blobs/{digest}")  # hit
    assert status == 200 and body == data
    assert requests.get(f"{proxy.url}/healthz", timeout=10).text == "ok"


def test_sigterm_drains_in_flight_downloads(make_proxy: Callable[..., ProxyServer]) -> None:
    with FakeUpstream() as fake:
        data = os.urandom(4 * MiB)
        import hashlib

        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        fake.routes[f"/v2/slow/blob/blobs/{digest}"] = Behaviour(
            body=data, chunk=256 * 1024, delay_per_chunk=0.25
        )  # about 4 s in all
        proxy = make_proxy({"UPSTREAM_REGISTRY": fake.host, "INSECURE_REGISTRIES": fake.host})
        received: dict[str, object] = {}

        def download() -> None:
            try:
                r = requests.get(f"{proxy.url}/v2/slow/blob/blobs/{digest}", timeout=30)
                received["status"], received["body"] = r.status_code, r.content
            except requests.RequestException as exc:  # pragma: no cover - reported below
                received["error"] = exc

        thread = threading.Thread(target=download)
        thread.start()
        deadline = time.monotonic() + 10
        while fake.count("GET", digest) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        proxy.signal(signal.SIGTERM)
        time.sleep(1.5)  # workers notice within their 1 s heartbeat and close the listener
        assert thread.is_alive(), "the download must still be in flight"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
        thread.join(timeout=30)
        assert "error" not in received, received.get("error")
        assert received["status"] == 200 and received["body"] == data
        assert proxy.proc is not None and proxy.proc.wait(timeout=30) == 0


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN_DIR / "oci-pull-through"), *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
@pytest.mark.parametrize("tls", [False, True])
def test_healthcheck_command(make_proxy: Callable[..., ProxyServer], tls: bool) -> None:
    env = {"GENERATE_SELF_SIGNED_TLS": "true"} if tls else {}
    proxy = make_proxy(env, tls=tls)
    cli_env = {
        "PATH": os.environ["PATH"],
        "PROXY_MODE": "transparent",
        "LISTEN_ADDR": f":{proxy.port}",
        **env,
    }
    assert _cli("-healthcheck", env=cli_env).returncode == 0
    assert _cli("healthcheck", env=cli_env).returncode == 0
    proxy.stop()
    failed = _cli("-healthcheck", env=cli_env)
    assert failed.returncode == 1 and "healthz" in failed.stderr


def test_flask_run_serves_misses_and_hits(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, big_image: BuiltImage
) -> None:
    proxy = make_proxy(
        {"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host}, server="flask"
    )
    digest, data = _layer(big_image)
    url = _warm(proxy, digest, data)
    mark = upstream.mark()
    r = requests.get(url, timeout=20)
    assert r.status_code == 200 and r.content == data
    r = requests.get(url, headers={"Range": "bytes=10-19"}, timeout=20)
    assert r.status_code == 206 and r.content == data[10:20]
    assert upstream.blob_gets(since=mark) == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {},
            "invalid configuration: PROXY_MODE=unset: allowed values are transparent, "
            "authenticated",
        ),
        ({"PROXY_MODE": "open"}, "PROXY_MODE='open'"),
        ({"PROXY_MODE": "transparent", "LOG_LEVEL": "loud"}, "LOG_LEVEL='loud'"),
        (
            {"PROXY_MODE": "transparent", "CACHE_TAG_MANIFESTS": "maybe"},
            "CACHE_TAG_MANIFESTS='maybe': expected true or false",
        ),
    ],
)
def test_invalid_configuration_stops_startup_with_one_clear_line(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    full_env = {
        "PATH": os.environ["PATH"],
        "STORAGE_BACKEND": "fs",
        "FS_ROOT": str(tmp_path / "c"),
        "LISTEN_ADDR": "127.0.0.1:0",
        **env,
    }
    proc = subprocess.run(
        [str(BIN_DIR / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
        env=full_env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "invalid configuration" in line]
    assert lines and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_request_log_lines_never_show_credentials(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, image: BuiltImage
) -> None:
    proxy = make_proxy({"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host})
    secret = {"Authorization": "Bearer SECRET-TOKEN-123"}
    layer = image.platform("linux/amd64").layers[0].digest
    requests.get(f"{proxy.url}/v2/e2e/app/blobs/{layer}", headers=secret, timeout=10)
    proxy.wait_cached([layer])
    requests.get(f"{proxy.url}/v2/e2e/app/blobs/{layer}", headers=secret, timeout=10)
    accept = {"Accept": "application/vnd.oci.image.index.v1+json"}
    requests.get(f"{proxy.url}/v2/e2e/app/manifests/v1", headers={**secret, **accept}, timeout=10)
    time.sleep(0.3)
    log = proxy.log()
    assert "SECRET-TOKEN-123" not in log
    short = layer[:19]
    assert f"GET {upstream.host}/e2e/app blob {short} 200 miss " in log
    assert f"GET {upstream.host}/e2e/app blob {short} 200 hit " in log
    assert f"GET {upstream.host}/e2e/app manifest v1 200 miss " in log


def test_log_level_warn_hides_request_lines(make_proxy: Callable[..., ProxyServer]) -> None:
    proxy = make_proxy({"LOG_LEVEL": "warn"})
    requests.get(f"{proxy.url}/v2/Bad/manifests/x", timeout=10)
    time.sleep(0.3)
    assert "oci_pull_through.access" not in proxy.log()


# Loaded by gunicorn's master before the gevent workers monkey-patch: none of these may be.
_NOT_BEFORE_PATCHING = (
    "ssl",
    "requests",
    "urllib3",
    "flask",
    "werkzeug",
    "gevent",
    "boto3",
    "prometheus_client",  # reads PROMETHEUS_MULTIPROC_DIR when first imported
)


@pytest.mark.parametrize("config", ["gunicorn.conf.py", "python:app.gunicorn_conf"])
def test_gunicorn_settings_leave_monkey_patching_intact(config: str, tmp_path: Path) -> None:
    """Both ways of loading the settings (checkout, installed) import nothing gevent patches.

    Every branch runs (TLS certificate, JSON logger); gevent then patches without a warning.
    """
    load = (
        f"importlib.import_module({config.removeprefix('python:')!r})"
        if config.startswith("python:")
        else f"runpy.run_path({config!r})"
    )
    code = (
        "import importlib, runpy, sys, warnings; "
        f"{load}; "
        f"bad = [m for m in {_NOT_BEFORE_PATCHING!r} if m in sys.modules]; "
        "print(bad); "
        "warnings.simplefilter('error'); "
        "from gevent import monkey; monkey.patch_all(); "
        "sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={
            "PATH": os.environ["PATH"],
            "PROXY_MODE": "transparent",  # the settings are validated as they are read
            "GENERATE_SELF_SIGNED_TLS": "true",
            "LOG_FORMAT": "json",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        },
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
