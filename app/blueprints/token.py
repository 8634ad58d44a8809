"""The token endpoint of §12 (/v2/token), the proxy's public URL, and its 401 challenges."""

from __future__ import annotations

import ipaddress
import json
import re
from urllib.parse import quote

from flask import Blueprint, Response, current_app, request

from app.challenge import proxy_challenge
from app.config import Config
from app.errors import RegistryError
from app.oci import Target
from app.reply import Reply
from app.reqlog import RequestRecord
from app.scopes import parse_scopes
from app.tokenproxy import Credentials, TokenProxy, parse_basic

bp = Blueprint("token", __name__)
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]+(?::\d{1,5})?|\[[0-9A-Fa-f:.]+\](?::\d{1,5})?")
API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
_NO_STORE = [("Cache-Control", "no-store"), ("Pragma", "no-cache")]


class BadTokenRequest(RegistryError):
    """An OAuth2 request the endpoint does not support; containerd then falls back to GET."""

    status, code = 400, "UNSUPPORTED"


def _config() -> Config:
    return current_app.config["OCI_CONFIG"]


def token_proxy() -> TokenProxy:
    """The app's TokenProxy."""
    return current_app.extensions["oci_tokens"]


def _first(value: str | None) -> str:
    return (value or "").split(",")[0].strip()


def _trusted(remote: str | None, allowed: tuple[str, ...]) -> bool:
    """gunicorn's forwarded_allow_ips rule: listed IPs or networks, `*`, or no IP (unix socket)."""
    if "*" in allowed:
        return True
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return True
    return any(address in ipaddress.ip_network(item, strict=False) for item in allowed)


def public_base_url() -> str:
    """PUBLIC_URL, else this request's scheme and host (X-Forwarded-* only from trusted peers)."""
    config = _config()
    if config.public_url:
        return config.public_url
    scheme, host = request.scheme, request.host
    if _trusted(request.remote_addr, config.forwarded_allow_ips):
        proto = _first(request.headers.get("X-Forwarded-Proto")).lower()
        forwarded_host = _first(request.headers.get("X-Forwarded-Host"))
        scheme = proto if proto in ("http", "https") else scheme
        host = forwarded_host or host
    if not _HOST_RE.fullmatch(host):
        environ = request.environ
        host = f"{environ.get('SERVER_NAME', 'localhost')}:{environ.get('SERVER_PORT', '80')}"
    return f"{scheme}://{host}"


def token_realm(ns: str | None = None) -> str:
    """The proxy's token endpoint; containerd's mirror namespace rides along as ?ns=."""
    realm = f"{public_base_url()}/v2/token"
    return f"{realm}?ns={quote(ns, safe=':[]')}" if ns else realm


def with_proxy_challenge(reply: Reply, target: Target, ns: str | None) -> Reply:
    """An upstream 401 re-issued with the proxy's realm and the client-side scope."""
    if reply.status != 401:
        return reply
    challenge = proxy_challenge(token_realm(ns), f"repository:{target.client_name}:pull")
    reply.headers = [(k, v) for k, v in reply.headers if k.lower() != "www-authenticate"]
    reply.headers.append(("WWW-Authenticate", challenge))
    return reply


def _request_credentials() -> tuple[list[str], Credentials | None]:
    """Scopes and credentials of a GET (Basic auth) or an OAuth2 password-grant POST."""
    if request.method == "GET":
        return request.args.getlist("scope"), parse_basic(request.headers.get("Authorization"))
    form = request.form
    if form.get("grant_type") != "password" or "username" not in form:
        raise BadTokenRequest("only grant_type=password is supported; use GET /v2/token")
    creds = Credentials(form["username"], form.get("password", ""))
    return [*request.args.getlist("scope"), *form.getlist("scope")], creds


@bp.route("/v2/token", methods=["GET", "POST"])
def token() -> Response:
    """Issue a proxy token for the requested repositories, anonymous or with credentials."""
    record = RequestRecord(method=request.method, json_format=current_app.config["OCI_LOG_JSON"])
    record.kind, record.repository = "token", "-"
    request.environ["oci.record"] = record
    config = _config()
    scope_values, creds = _request_credentials()
    ns = request.args.get("ns") or request.form.get("ns") or None
    scopes = parse_scopes(scope_values, ns=ns, default_registry=config.upstream_registry)
    record.repository = ",".join(f"{s.registry}/{s.name}" for s in scopes) or "-"
    issued = token_proxy().issue(scopes, creds)
    body = json.dumps(issued.body()).encode()
    record.status, record.outcome, record.bytes_sent = 200, "bypass", len(body)
    record.finish()
    headers = [("Content-Type", "application/json"), *_NO_STORE, API_VERSION]
    return Response(body, status=200, headers=headers)
