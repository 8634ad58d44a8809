"""The S3 backend end to end: gunicorn, a real SeaweedFS, a real registry, skopeo."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from app.storage.s3bucket import rule_id, set_up_bucket
from tests.harness import BuiltImage, Registry, skopeo_pull, verify_pulled
from tests.harness.fakeupstream import Behaviour, FakeUpstream
from tests.harness.proxyproc import ProxyServer
from tests.harness.seaweed import SeaweedFS

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024
BUCKET = "oci-cache-e2e"
_ACCESS_RE = re.compile(
    r"oci_pull_through\.access (?P<method>[A-Z]+) (?P<repo>\S+) (?P<kind>\S+) (?P<ref>\S+) "
    r"(?P<status>\d{3}) (?P<outcome>\S+) (?P<bytes>\d+)B"
)
_prefixes = itertools.count()


@dataclass
class AccessLine:
    """One request line of the proxy's log."""

    method: str
    kind: str
    ref: str
    status: int
    outcome: str
    bytes: int


def access_lines(text: str) -> list[AccessLine]:
    """The proxy's request lines in text."""
    return [
        AccessLine(
            m["method"], m["kind"], m["ref"], int(m["status"]), m["outcome"], int(m["bytes"])
        )
        for m in _ACCESS_RE.finditer(text)
    ]


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS on loopback for the module; tests use separate prefixes."""
    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@dataclass
class S3Proxy:
    """A proxy on the S3 backend and a raw client for its bucket and prefix."""

    proxy: ProxyServer
    client: Any
    prefix: str

    def key(self, digest: str) -> str:
        algorithm, hex_part = digest.split(":", 1)
        return f"{self.prefix}/blobs/{algorithm}/{hex_part}"

    def objects(self) -> set[str]:
        listed = self.client.list_objects_v2(Bucket=BUCKET, Prefix=f"{self.prefix}/")
        return {o["Key"] for o in listed.get("Contents", [])}

    def uploads(self) -> list[str]:
        listed = self.client.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{self.prefix}/")
        return [u["Key"] for u in listed.get("Uploads", [])]

    def wait_committed(self, digests: object, timeout: float = 10.0) -> list[str]:
        """Wait for the sidecars (commit markers) to appear; return digests still missing."""
        wanted = list(digests)  # type: ignore[call-overload]
        deadline = time.monotonic() + timeout
        while True:
            found = self.objects()
            missing = [d for d in wanted if f"{self.key(d)}.meta.json" not in found]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)


@pytest.fixture
def s3_proxy(make_proxy: Callable[..., ProxyServer], seaweed: SeaweedFS) -> Callable[..., S3Proxy]:
    """Start a proxy with STORAGE_BACKEND=s3 on its own prefix of the shared bucket."""

    def make(upstream_host: str, **env: str) -> S3Proxy:
        prefix = f"run{next(_prefixes)}-{os.getpid()}"
        proxy = make_proxy(
            {
                "STORAGE_BACKEND": "s3",
                **seaweed.env(),
                "S3_BUCKET": BUCKET,
                "S3_PREFIX": prefix,
                "UPSTREAM_REGISTRY": upstream_host,
                "INSECURE_REGISTRIES": upstream_host,
                **env,
            }
        )
        return S3Proxy(proxy, seaweed.client(), prefix)

    return make


def test_seaweedfs_listens_on_loopback_only(seaweed: SeaweedFS) -> None:
    assert seaweed.pids()
    assert seaweed.non_loopback_listeners() == []


def test_lifecycle_rules_of_two_prefixes_coexist_on_seaweedfs(seaweed: SeaweedFS) -> None:
    client = seaweed.client()

    def rules() -> dict[str, int]:
        found = client.get_bucket_lifecycle_configuration(Bucket="lifecycle-e2e")["Rules"]
        return {rule["ID"]: rule["Expiration"]["Days"] for rule in found}

    set_up_bucket(client, "lifecycle-e2e", "team-a", 7)
    set_up_bucket(client, "lifecycle-e2e", "team-b", 28)
    assert rules() == {rule_id("team-a"): 7, rule_id("team-b"): 28}
    set_up_bucket(client, "lifecycle-e2e", "team-a", 0)
    assert rules() == {rule_id("team-b"): 28}


def test_skopeo_cold_then_warm_pull_redirects_every_blob(
    s3_proxy: Callable[..., S3Proxy], upstream: Registry, image: BuiltImage, tmp_path: Path
) -> None:
    s3 = s3_proxy(upstream.host)
    proc = skopeo_pull(f"docker://{s3.proxy.host}/e2e/app:v1", tmp_path / "cold")
    assert proc.returncode == 0, proc.stderr
    verify_pulled(tmp_path / "cold", image)
    assert s3.wait_committed(image.blobs()) == [], "every blob is committed after the cold pull"
    assert s3.uploads() == []

    log_mark, upstream_mark = len(s3.proxy.log()), upstream.mark()
    proc = skopeo_pull(f"docker://{s3.proxy.host}/e2e/app:v1", tmp_path / "warm")
    assert proc.returncode == 0, proc.stderr
    verify_pulled(tmp_path / "warm", image)
    assert upstream.blob_gets(since=upstream_mark) == [], "skopeo fetched blobs from SeaweedFS"

    warm = access_lines(s3.proxy.log()[log_mark:])
    blob_gets = [line for line in warm if line.kind == "blob" and line.method == "GET"]
    assert blob_gets and all(
        (line.status, line.outcome) == (307, "redirect") for line in blob_gets
    ), blob_gets
    assert {line.ref for line in blob_gets} == {d[:19] for d in image.blobs()}
    through_proxy = sum(line.bytes for line in warm)
    redirected = sum(len(blob.data) for blob in image.blobs().values())
    print(
        f"\nwarm pull via S3: {through_proxy} B through the proxy ({len(warm)} requests), "
        f"{redirected} B redirected to SeaweedFS ({len(blob_gets)} blobs)"
    )
    assert through_proxy < redirected


def test_head_of_a_cached_blob_is_answered_from_the_sidecar(
    s3_proxy: Callable[..., S3Proxy], upstream: Registry, image: BuiltImage
) -> None:
    s3 = s3_proxy(upstream.host)
    digest, blob = next(iter(image.blobs().items()))
    url = f"{s3.proxy.url}/v2/e2e/app/blobs/{digest}"
    assert requests.get(url, timeout=10).content == blob.data
    assert s3.wait_committed([digest]) == []
    mark = upstream.mark()
    r = requests.head(url, timeout=10, allow_redirects=False)
    assert r.status_code == 200
    assert r.headers["Content-Length"] == str(len(blob.data))
    assert r.headers["Docker-Content-Digest"] == digest
    r = requests.get(url, timeout=10, allow_redirects=False)
    assert r.status_code == 307
    assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert requests.get(r.headers["Location"], timeout=10).content == blob.data
    assert upstream.requests_log(since=mark) == []


def test_public_endpoint_url_is_used_for_redirects(
    s3_proxy: Callable[..., S3Proxy], seaweed: SeaweedFS, upstream: Registry, image: BuiltImage
) -> None:
    public = f"http://localhost:{seaweed.ports['s3']}"
    s3 = s3_proxy(upstream.host, S3_PUBLIC_ENDPOINT_URL=public)
    digest, blob = next(iter(image.blobs().items()))
    url = f"{s3.proxy.url}/v2/e2e/app/blobs/{digest}"
    requests.get(url, timeout=10).raise_for_status()
    assert s3.wait_committed([digest]) == []
    r = requests.get(url, timeout=10, allow_redirects=False)
    assert r.status_code == 307
    assert r.headers["Location"].startswith(f"{public}/{BUCKET}/{s3.prefix}/blobs/sha256/")
    assert requests.get(r.headers["Location"], timeout=10).content == blob.data


def test_without_redirect_hits_stream_through_the_proxy_with_ranges(
    s3_proxy: Callable[..., S3Proxy],
    upstream: Registry,
    image: BuiltImage,
    big_image: BuiltImage,
    tmp_path: Path,
) -> None:
    s3 = s3_proxy(upstream.host, S3_REDIRECT="false")
    proc = skopeo_pull(f"docker://{s3.proxy.host}/e2e/big:big", tmp_path / "cold")
    assert proc.returncode == 0, proc.stderr
    assert s3.wait_committed(big_image.blobs()) == []
    mark, log_mark = upstream.mark(), len(s3.proxy.log())
    proc = skopeo_pull(f"docker://{s3.proxy.host}/e2e/big:big", tmp_path / "warm")
    assert proc.returncode == 0, proc.stderr
    verify_pulled(tmp_path / "warm", big_image)
    warm = [x for x in access_lines(s3.proxy.log()[log_mark:]) if x.kind == "blob"]
    assert warm and all((x.status, x.outcome) == (200, "hit") for x in warm), warm

    digest, blob = max(big_image.blobs().items(), key=lambda item: len(item[1].data))
    data, url = blob.data, f"{s3.proxy.url}/v2/e2e/big/blobs/{digest}"
    assert len(data) > 8 * MiB
    for header, start, end in [
        ("bytes=100-1099", 100, 1100),
        (f"bytes={5 * MiB}-", 5 * MiB, len(data)),
        ("bytes=-500", len(data) - 500, len(data)),
    ]:
        r = requests.get(url, headers={"Range": header}, timeout=10)
        assert r.status_code == 206, header
        assert r.content == data[start:end], header
        assert r.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(data)}"
    r = requests.get(url, timeout=10, allow_redirects=False)
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == digest[7:]
    assert upstream.blob_gets(since=mark) == []


def test_client_disconnect_mid_multipart_upload_leaves_no_upload(
    s3_proxy: Callable[..., S3Proxy], fake: FakeUpstream
) -> None:
    data = os.urandom(24 * MiB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    fake.routes[f"/v2/fault/repo/blobs/{digest}"] = Behaviour(
        body=data, chunk=256 * 1024, delay_per_chunk=0.02
    )
    s3 = s3_proxy(fake.host)
    sock = socket.create_connection(("127.0.0.1", s3.proxy.port), timeout=10)
    sock.sendall(f"GET /v2/fault/repo/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    received, deadline = 0, time.monotonic() + 20
    while not s3.uploads() and time.monotonic() < deadline:  # wait for a part to go up
        try:
            block = sock.recv(1024 * 1024)
        except TimeoutError:
            block = b""
        if not block:
            break
        received += len(block)
    fills = [line for line in s3.proxy.log().splitlines() if "cache fill" in line]
    assert s3.uploads(), f"no multipart upload after {received} B; fills: {fills}"
    assert received < len(data)
    sock.close()
    deadline = time.monotonic() + 10
    while (s3.uploads() or "client gone" not in s3.proxy.log()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "client gone" in s3.proxy.log()
    assert s3.uploads() == []
    assert s3.objects() == set()


def test_wrong_bytes_in_a_multipart_fill_abort_the_upload(
    s3_proxy: Callable[..., S3Proxy], fake: FakeUpstream
) -> None:
    data = os.urandom(20 * MiB)
    digest = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    fake.routes[f"/v2/fault/repo/blobs/{digest}"] = Behaviour(body=data, chunk=MiB)
    s3 = s3_proxy(fake.host)
    r = requests.get(f"{s3.proxy.url}/v2/fault/repo/blobs/{digest}", timeout=30)
    assert r.status_code == 200 and r.content == data  # forwarded; the client rejects it
    deadline = time.monotonic() + 10
    while "digest mismatch" not in s3.proxy.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "digest mismatch" in s3.proxy.log()
    assert s3.uploads() == []
    assert s3.objects() == set()
