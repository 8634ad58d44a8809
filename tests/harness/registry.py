"""Run a real distribution 2.8 ``docker-registry`` process for end-to-end tests."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

from .ports import free_port
from .tokenserver import TokenServer

AuthMode = Literal["anonymous", "htpasswd", "token"]

REGISTRY_BINARY = "docker-registry"
HTPASSWD_BINARY = "htpasswd"

# Apache combined format written by gorilla's CombinedLoggingHandler, e.g.
# 127.0.0.1 - - [28/Nov/2026:20:03:08 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
_ACCESS_RE = re.compile(
    r'^(?P<remote>\S+) \S+ (?P<user>\S+) \[[^\]]+\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" '
    r"(?P<status>\d{3}) (?P<size>\d+|-)"
)
_BLOB_RE = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})(?:\?.*)?$")


class RegistryError(RuntimeError):
    """Raised when the registry cannot be started or misbehaves."""


class AccessLogEntry(NamedTuple):
    """One parsed access-log line: (method, path, status); path is the raw request target."""

    method: str
    path: str
    status: int

    @property
    def blob_digest(self) -> str | None:
        """The digest if this is a /v2/<repo>/blobs/<digest> request, else None."""
        m = _BLOB_RE.match(self.path)
        return m.group("digest") if m else None


def parse_access_log(text: str) -> list[AccessLogEntry]:
    """Extract access-log entries from mixed registry output."""
    entries = []
    for line in text.splitlines():
        m = _ACCESS_RE.match(line)
        if m:
            entries.append(AccessLogEntry(m["method"], m["path"], int(m["status"])))
    return entries


def make_htpasswd(users: Mapping[str, str], path: Path) -> Path:
    """Write a bcrypt htpasswd file for ``users`` using ``htpasswd -Bbn``."""
    exe = shutil.which(HTPASSWD_BINARY)
    if exe is None:
        raise RegistryError("htpasswd not found on PATH (Debian package apache2-utils)")
    lines = []
    for user, password in users.items():
        out = subprocess.run(
            [exe, "-Bbn", user, password], check=True, capture_output=True, text=True, timeout=30
        ).stdout
        lines.append(out.strip())
    path.write_text("\n".join(lines) + "\n")
    return path


class Registry:
    """A ``docker-registry`` process with its own storage, config and log file."""

    def __init__(
        self,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        hostname: str | None = None,
        auth: AuthMode = "anonymous",
        users: Mapping[str, str] | None = None,
        token_server: TokenServer | None = None,
        realm: str = "test-registry",
        extra_config: Mapping[str, Any] | None = None,
        startup_timeout: float = 15.0,
    ) -> None:
        """Describe a registry; ``hostname`` (e.g. an /etc/hosts alias) names it in refs."""
        if auth not in ("anonymous", "htpasswd", "token"):
            raise ValueError(f"unknown auth mode {auth!r}")
        if auth == "htpasswd" and not users:
            raise ValueError("auth='htpasswd' needs users={name: password}")
        if auth == "token" and token_server is None:
            raise ValueError("auth='token' needs token_server=TokenServer(...)")
        self.workdir = Path(workdir)
        self.bind_host = host
        self.hostname = hostname or host
        self.port = port or 0
        self._fixed_port = port is not None
        self.auth: AuthMode = auth
        self.users: dict[str, str] = dict(users or {})
        self.token_server = token_server
        self.realm = realm
        self.extra_config = dict(extra_config or {})
        self.startup_timeout = startup_timeout
        self.storage_dir = self.workdir / "storage"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.htpasswd_path = self.workdir / "htpasswd"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._log_offset = 0

    # -- addresses ---------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """``host:port`` as used in image references (no port when it is 80)."""
        return self.hostname if self.port == 80 else f"{self.hostname}:{self.port}"

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:5000."""
        return f"http://{self.host}"

    @property
    def pid(self) -> int | None:
        """PID of the running process, if any."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- config ------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """Return the registry configuration as a dict (written as JSON, which is YAML)."""
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            # No http.debug: the debug/metrics server stays off, the only listener is addr.
            "http": {
                "addr": f"{self.bind_host}:{self.port}",
                "secret": "e2e-harness-not-secret",
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if self.auth == "htpasswd":
            cfg["auth"] = {"htpasswd": {"realm": self.realm, "path": str(self.htpasswd_path)}}
        elif self.auth == "token":
            ts = self.token_server
            assert ts is not None
            cfg["auth"] = {
                "token": {
                    "realm": ts.realm,
                    "service": ts.service,
                    "issuer": ts.issuer,
                    "rootcertbundle": str(ts.cert_path),
                }
            }
        _deep_merge(cfg, self.extra_config)
        return cfg

    def _write_files(self) -> None:
        """Write config, htpasswd and token cert files into the work dir."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(exist_ok=True)
        if self.auth == "htpasswd":
            make_htpasswd(self.users, self.htpasswd_path)
        if self.auth == "token":
            ts = self.token_server
            assert ts is not None
            ts.cert_path.parent.mkdir(parents=True, exist_ok=True)
            ts.cert_path.write_bytes(ts.cert_pem)
        self.config_path.write_text(json.dumps(self.config(), indent=2))

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Registry:
        """Start the process and wait until GET /v2/ answers."""
        if self.running:
            return self
        exe = shutil.which(REGISTRY_BINARY)
        if exe is None:
            raise RegistryError(
                f"{REGISTRY_BINARY} not found on PATH (Debian package docker-registry)"
            )
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            if not self._fixed_port and (attempt or not self.port):
                self.port = free_port(self.bind_host)
            self._write_files()
            self._spawn(exe)
            try:
                self._wait_ready()
                return self
            except RegistryError:
                tail = self.log_text()[-2000:]
                self._terminate()
                if "address already in use" in tail and attempt + 1 < attempts:
                    continue
                raise RegistryError(
                    f"registry on {self.url} did not become ready; log tail:\n{tail}"
                ) from None
        raise AssertionError("unreachable")

    def _spawn(self, exe: str) -> None:
        """Launch the registry with output appended to the log file."""
        self._log_fh = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        try:
            self._proc = subprocess.Popen(
                [exe, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=self._log_fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError:
            self._log_fh.close()
            self._log_fh = None
            raise

    def _wait_ready(self) -> None:
        """Poll GET /v2/ until it answers 200 or 401."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RegistryError("registry process exited during startup")
            try:
                status = self.ping()
            except OSError:
                status = None
            if status in (200, 401):
                return
            time.sleep(0.05)
        raise RegistryError("timed out waiting for /v2/")

    def ping(self, timeout: float = 2.0) -> int:
        """Return the status of GET /v2/ (raises OSError if nothing listens)."""
        conn = http.client.HTTPConnection(self.bind_host, self.port, timeout=timeout)
        try:
            conn.request("GET", "/v2/")
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop with SIGTERM, falling back to SIGKILL after ``timeout`` seconds."""
        self._terminate(timeout)

    def _terminate(self, timeout: float = 10.0) -> None:
        """Terminate the process (if any) and close the log handle."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def restart(self) -> Registry:
        """Stop and start again on the same port with the same storage."""
        self.stop()
        fixed, self._fixed_port = self._fixed_port, True
        try:
            return self.start()
        finally:
            self._fixed_port = fixed

    def __enter__(self) -> Registry:
        """Start on entering a ``with`` block."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop on leaving a ``with`` block."""
        self.stop()

    # -- logs --------------------------------------------------------------------------------

    def log_text(self, since: int = 0) -> str:
        """Return the raw log (registry stdout+stderr) from byte offset ``since``."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as fh:
            fh.seek(since)
            return fh.read().decode("utf-8", "replace")

    def mark(self) -> int:
        """Return a marker (byte offset) to pass as ``since`` to the log readers."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def clear_log(self) -> None:
        """Make ``requests_log()`` without ``since`` ignore everything logged so far."""
        self._log_offset = self.mark()

    def requests_log(self, since: int | None = None) -> list[AccessLogEntry]:
        """Return parsed access-log entries after ``since`` (default: the last clear_log)."""
        return parse_access_log(self.log_text(self._log_offset if since is None else since))

    def blob_gets(self, since: int | None = None) -> list[AccessLogEntry]:
        """Return the GET /v2/<repo>/blobs/<digest> entries (any status) after ``since``."""
        return [e for e in self.requests_log(since) if e.method == "GET" and e.blob_digest]

    def wait_for_requests(
        self,
        predicate: Callable[[list[AccessLogEntry]], bool],
        since: int | None = None,
        timeout: float = 5.0,
    ) -> list[AccessLogEntry]:
        """Poll the access log until ``predicate(entries)`` holds; lines land after responses."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.requests_log(since)
            if predicate(entries):
                return entries
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"access log condition not met within {timeout}s; entries: {entries}"
                )
            time.sleep(0.05)


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    """Recursively merge ``extra`` into ``base`` in place."""
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
