"""The token endpoint of §12 (/v2/token): scopes and credentials in, a proxy token out."""

from __future__ import annotations

import json

from flask import Blueprint, Response, request

from app.auth.proxy import Credentials, parse_basic
from app.auth.scopes import parse_scopes
from app.blueprints.common import API_VERSION, config, log_record, token_proxy
from app.errors import RegistryError

bp = Blueprint("token", __name__)
_NO_STORE = [("Cache-Control", "no-store"), ("Pragma", "no-cache")]


class BadTokenRequest(RegistryError):
    """An OAuth2 request the endpoint does not support; containerd then falls back to GET."""

    status, code = 400, "UNSUPPORTED"


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
    record = log_record()
    record.kind, record.repository = "token", "-"
    scope_values, creds = _request_credentials()
    ns = request.args.get("ns") or request.form.get("ns") or None
    scopes = parse_scopes(scope_values, ns=ns, default_registry=config().upstream_registry)
    record.repository = ",".join(f"{s.registry}/{s.name}" for s in scopes) or "-"
    issued = token_proxy().issue(scopes, creds)
    body = json.dumps(issued.body()).encode()
    record.status, record.outcome, record.bytes_sent = 200, "bypass", len(body)
    headers = [("Content-Type", "application/json"), *_NO_STORE, API_VERSION]
    return Response(body, status=200, headers=headers)
