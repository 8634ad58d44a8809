"""What gunicorn's settings (app/gunicorn_conf.py) need beyond plain values, and its hooks.

The gunicorn master imports this before its gevent workers monkey-patch (there is no
preload), so at import time it loads only the standard library, app.config and app.logfmt:
never ssl, requests, urllib3 or Flask (tests/e2e/test_serving.py checks). Third-party
modules are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.config import EPHEMERAL_SECRET, Config, ConfigError
from app.envreader import Reader
from app.logfmt import make_formatter

METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
_OWNED = "OCI_PULL_THROUGH_METRICS_DIR_OWNED"  # "1": made here and removed on exit


@dataclass(frozen=True)
class Limits:
    """What a slow, idle or hostile client may hold: app/worker.py enforces them."""

    header_timeout: float = 30.0  # request line and headers, from the first byte
    keepalive_timeout: float = 15.0  # idle between two requests of one connection
    send_timeout: float = 60.0  # a client that takes no bytes of its answer that long is cut
    worker_connections: int = 1000  # connection slots per worker

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Limits:
        """HEADER_TIMEOUT, KEEPALIVE_TIMEOUT, SEND_TIMEOUT and WORKER_CONNECTIONS, validated."""
        reader = Reader(os.environ if environ is None else environ)
        return cls(
            header_timeout=reader.seconds("HEADER_TIMEOUT", 30.0),
            keepalive_timeout=reader.seconds("KEEPALIVE_TIMEOUT", 15.0),
            send_timeout=reader.seconds("SEND_TIMEOUT", 60.0),
            worker_connections=reader.integer("WORKER_CONNECTIONS", 1000, minimum=1),
        )


@dataclass(frozen=True)
class Settings:
    """The environment as gunicorn needs it: the app's Config, worker count and limits."""

    config: Config
    workers: int
    limits: Limits = Limits()


def load() -> Settings:
    """Read .env and the environment once, by app/config.py's rules; one line and exit if bad."""
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True))
    try:
        config = Config.from_env()
        workers = Reader(os.environ).integer("WEB_CONCURRENCY", 2, minimum=1)
        limits = Limits.from_env()
    except ConfigError as error:
        print(f"oci-pull-through: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    share_token_key(config)
    prepare_metrics_dir()
    return Settings(config, workers, limits)


def bind_address(listen_addr: str) -> str:
    """LISTEN_ADDR as gunicorn binds it: an empty host means every IPv4 address."""
    host, _, port = listen_addr.rpartition(":")
    return f"{host or '0.0.0.0'}:{port}"


def share_token_key(config: Config) -> None:
    """TOKEN_SECRET unset: one random key per start, inherited by every forked worker."""
    if config.token_secret_ephemeral:
        os.environ.setdefault(EPHEMERAL_SECRET, secrets.token_urlsafe(32))


def prepare_metrics_dir() -> None:
    """Prometheus multiprocess mode needs its directory in the environment before workers fork.

    Unset: a fresh temporary directory, removed on exit. An operator's directory: the
    figures of a previous run are cleared.
    """
    if not os.environ.get(METRICS_DIR, "").strip():
        os.environ[METRICS_DIR] = tempfile.mkdtemp(prefix="oci-pull-through-metrics-")
        os.environ[_OWNED] = "1"
    elif not os.environ.get(_OWNED):
        os.makedirs(os.environ[METRICS_DIR], exist_ok=True)
        for stale in os.listdir(os.environ[METRICS_DIR]):
            if stale.endswith(".db"):
                os.unlink(os.path.join(os.environ[METRICS_DIR], stale))
        os.environ[_OWNED] = "0"


def self_signed_memfd() -> str:
    """An ECDSA P-256 certificate and key in an anonymous memory file: nothing on disk."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "oci-pull-through")])
    now = datetime.datetime.now(datetime.UTC)
    sans = [
        x509.DNSName("localhost"),
        x509.DNSName("host.docker.internal"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.memfd_create("oci-pull-through-tls", 0)
    os.write(fd, pem)
    return f"/proc/self/fd/{fd}"


def json_logger_class(log_level: str) -> type:
    """gunicorn's logger with its error log (master and workers) in the app's JSON lines."""
    from gunicorn import glogging

    class JsonLogger(glogging.Logger):
        def setup(self, cfg: Any) -> None:
            super().setup(cfg)
            for handler in self.error_log.handlers:
                handler.setFormatter(make_formatter("json", log_level))

    return JsonLogger


def post_worker_init(worker: Any) -> None:
    """Zero-copy hits: gevent's socket.sendfile copies 8 KiB blocks through Python.

    gunicorn calls it for wsgi.file_wrapper responses; this cooperative os.sendfile loop
    replaces it. tests/e2e/test_serving.py (test_filesystem_hits_use_sendfile) counts the
    sendfile system calls so an upgrade cannot silently undo this.
    """
    from gevent import socket as gsocket

    def sendfile(self: Any, file: Any, offset: int = 0, count: int | None = None) -> int:
        in_fd, out_fd = file.fileno(), self.fileno()
        if count is None:
            count = os.fstat(in_fd).st_size - offset
        # Corked, the kernel sends full segments only (nginx's tcp_nopush): one client's
        # 256 MiB hit went from ~0.8 to ~0.95 x nginx. Uncorked at the end, so the last
        # partial segment leaves at once.
        corked = self.family in (socket.AF_INET, socket.AF_INET6)
        if corked:
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        sent_total = 0
        try:
            while sent_total < count:
                try:
                    sent = os.sendfile(
                        out_fd, in_fd, offset + sent_total, min(count - sent_total, 1 << 30)
                    )
                except BlockingIOError:
                    self._wait(self._write_event)
                    continue
                if sent == 0:
                    break
                sent_total += sent
        finally:
            if corked:
                with contextlib.suppress(OSError):  # the client may be gone
                    self.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        return sent_total

    gsocket.socket.sendfile = sendfile


def child_exit(server: Any, worker: Any) -> None:
    """A dead worker's live gauges (transfers in flight) no longer count."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    """Remove the metrics directory this server created."""
    if os.environ.get(_OWNED) == "1":
        shutil.rmtree(os.environ[METRICS_DIR], ignore_errors=True)
