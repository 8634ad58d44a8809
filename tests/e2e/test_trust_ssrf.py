"""§15 attacks over HTTP against the real proxy: SSRF guard fails closed, hostile input.

Each test is the attack a security review reproduced; it failed on the code before the fix.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.harness import BuiltImage, Registry, ensure_alias
from tests.harness.fakeupstream import FakeUpstream
from tests.harness.ports import connected
from tests.harness.proxyproc import ProxyServer

pytestmark = pytest.mark.e2e
OCI_INDEX = {"Accept": "application/vnd.oci.image.index.v1+json"}


def _raw_get(
    proxy: ProxyServer, path: str, headers: dict[str, bytes] | None = None
) -> tuple[int, bytes]:
    """GET with the path and header bytes exactly as given (requests would re-encode them)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _error(body: bytes) -> dict[str, str]:
    return json.loads(body)["errors"][0]


# -- (a) a name that does not resolve: 502, and it is looked up once -------------------------------


def test_unresolvable_registry_is_502_and_never_resolved_a_second_time(
    make_proxy: Callable[..., ProxyServer], tmp_path: Path
) -> None:
    """Attack: on a failed lookup the guard handed the name to urllib3, which resolved it
    again unchecked (a rebinding or split resolver could answer the second time)."""
    proxy = make_proxy({"WEB_CONCURRENCY": "1", "UPSTREAM_CONNECT_TIMEOUT": "2"})
    (worker,) = proxy.worker_pids()
    name = f"nx-{uuid.uuid4().hex[:12]}.invalid"  # RFC 6761: never resolves
    trace = tmp_path / "strace.out"
    # -f with -p attaches every thread, gevent's resolver threadpool included.
    tracer = subprocess.Popen(
        ["strace", "-f", "-e", "trace=openat", "-o", str(trace), "-p", str(worker)],
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)  # strace attaches asynchronously
        status, body = _raw_get(proxy, f"/v2/{name}/team/app/manifests/v1")
        time.sleep(0.5)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=10)
    assert status == 502, body
    assert _error(body)["code"] == "UNAVAILABLE"
    assert name in _error(body)["message"] and "unreachable" in _error(body)["message"]
    # glibc's getaddrinfo opens /etc/hosts once per lookup ("files dns" in nsswitch.conf).
    lookups = [line for line in trace.read_text().splitlines() if '"/etc/hosts"' in line]
    assert len(lookups) == 1, f"{len(lookups)} lookups of {name}:\n" + "\n".join(lookups)


# -- (b) a name resolving to an internal address: 403 naming the host only -----------------------


@pytest.mark.parametrize(
    ("name", "address"),
    [
        ("cgnat-metadata.trust-ssrf.test", "100.100.100.200"),  # Alibaba Cloud metadata
        ("cgnat.trust-ssrf.test", "100.64.0.1"),
        ("bench.trust-ssrf.test", "198.18.0.1"),
        ("ietf.trust-ssrf.test", "192.0.0.9"),
    ],
)
def test_name_resolving_to_internal_range_is_403_without_the_address(
    make_proxy: Callable[..., ProxyServer], name: str, address: str
) -> None:
    """Attack: CGNAT/192.0.0.0/24 names were fetched from; the 403 body leaked the address."""
    ensure_alias(name, address)
    proxy = make_proxy({"UPSTREAM_CONNECT_TIMEOUT": "2"})
    status, body = _raw_get(proxy, f"/v2/{name}/team/app/manifests/v1")
    assert status == 403, body
    assert _error(body)["code"] == "DENIED"
    assert name in _error(body)["message"]
    assert address.encode() not in body
    assert address in proxy.log(), "the address is logged server-side"


# -- (c) a port-less exemption covers the default ports only --------------------------------------


@pytest.mark.parametrize("variable", ["INSECURE_REGISTRIES", "ALLOWED_REGISTRIES"])
def test_port_less_exemption_does_not_open_other_ports(
    make_proxy: Callable[..., ProxyServer],
    upstream: Registry,
    listener: socket.socket,
    variable: str,
) -> None:
    """Attack: INSECURE_REGISTRIES=127.0.0.1 let any client reach every loopback port."""
    env = {
        "INSECURE_REGISTRIES": upstream.host,  # host:port: exactly the registry's port
        "UPSTREAM_CONNECT_TIMEOUT": "2",
        "UPSTREAM_READ_TIMEOUT": "2",
    }
    env[variable] = ",".join(filter(None, ["127.0.0.1", env.get(variable, "")]))
    if variable == "ALLOWED_REGISTRIES":
        env[variable] += f",{upstream.host}"
    proxy = make_proxy(env)
    port = listener.getsockname()[1]
    status, body = _raw_get(proxy, f"/v2/127.0.0.1:{port}/team/app/manifests/v1")
    assert status == 403, body
    assert _error(body)["code"] == "DENIED"
    assert not connected(listener), "no TCP connection to the unlisted port"
    # The host:port exemption still reaches the real registry on its port.
    r = requests.get(
        f"{proxy.url}/v2/{upstream.host}/e2e/app/manifests/v1", headers=OCI_INDEX, timeout=20
    )
    assert r.status_code == 200, r.text


# -- (d) IPv6 zone ids: 400 NAME_INVALID before any I/O -------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v2/[fe80::1%25eth0]/team/app/manifests/v1",
        "/v2/[fe80::1%25eth0]:{port}/team/app/manifests/v1",
        "/v2/[::1%25lo]:{port}/team/app/manifests/v1",
        "/v2/[fe80::1%25a@evil.test]/team/app/manifests/v1",
        "/v2/team/app/manifests/v1?ns=[fe80::1%25eth0]",
        "/v2/team/app/manifests/v1?ns=[::1%25lo]:{port}",
        "/v2/team/app/manifests/v1?ns=[fe80::1%25a%20b]",
    ],
)
def test_ipv6_zone_id_is_name_invalid_without_io(
    make_proxy: Callable[..., ProxyServer],
    fake: FakeUpstream,
    listener: socket.socket,
    path: str,
) -> None:
    """Attack: a zone id (and '@' or spaces inside one) passed registry-name validation."""
    proxy = make_proxy({"UPSTREAM_REGISTRY": fake.host, "INSECURE_REGISTRIES": fake.host})
    status, body = _raw_get(proxy, path.format(port=listener.getsockname()[1]))
    assert status == 400, body
    assert _error(body)["code"] == "NAME_INVALID"
    assert fake.requests == []
    assert not connected(listener)
    assert not proxy.fs_root.exists() or not any(proxy.fs_root.rglob("*"))


# -- (e) Unicode digits in Range: ignored, never a 500 --------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b"bytes=\xb2-",  # superscript two as WSGI's latin-1 sees it: "bytes=²-"
        b"bytes=\xc2\xb2-",  # the same, UTF-8 encoded
        b"bytes=0-\xb3",
        b"bytes=-\xb9",
        b"bytes=\xd9\xa3-",  # Arabic-Indic three, UTF-8
        b"bytes=1_0-20",
    ],
)
def test_unicode_digits_in_range_serve_the_whole_blob(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, image: BuiltImage, value: bytes
) -> None:
    """Attack: `Range: bytes=²-` on a cached blob made int() raise: HTTP 500."""
    proxy = make_proxy({"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host})
    layer = image.images[0].layers[-1]
    path = f"/v2/e2e/app/blobs/{layer.digest}"
    assert requests.get(f"{proxy.url}{path}", timeout=20).content == layer.data
    assert proxy.wait_cached([layer.digest]) == []
    status, body = _raw_get(proxy, path, {"Range": value})
    assert status == 200
    assert body == layer.data


def test_range_with_thousands_of_digits_is_416_not_500(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, image: BuiltImage
) -> None:
    """Attack: int() refuses more than 4300 digits; gunicorn lets an 8 KiB header through."""
    proxy = make_proxy({"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host})
    layer = image.images[0].layers[0]
    path = f"/v2/e2e/app/blobs/{layer.digest}"
    assert requests.get(f"{proxy.url}{path}", timeout=20).content == layer.data
    assert proxy.wait_cached([layer.digest]) == []
    status, _ = _raw_get(proxy, path, {"Range": b"bytes=" + b"9" * 5000 + b"-"})
    assert status == 416
    status, body = _raw_get(proxy, path, {"Range": b"bytes=-" + b"9" * 5000})
    assert (status, body) == (206, layer.data)
