"""Run the real proxy (gunicorn with gevent workers, or flask run) on loopback for e2e tests."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import requests
from urllib3.exceptions import InsecureRequestWarning

from .ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(sys.executable).parent


class ProxyError(RuntimeError):
    """The proxy failed to start; the message carries the end of its log."""


class ProxyServer:
    """One oci-pull-through instance with its own cache directory and log file."""

    def __init__(
        self,
        workdir: Path,
        env: Mapping[str, str],
        *,
        port: int | None = None,
        server: str = "gunicorn",
        tls: bool = False,
    ) -> None:
        """Describe an instance; env is layered over a minimal transparent/fs default."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.server = server
        self.tls = tls
        self.fs_root = self.workdir / "cache"
        self.log_path = self.workdir / "proxy.log"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "PROXY_MODE": "transparent",
            "STORAGE_BACKEND": "fs",
            "FS_ROOT": str(self.fs_root),
            "LISTEN_ADDR": f"127.0.0.1:{self.port}",
            "LOG_LEVEL": "info",
            "WEB_CONCURRENCY": "2",
            "UPSTREAM_READ_TIMEOUT": "10",
            "UPSTREAM_CONNECT_TIMEOUT": "3",
            **dict(env),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the proxy."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """host:port for image references."""
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The command line, exactly as the README documents it."""
        if self.server == "flask":
            return [
                str(BIN_DIR / "flask"),
                "--app",
                "wsgi",
                "run",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ]
        return [str(BIN_DIR / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"]

    def start(self, wait: bool = True) -> ProxyServer:
        """Start the server and wait for /healthz."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(),
            cwd=REPO_ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Poll /healthz until it answers, or fail with the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ProxyError(f"proxy exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with warnings.catch_warnings():
                    # the self-signed TLS mode is probed without verification
                    warnings.simplefilter("ignore", InsecureRequestWarning)
                    with requests.get(f"{self.url}/healthz", timeout=1, verify=False) as r:
                        if r.status_code == 200:
                            return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise ProxyError(f"proxy not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def worker_pids(self) -> list[int]:
        """gunicorn worker processes (children of the master)."""
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def signal(self, sig: int) -> None:
        """Send a signal to the server's master process."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 35.0) -> int | None:
        """SIGTERM, then SIGKILL the whole process group after timeout; returns the exit code."""
        code = None
        # requests leaves idle keep-alive sockets to the garbage collector; gunicorn's
        # graceful stop would wait graceful_timeout for those connections to go away.
        gc.collect()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                code = self.proc.wait()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> ProxyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- cache inspection ---------------------------------------------------------------

    def cached_blob(self, digest: str) -> Path:
        """Where the filesystem backend keeps a blob."""
        algorithm, hex_part = digest.split(":", 1)
        return self.fs_root / "blobs" / algorithm / hex_part

    def is_cached(self, digest: str) -> bool:
        """A blob is cached when its data and sidecar (the commit marker) both exist."""
        if self.env.get("STORAGE_BACKEND") == "s3":
            return all(
                self._s3_exists(key)
                for key in (self.s3_key(digest), self.s3_key(digest) + ".meta.json")
            )
        path = self.cached_blob(digest)
        return path.exists() and Path(f"{path}.meta.json").exists()

    def s3_key(self, digest: str) -> str:
        """The S3 key of a cached blob."""
        algorithm, hex_part = digest.split(":", 1)
        prefix = self.env.get("S3_PREFIX", "").strip("/")
        return f"{prefix}/blobs/{algorithm}/{hex_part}".lstrip("/")

    def s3_client(self) -> Any:
        """A boto3 client for the proxy's bucket, from the proxy's own environment."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.env["AWS_ENDPOINT_URL"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env.get("AWS_REGION", "us-east-1"),
            config=Config(s3={"addressing_style": "path"}),
        )

    def _s3_exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3_client().head_object(Bucket=self.env.get("S3_BUCKET", "oci-cache"), Key=key)
            return True
        except ClientError:
            return False

    def wait_cached(self, digests: object, timeout: float = 5.0) -> list[str]:
        """Wait for commits (they land just after the client's last byte); return those missing."""
        wanted = list(digests)  # type: ignore[call-overload]
        deadline = time.monotonic() + timeout
        while True:
            missing = [d for d in wanted if not self.is_cached(d)]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.05)

    def temp_files(self) -> list[Path]:
        """Leftovers of unfinished writes: temp files, or S3 multipart uploads."""
        if self.env.get("STORAGE_BACKEND") == "s3":
            listed = self.s3_client().list_multipart_uploads(
                Bucket=self.env.get("S3_BUCKET", "oci-cache")
            )
            return [Path(u["Key"]) for u in listed.get("Uploads", [])]
        if not self.fs_root.exists():
            return []
        return [p for p in self.fs_root.rglob(".tmp-*")]
