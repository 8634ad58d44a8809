"""A private containerd daemon and its `ctr` client, for end-to-end pulls through the proxy."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

CONTAINERD, CTR = "containerd", "ctr"

# CRI and the other daemon-side plugins are not needed to pull; "isolated" makes each
# namespace fetch its own copy of every blob, so each pull really goes to the registry.
_CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{address}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"
"""


class ContainerdError(RuntimeError):
    """containerd did not start."""


class Containerd:
    """containerd with its own root, state, socket and config, all under one directory."""

    def __init__(self, workdir: Path) -> None:
        """Describe the daemon; nothing runs until start()."""
        self.workdir = Path(workdir)
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        # unix socket paths are limited to 108 bytes: keep the socket short
        self.address = f"/tmp/ctrd-{uuid.uuid4().hex[:10]}.sock"
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Containerd:
        """Start the daemon and wait until `ctr version` answers."""
        for tool in (CONTAINERD, CTR):
            if shutil.which(tool) is None:
                raise ContainerdError(f"{tool} not found on PATH (Debian package containerd)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            _CONFIG.format(root=self.root, state=self.state, address=self.address)
        )
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [CONTAINERD, "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ContainerdError(f"containerd exited:\n{self.log()[-3000:]}")
            if self.ctr("version").returncode == 0:
                return self
            time.sleep(0.1)
        self.stop()
        raise ContainerdError(f"containerd not ready after {timeout}s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; remove the sockets."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for path in (self.address, f"{self.address}.ttrpc"):
            Path(path).unlink(missing_ok=True)

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        """What the daemon printed."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ctr(
        self, *args: str, namespace: str = "default", timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ctr against this daemon; never raises on exit status."""
        cmd = [CTR, "--address", self.address, "--namespace", namespace, *args]
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )

    def pull(
        self,
        ref: str,
        *,
        user: str | None = None,
        hosts_dir: Path | None = None,
        platform: str = "linux/amd64",
    ) -> subprocess.CompletedProcess[str]:
        """`ctr image pull --plain-http` into a fresh namespace, so nothing is reused."""
        args = ["image", "pull", "--plain-http", "--platform", platform]
        args += ["--snapshotter", "native"]
        if user:
            args += ["--user", user]
        if hosts_dir is not None:
            args += ["--hosts-dir", str(hosts_dir)]
        return self.ctr(*args, ref, namespace=f"t{uuid.uuid4().hex[:12]}")

    def content_digests(self, namespace: str) -> set[str]:
        """Digests in a namespace's content store."""
        out = self.ctr("content", "ls", "-q", namespace=namespace).stdout
        return {line.strip() for line in out.splitlines() if line.strip()}


def write_mirror(hosts_dir: Path, registry: str, mirror_url: str, server: str) -> Path:
    """A hosts.toml that sends every pull of `registry` to the proxy (containerd adds ?ns=)."""
    directory = hosts_dir / registry
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hosts.toml"
    path.write_text(
        f'server = "{server}"\n\n'
        f'[host."{mirror_url}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        "  skip_verify = true\n"
    )
    return path
