"""Faults: misbehaving upstreams, a failing store, vanishing clients, hostile input, SSRF."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.harness.fakeupstream import Behaviour, FakeUpstream
from tests.harness.ports import connected
from tests.harness.proxyproc import ProxyServer

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob(fake: FakeUpstream, size: int, **behaviour: object) -> tuple[str, bytes]:
    return fake.blob("fault/repo", size, **behaviour)


def _proxy(make_proxy: Callable[..., ProxyServer], fake: FakeUpstream, **env: str) -> ProxyServer:
    return make_proxy({"UPSTREAM_REGISTRY": fake.host, "INSECURE_REGISTRIES": fake.host, **env})


def _assert_nothing_committed(proxy: ProxyServer, digest: str) -> None:
    deadline = time.monotonic() + 5
    while proxy.temp_files() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not proxy.cached_blob(digest).exists()
    assert not Path(f"{proxy.cached_blob(digest)}.meta.json").exists()
    assert proxy.temp_files() == []


def test_truncated_blob_is_never_committed(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    digest, data = _blob(fake, 2 * MiB, truncate_at=MiB)
    proxy = _proxy(make_proxy, fake)
    with pytest.raises(requests.exceptions.RequestException):
        _ = requests.get(f"{proxy.url}/v2/fault/repo/blobs/{digest}", timeout=10).content
    _assert_nothing_committed(proxy, digest)
    with pytest.raises(requests.exceptions.RequestException):
        _ = requests.get(f"{proxy.url}/v2/fault/repo/blobs/{digest}", timeout=10).content
    assert fake.count("GET", digest) == 2, "the next request goes upstream again"


def test_wrong_bytes_for_digest_are_forwarded_but_not_cached(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    data = os.urandom(MiB)
    digest = _digest(b"something else")
    fake.routes[f"/v2/fault/repo/blobs/{digest}"] = Behaviour(body=data)
    proxy = _proxy(make_proxy, fake)
    r = requests.get(f"{proxy.url}/v2/fault/repo/blobs/{digest}", timeout=10)
    assert r.status_code == 200 and r.content == data  # the client verifies and rejects it
    # The fill's verdict ends the download's flight; until then a second client would join it.
    deadline = time.monotonic() + 10
    while "digest mismatch" not in proxy.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "digest mismatch" in proxy.log()
    _assert_nothing_committed(proxy, digest)
    time.sleep(0.2)
    requests.get(f"{proxy.url}/v2/fault/repo/blobs/{digest}", timeout=10)
    assert fake.count("GET", digest) == 2, "not cached: the next download goes upstream again"


def test_manifest_not_matching_its_digest_is_not_cached(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    body = b'{"schemaVersion":2}'
    lie = _digest(b"other")
    fake.routes["/v2/fault/repo/manifests/v1"] = Behaviour(
        body=body,
        headers={
            "Content-Type": "application/vnd.oci.image.manifest.v1+json",
            "Docker-Content-Digest": lie,
        },
    )
    proxy = _proxy(make_proxy, fake)
    for _ in range(2):
        r = requests.get(f"{proxy.url}/v2/fault/repo/manifests/v1", timeout=10)
        assert r.status_code == 200 and r.content == body
    assert fake.count("GET", "/manifests/v1") == 2
    assert not list(proxy.fs_root.rglob("*.meta.json"))


def test_upstream_silent_before_headers_gives_502(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    digest, _ = _blob(fake, 1024, stall_before_headers=3)
    proxy = _proxy(make_proxy, fake, UPSTREAM_READ_TIMEOUT="1")
    r = requests.get(f"{proxy.url}/v2/fault/repo/blobs/{digest}", timeout=10)
    assert r.status_code == 502
    assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert fake.host in r.json()["errors"][0]["message"]


def test_upstream_stalling_mid_body_cuts_client_and_commits_nothing(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    digest, _ = _blob(fake, 2 * MiB, stall_after=MiB // 2, stall_for=3)
    proxy = _proxy(make_proxy, fake, UPSTREAM_READ_TIMEOUT="1")
    with pytest.raises(requests.exceptions.RequestException):
        _ = requests.get(f"{proxy.url}/v2/fault/repo/blobs/{digest}", timeout=10).content
    _assert_nothing_committed(proxy, digest)


def test_slow_upstream_still_streams_and_commits(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    digest, data = _blob(fake, MiB, chunk=64 * 1024, delay_per_chunk=0.05)
    proxy = _proxy(make_proxy, fake)
    with requests.get(f"{proxy.url}/v2/fault/repo/blobs/{digest}", stream=True, timeout=10) as r:
        first = next(r.iter_content(64 * 1024))
        assert first, "bytes reach the client while upstream is still sending"
        assert fake.count("GET", digest) == 1
        rest = b"".join(r.iter_content(MiB))
    assert first + rest == data
    assert proxy.wait_cached([digest]) == []


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: writing a bigger blob fails part-way with ENOSPC."""
    mount = tmp_path / "small-fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_store_failing_mid_write_does_not_break_the_client(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream, small_fs: Path
) -> None:
    digest, data = _blob(fake, 6 * MiB)
    proxy = _proxy(make_proxy, fake, FS_ROOT=str(small_fs))
    r = requests.get(f"{proxy.url}/v2/fault/repo/blobs/{digest}", timeout=20)
    assert r.status_code == 200 and r.content == data
    time.sleep(0.5)
    assert not [p for p in small_fs.rglob("*") if p.is_file()], "no partial object, no temp file"
    assert "store error" in proxy.log()


def test_client_disconnect_mid_download_leaves_no_partial_object(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    digest, _ = _blob(fake, 16 * MiB, chunk=256 * 1024, delay_per_chunk=0.02)
    proxy = _proxy(make_proxy, fake)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(f"GET /v2/fault/repo/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    received = 0
    while received < MiB:
        received += len(sock.recv(65536))
    sock.close()
    deadline = time.monotonic() + 10
    while "client gone" not in proxy.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "client gone" in proxy.log()
    _assert_nothing_committed(proxy, digest)


def _raw_get(proxy: ProxyServer, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


HEX = "a" * 64


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/Upper/case/manifests/v1", 400, "NAME_INVALID"),
        ("/v2/..%2F..%2Fetc/manifests/v1", 400, "NAME_INVALID"),
        ("/v2/%2e%2e/%2e%2e/etc/manifests/v1", 400, "NAME_INVALID"),
        ("/v2/ghcr.io/../../etc/manifests/v1", 400, "NAME_INVALID"),
        ("/v2/a/manifests/..%2F..%2Fsecret", 400, "NAME_INVALID"),
        ("/v2/a/manifests/.hidden", 400, "TAG_INVALID"),
        ("/v2/a/manifests/" + "t" * 129, 400, "TAG_INVALID"),
        ("/v2/a/blobs/sha256:..%2F..%2Fetc%2Fpasswd", 400, "NAME_INVALID"),
        ("/v2/a/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
        ("/v2/a/blobs/md5:" + HEX[:32], 400, "DIGEST_INVALID"),
        ("/v2/a/manifests/sha256:" + HEX[:63], 400, "DIGEST_INVALID"),
        ("/v2/user@evil.com/a/manifests/v1", 400, "NAME_INVALID"),
        ("/v2/a/b/c?ns=evil.com/path", 404, None),
        ("/v2/a/manifests/v1?ns=user@evil.com", 400, "NAME_INVALID"),
    ],
)
def test_bad_input_gets_oci_errors_and_touches_nothing(
    make_proxy: Callable[..., ProxyServer],
    fake: FakeUpstream,
    path: str,
    status: int,
    code: str | None,
) -> None:
    proxy = _proxy(make_proxy, fake)
    got_status, body = _raw_get(proxy, path)
    assert got_status == status, body
    if code is not None:
        import json

        assert json.loads(body)["errors"][0]["code"] == code
    assert [r for r in fake.requests if r[1] != "/v2/"] == [], "no upstream I/O for bad input"
    assert not proxy.fs_root.exists() or not any(proxy.fs_root.rglob("*"))


@pytest.mark.parametrize(
    "name",
    ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "169.254.169.254", "10.1.2.3:{port}"],
)
def test_ssrf_internal_upstream_refused_without_connecting(
    make_proxy: Callable[..., ProxyServer], listener: socket.socket, name: str
) -> None:
    proxy = make_proxy({"UPSTREAM_CONNECT_TIMEOUT": "2"})
    registry = name.format(port=listener.getsockname()[1])
    r = requests.get(f"{proxy.url}/v2/{registry}/x/manifests/v1", timeout=10)
    assert r.status_code == 403, r.text
    assert r.json()["errors"][0]["code"] == "DENIED"
    assert not connected(listener)


def test_ssrf_redirect_to_internal_address_refused(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream, listener: socket.socket
) -> None:
    digest = _digest(b"x")
    target = f"http://127.0.0.1:{listener.getsockname()[1]}/internal"
    fake.routes[f"/v2/fault/repo/blobs/{digest}"] = Behaviour(
        status=307, headers={"Location": target}
    )
    proxy = _proxy(make_proxy, fake)
    r = requests.get(f"{proxy.url}/v2/fault/repo/blobs/{digest}", timeout=10)
    assert r.status_code == 403 and r.json()["errors"][0]["code"] == "DENIED"
    assert not connected(listener)


def test_ssrf_token_realm_on_internal_address_refused(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream, listener: socket.socket
) -> None:
    realm = f"http://127.0.0.1:{listener.getsockname()[1]}/token"
    fake.routes["/v2/fault/repo/manifests/v1"] = Behaviour(
        status=401,
        body=b'{"errors":[]}',
        headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="x"'},
    )
    proxy = _proxy(make_proxy, fake)
    r = requests.get(f"{proxy.url}/v2/fault/repo/manifests/v1", timeout=10)
    assert r.status_code == 403 and r.json()["errors"][0]["code"] == "DENIED"
    assert not connected(listener)


def test_allowed_registries_limits_named_upstreams(
    make_proxy: Callable[..., ProxyServer], fake: FakeUpstream
) -> None:
    proxy = make_proxy({"ALLOWED_REGISTRIES": "*.example.com", "INSECURE_REGISTRIES": fake.host})
    r = requests.get(f"{proxy.url}/v2/{fake.host}/fault/repo/manifests/v1", timeout=10)
    assert r.status_code == 403 and r.json()["errors"][0]["code"] == "DENIED"
    assert fake.requests == []
