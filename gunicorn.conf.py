"""gunicorn settings for oci-pull-through, from the same environment as the app.

Imports nothing from app and nothing that loads ssl or requests: the gevent
worker must monkey-patch before those are imported (no preload either).
"""

import os

from dotenv import load_dotenv

load_dotenv()


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
