"""The proxy's own side of the dance: its public URL, its token realm, the challenges it sends.

No Flask here: the blueprints describe how a request reached the proxy as an Origin.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import quote

from app.config import Config
from app.oci import Target
from app.reply import Reply

SERVICE = "oci-pull-through"
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]+(?::\d{1,5})?|\[[0-9A-Fa-f:.]+\](?::\d{1,5})?")


@dataclass(frozen=True)
class Origin:
    """How one request reached the proxy, as far as its public URL is concerned."""

    scheme: str
    host: str
    remote_addr: str | None = None
    forwarded_proto: str | None = None
    forwarded_host: str | None = None
    server: str = "localhost:80"  # SERVER_NAME:SERVER_PORT, for a Host header that is no host


def _first(value: str | None) -> str:
    return (value or "").split(",")[0].strip()


def trusted(remote: str | None, allowed: tuple[str, ...]) -> bool:
    """gunicorn's forwarded_allow_ips rule: listed IPs or networks, `*`, or no IP (unix socket)."""
    if "*" in allowed:
        return True
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return True
    return any(address in ipaddress.ip_network(item, strict=False) for item in allowed)


def public_base_url(config: Config, origin: Origin) -> str:
    """PUBLIC_URL, else the request's scheme and host (X-Forwarded-* only from trusted peers)."""
    if config.public_url:
        return config.public_url
    scheme, host = origin.scheme, origin.host
    if trusted(origin.remote_addr, config.forwarded_allow_ips):
        proto = _first(origin.forwarded_proto).lower()
        forwarded_host = _first(origin.forwarded_host)
        scheme = proto if proto in ("http", "https") else scheme
        host = forwarded_host or host
    if not _HOST_RE.fullmatch(host):
        host = origin.server
    return f"{scheme}://{host}"


def token_realm(base_url: str, ns: str | None = None) -> str:
    """The proxy's token endpoint; containerd's mirror namespace rides along as ?ns=."""
    realm = f"{base_url}/v2/token"
    return f"{realm}?ns={quote(ns, safe=':[]')}" if ns else realm


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def proxy_challenge(realm: str, scope: str | None = None) -> str:
    """The WWW-Authenticate the proxy sends: its own token endpoint, the client-side scope."""
    header = f'Bearer realm="{_quote(realm)}",service="{SERVICE}"'
    if scope:
        header += f',scope="{_quote(scope)}"'
    return header


def with_proxy_challenge(reply: Reply, target: Target, realm: str) -> Reply:
    """An upstream 401 re-issued with the proxy's realm and the client-side scope."""
    if reply.status != 401:
        return reply
    challenge = proxy_challenge(realm, f"repository:{target.client_name}:pull")
    reply.headers = [(k, v) for k, v in reply.headers if k.lower() != "www-authenticate"]
    reply.headers.append(("WWW-Authenticate", challenge))
    return reply


def version_answer(authorization: str | None, challenge: str) -> Reply:
    """The /v2/ answer (§12): our own challenge, or 200 once a client sends credentials,
    which are checked upstream on real requests, never here."""
    headers = [("Content-Type", "application/json")]
    if authorization:
        return Reply(200, headers, b"{}")
    body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
    return Reply(401, [*headers, ("WWW-Authenticate", challenge)], body)
