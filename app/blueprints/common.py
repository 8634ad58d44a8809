"""What the blueprints share: the app's objects, the request's log record, the proxy's realm."""

from __future__ import annotations

import socket
from collections.abc import Callable

from flask import current_app, request

from app.auth import realm
from app.auth.proxy import TokenProxy
from app.config import Config
from app.oci import Target
from app.reply import Reply
from app.reqlog import RequestRecord, record_of

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")


def config() -> Config:
    """The app's configuration."""
    return current_app.config["OCI_CONFIG"]


def token_proxy() -> TokenProxy:
    """The app's TokenProxy."""
    return current_app.extensions["oci_tokens"]


def log_record() -> RequestRecord:
    """This request's log record (reqlog.init_app creates and finishes it)."""
    found = record_of(request.environ)
    assert found is not None, "reqlog.init_app(app) was not called"
    return found


def public_base_url() -> str:
    """PUBLIC_URL, else this request's scheme and host (X-Forwarded-* only from trusted peers)."""
    environ = request.environ
    origin = realm.Origin(
        scheme=request.scheme,
        host=request.host,
        remote_addr=request.remote_addr,
        forwarded_proto=request.headers.get("X-Forwarded-Proto"),
        forwarded_host=request.headers.get("X-Forwarded-Host"),
        server=f"{environ.get('SERVER_NAME', 'localhost')}:{environ.get('SERVER_PORT', '80')}",
    )
    return realm.public_base_url(config(), origin)


def token_realm(ns: str | None = None) -> str:
    """The proxy's token endpoint for this request; containerd's namespace rides along."""
    return realm.token_realm(public_base_url(), ns)


def with_proxy_challenge(reply: Reply, target: Target, ns: str | None) -> Reply:
    """An upstream 401 re-issued with the proxy's realm (worked out only for a 401)."""
    if reply.status != 401:
        return reply
    return realm.with_proxy_challenge(reply, target, token_realm(ns))


def client_gone_check() -> Callable[[], bool] | None:
    """Under gunicorn: whether the client (or asking replica) has hung up: a peek, never a read."""
    sock = request.environ.get("gunicorn.socket")
    raw = getattr(sock, "_sock", sock)  # gevent's wrapper would wait instead of answering
    if raw is None:
        return None

    def gone() -> bool:
        try:
            return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    return gone
