"""docs/clients.md: its snippets, taken from the markdown, drive real containerd and podman.

Each snippet is used verbatim apart from addresses: the cache's documented address becomes
the test proxy, and the example registry (ghcr.io) becomes the test upstream's port-less
alias. The Docker, k3s and kind snippets have no runtime here; they are parsed and checked
to send the same requests as the tested ones. Blocks no test can run (containerd 2.x) are
marked untested on the page, with the reason, and their structure is checked.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from test_deploy_nginx import Nginx, ScratchCA

from tests.harness import ALIAS, BuiltImage, Registry
from tests.harness.proxyproc import REPO_ROOT, ProxyServer

pytestmark = pytest.mark.e2e
DOC = REPO_ROOT / "docs" / "clients.md"
DOC_ADDRESS = "oci-cache.internal:8080"
DOC_REGISTRY = "ghcr.io"
_SNIPPET = re.compile(
    r"<!-- snippet: (?P<name>[\w-]+) -->\s*```(?P<lang>\w+)\n(?P<body>.*?)```", re.S
)
_UNTESTED = re.compile(
    r"<!-- untested: (?P<why>[^>]+?) -->\s*```(?P<lang>\w+)\n(?P<body>.*?)```", re.S
)
_FENCE = re.compile(r"^```\w+\n(?:.*?\n)?```$", re.S | re.M)


def snippets() -> dict[str, str]:
    """Every marked fenced block of docs/clients.md, by name."""
    found = {m["name"]: m["body"] for m in _SNIPPET.finditer(DOC.read_text())}
    expected = {
        "containerd-config",
        "containerd-mirror",
        "containerd-default",
        "containerd-tls",
        "containerd-path",
        "docker-daemon",
        "registries-conf",
        "k3s-registries",
        "kind-config",
    }
    assert set(found) == expected, set(found) ^ expected
    return found


def localise(text: str, proxy: ProxyServer | str) -> str:
    """Only the addresses change: the cache's and the example registry's."""
    assert DOC_ADDRESS in text
    host = proxy if isinstance(proxy, str) else proxy.host
    return text.replace(DOC_ADDRESS, host).replace(DOC_REGISTRY, ALIAS)


def test_every_block_is_tested_or_marked_untested_with_why() -> None:
    """A block without a mark would be an untested claim nobody noticed."""
    text = DOC.read_text()
    blocks = [m.start() for m in _FENCE.finditer(text)]
    marked = {m.start("lang") - 3 for m in _SNIPPET.finditer(text)}
    marked |= {m.start("lang") - 3 for m in _UNTESTED.finditer(text)}
    assert blocks and set(blocks) == marked, "unmarked block(s) at offsets " + str(
        sorted(set(blocks) - marked)
    )
    for m in _UNTESTED.finditer(text):
        assert len(m["why"].split()) >= 3, "say why it is untested"


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    assert found, f"{name} not found (Debian package: scripts/install-test-deps.sh)"
    return found


class Containerd:
    """A private containerd: own root, state, socket and config; no CRI plugin."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True)
        self.address = str(workdir / "containerd.sock")
        self.config = workdir / "config.toml"
        self.config.write_text(
            "version = 2\n"
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.address}"\n'
            "[metrics]\n"
            '  address = ""\n'
        )
        self.log = (workdir / "containerd.log").open("wb")
        self.proc = subprocess.Popen(
            [
                tool("containerd"),
                "--config",
                str(self.config),
                "--root",
                str(workdir / "root"),
                "--state",
                str(workdir / "state"),
                "--address",
                self.address,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while self.ctr("version").returncode != 0:
            assert self.proc.poll() is None, self.log_text()
            assert time.monotonic() < deadline, self.log_text()
            time.sleep(0.2)

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [tool("ctr"), "--address", self.address, "--namespace", "e2e", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def log_text(self) -> str:
        return (self.workdir / "containerd.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    daemon = Containerd(tmp_path / "containerd")
    yield daemon
    daemon.stop()


def _proxy_requests(proxy: ProxyServer) -> list[str]:
    """The proxy's request log lines for the test image (one per request, SPEC §11)."""
    return [line for line in proxy.log().splitlines() if f"{ALIAS}/e2e/app" in line]


# containerd adds ?ns=<registry> to override_path requests too; app/oci.py drops a first
# path segment that names the same registry as ns, so both forms work.
@pytest.mark.parametrize("form", ["containerd-mirror", "containerd-path"])
def test_containerd_pulls_through_the_documented_hosts_toml(
    form: str,
    containerd: Containerd,
    make_proxy: Callable[..., ProxyServer],
    alias_upstream: Registry,
    image: BuiltImage,
    tmp_path: Path,
) -> None:
    """ctr with --hosts-dir holding the snippet: every blob comes through the cache."""
    proxy = make_proxy({"INSECURE_REGISTRIES": ALIAS})
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / ALIAS).mkdir(parents=True)
    (hosts_dir / ALIAS / "hosts.toml").write_text(localise(snippets()[form], proxy))
    pulled = containerd.ctr(
        "images",
        "pull",
        "--hosts-dir",
        str(hosts_dir),
        "--all-platforms",
        f"{ALIAS}/e2e/app:v1",
    )
    assert pulled.returncode == 0, pulled.stderr + containerd.log_text()
    assert proxy.wait_cached(image.blobs()) == [], "every blob went through the cache"
    listed = containerd.ctr("images", "ls", "-q")
    assert f"{ALIAS}/e2e/app:v1" in listed.stdout.split()
    content = containerd.ctr("content", "ls", "-q").stdout.split()
    assert set(image.all_blobs()) <= set(content)


def _pull_with_hosts_dir(containerd: Containerd, hosts_dir: Path) -> None:
    """ctr pulls the test image (every platform) with this hosts directory."""
    pulled = containerd.ctr(
        "images", "pull", "--hosts-dir", str(hosts_dir), "--all-platforms", f"{ALIAS}/e2e/app:v1"
    )
    assert pulled.returncode == 0, pulled.stderr + containerd.log_text()


def test_containerd_default_directory_catches_every_registry(
    containerd: Containerd,
    make_proxy: Callable[..., ProxyServer],
    alias_upstream: Registry,
    image: BuiltImage,
    tmp_path: Path,
) -> None:
    """Only _default/hosts.toml (no directory for the registry): the pull still goes through."""
    proxy = make_proxy({"INSECURE_REGISTRIES": ALIAS})
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / "_default").mkdir(parents=True)
    (hosts_dir / "_default" / "hosts.toml").write_text(
        localise(snippets()["containerd-default"], proxy)
    )
    _pull_with_hosts_dir(containerd, hosts_dir)
    assert proxy.wait_cached(image.blobs()) == [], "every blob went through the cache"
    # The path carries no registry: it came from ?ns=, the mirror form.
    assert _proxy_requests(proxy), f"requests for {ALIAS}/e2e/app in the proxy's log"


def test_containerd_pulls_through_a_tls_cache_trusting_the_documented_ca(
    containerd: Containerd,
    make_proxy: Callable[..., ProxyServer],
    alias_upstream: Registry,
    image: BuiltImage,
    tmp_path: Path,
) -> None:
    """The TLS snippet: https to deploy/nginx/ in front of the cache, verified with `ca`."""
    proxy = make_proxy({"INSECURE_REGISTRIES": ALIAS})
    ca = ScratchCA(tmp_path / "ca")
    nginx = Nginx(tmp_path / "nginx", ca, {"127.0.0.1:8080": proxy.port}).start()
    try:
        hosts_dir = tmp_path / "certs.d"
        (hosts_dir / ALIAS).mkdir(parents=True)
        text = localise(snippets()["containerd-tls"], nginx.host)
        documented_ca = "/etc/containerd/certs.d/oci-cache-ca.crt"
        assert documented_ca in text
        (hosts_dir / ALIAS / "hosts.toml").write_text(text.replace(documented_ca, str(ca.ca_path)))
        _pull_with_hosts_dir(containerd, hosts_dir)
        assert proxy.wait_cached(image.blobs()) == [], "every blob went through nginx and the cache"
        assert any("/e2e/app/blobs/" in line for line in nginx.access_log())
    finally:
        nginx.stop()


def test_containerd_1_6_reads_config_path_from_the_documented_config() -> None:
    """containerd's own config dump shows config_path set (without `version = 2` it is not)."""
    with tempfile.TemporaryDirectory() as workdir:
        config = Path(workdir) / "config.toml"
        config.write_text(snippets()["containerd-config"])
        dump = subprocess.run(
            [tool("containerd"), "--config", str(config), "config", "dump"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert dump.returncode == 0, dump.stderr
    merged = tomllib.loads(dump.stdout)
    registry = merged["plugins"]["io.containerd.grpc.v1.cri"]["registry"]
    assert registry["config_path"] == "/etc/containerd/certs.d"


def test_podman_pulls_through_the_documented_registries_conf(
    make_proxy: Callable[..., ProxyServer],
    alias_upstream: Registry,
    image: BuiltImage,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Both mirrors of the snippet: docker.io host-less, the other registry path-encoded."""
    proxy = make_proxy({"UPSTREAM_REGISTRY": ALIAS, "INSECURE_REGISTRIES": ALIAS})
    conf = tmp_path / "registries.conf"
    short_dir = Path(tempfile.mkdtemp(prefix="podman-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(short_dir, ignore_errors=True))
    conf.write_text(localise(snippets()["registries-conf"], proxy))
    podman = [
        tool("podman"),
        "--root",
        str(tmp_path / "root"),
        "--runroot",
        str(short_dir / "runroot"),  # podman refuses a runroot longer than 50 characters
        "--storage-driver",
        "vfs",
        "--cgroup-manager",
        "cgroupfs",
        "--events-backend",
        "none",
    ]
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(tmp_path),
        "CONTAINERS_REGISTRIES_CONF": str(conf),
        "XDG_RUNTIME_DIR": str(tmp_path / "xdg"),
    }
    for ref in ("docker.io/e2e/app:v1", f"{ALIAS}/e2e/app:v1"):
        mark = len(_proxy_requests(proxy))
        pulled = subprocess.run(
            [*podman, "pull", "--arch", "amd64", "--os", "linux", ref],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        )
        assert pulled.returncode == 0, pulled.stderr + proxy.log()[-2000:]
        assert _proxy_requests(proxy)[mark:], f"{ref} did not go through the cache"
    amd64 = image.platform("linux/amd64")
    assert proxy.wait_cached([b.digest for b in amd64.blobs()]) == []
    images = subprocess.run(
        [*podman, "images", "--format", "{{.Repository}}:{{.Tag}}"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert "docker.io/e2e/app:v1" in images.stdout and f"{ALIAS}/e2e/app:v1" in images.stdout


def test_docker_k3s_and_kind_snippets_match_the_tested_forms() -> None:
    """No Docker, k3s or kind here: check they parse and send what the tested snippets send."""
    found = snippets()
    address = f"http://{DOC_ADDRESS}"
    daemon = json.loads(found["docker-daemon"])
    # registry-mirrors sends the host-less form, as the docker.io mirror of registries.conf.
    assert daemon == {"registry-mirrors": [address], "insecure-registries": [DOC_ADDRESS]}
    registries = tomllib.loads(found["registries-conf"])["registry"]
    hub = next(r for r in registries if r["prefix"] == "docker.io")
    assert hub["mirror"] == [{"location": DOC_ADDRESS, "insecure": True}]
    # k3s turns each endpoint into a containerd hosts.toml mirror: the ?ns= form tested above.
    k3s = yaml.safe_load(found["k3s-registries"])
    mirror = tomllib.loads(found["containerd-mirror"])
    assert list(mirror["host"]) == [address]
    for name in ("docker.io", "*"):
        assert k3s["mirrors"][name]["endpoint"] == [address]
    path_form = tomllib.loads(found["containerd-path"])
    (path_host,) = path_form["host"].values()
    assert path_host["override_path"] is True
    assert list(path_form["host"]) == [f"{address}/v2/{DOC_REGISTRY}"]
    # kind: the CRI plugin reads the mounted hosts directory of the containerd snippets.
    kind = yaml.safe_load(found["kind-config"])
    assert kind["apiVersion"] == "kind.x-k8s.io/v1alpha4" and kind["kind"] == "Cluster"
    (patch,) = kind["containerdConfigPatches"]
    registry = tomllib.loads(patch)["plugins"]["io.containerd.grpc.v1.cri"]["registry"]
    (mount,) = kind["nodes"][0]["extraMounts"]
    assert registry["config_path"] == mount["containerPath"] == "/etc/containerd/certs.d"


def test_containerd_2_config_names_the_images_plugin() -> None:
    """Untested on a runtime (no containerd 2.x here): version 3 and the 2.x plugin path."""
    (block,) = [m for m in _UNTESTED.finditer(DOC.read_text()) if "containerd 2.x" in m["body"]]
    config = tomllib.loads(block["body"])
    assert config["version"] == 3
    registry = config["plugins"]["io.containerd.cri.v1.images"]["registry"]
    one_six = tomllib.loads(snippets()["containerd-config"])
    assert registry == one_six["plugins"]["io.containerd.grpc.v1.cri"]["registry"]
