"""gunicorn settings for oci-pull-through, from the same environment as the app.

Imports nothing from app and nothing that loads ssl or requests: the gevent
worker must monkey-patch before those are imported (no preload either).
"""

import logging
import os
import secrets
import tempfile

from dotenv import load_dotenv
from gunicorn import glogging

load_dotenv()
# TOKEN_SECRET unset: one random per-start key for proxy tokens, shared by every worker
# (forked workers inherit the environment); app/config.py reads it.
if not os.environ.get("TOKEN_SECRET", "").strip():
    os.environ.setdefault("OCI_PULL_THROUGH_EPHEMERAL_TOKEN_SECRET", secrets.token_urlsafe(32))


# Prometheus multiprocess mode (app/metrics.py): every worker writes its figures to this
# directory and /metrics sums them. It must be in the environment before the workers fork
# (prometheus-client reads it when first imported); on_exit removes a directory made here.
_OWNED = "OCI_PULL_THROUGH_METRICS_DIR_OWNED"
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip():
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="oci-pull-through-metrics-")
    os.environ[_OWNED] = "1"
elif not os.environ.get(_OWNED):  # an operator's directory: clear a previous run's figures
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    for _stale in os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]):
        if _stale.endswith(".db"):
            os.unlink(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], _stale))
    os.environ[_OWNED] = "0"


def _flag(name: str, default: bool = False) -> bool:
    return os.environ.get(name, str(default)).strip().lower() in ("1", "true", "yes", "on")


def _bind(addr: str) -> str:
    host, _, port = addr.rpartition(":")
    return f"{host or '0.0.0.0'}:{port}"


_tls = _flag("GENERATE_SELF_SIGNED_TLS")
bind = [_bind(os.environ.get("LISTEN_ADDR", "").strip() or (":8443" if _tls else ":8080"))]
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_connections = 1000
timeout = 60
graceful_timeout = 30
keepalive = 75
preload_app = False
control_socket_disable = True
accesslog = None  # the app writes one request line per request itself
errorlog = "-"
_level = os.environ.get("LOG_LEVEL", "info").strip().lower()
loglevel = "warning" if _level == "warn" else _level
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
http_protocols = "h2,h1"
http2_cleartext = "both"


def _self_signed_memfd() -> str:
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


if _tls:
    certfile = keyfile = _self_signed_memfd()


def on_starting(server):
    """Refuse to start on an invalid configuration, with one clear line and no worker churn.

    The check runs in a child process: the master must not import the app before the
    gevent workers have monkey-patched.
    """
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from app.cli import check_config; sys.exit(check_config())",
        ],
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    if proc.returncode != 0:
        raise SystemExit(proc.returncode)


class _JsonLines(logging.Formatter):
    """gunicorn's own lines as JSON for LOG_FORMAT=json (app/logfmt.py is not imported here)."""

    def format(self, record):
        import datetime
        import json

        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        doc = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": {"WARNING": "warn"}.get(record.levelname, record.levelname.lower()),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            doc["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        return json.dumps(doc)


class _JsonLogger(glogging.Logger):
    """gunicorn's logger with its error log (master and workers) in JSON lines."""

    def setup(self, cfg):
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(_JsonLines())


if os.environ.get("LOG_FORMAT", "").strip().lower() == "json":
    logger_class = _JsonLogger


def child_exit(server, worker):
    """A dead worker's live gauges (transfers in flight) no longer count."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics directory this server created."""
    import shutil

    if os.environ.get(_OWNED) == "1":
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def post_worker_init(worker):
    """Zero-copy hits: give gevent's socket a cooperative os.sendfile loop.

    gevent's socket.sendfile reads and sends 8 KiB blocks through Python; gunicorn
    calls it for wsgi.file_wrapper responses. tests/e2e/test_sendfile.py counts the
    sendfile system calls so an upgrade cannot silently undo this.
    """
    from gevent import socket as gsocket

    def sendfile(self, file, offset=0, count=None):
        in_fd, out_fd = file.fileno(), self.fileno()
        if count is None:
            count = os.fstat(in_fd).st_size - offset
        sent_total = 0
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
        return sent_total

    gsocket.socket.sendfile = sendfile
