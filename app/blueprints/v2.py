"""The /v2/ registry API: parse, call the proxy, build the response."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from app.auth.realm import proxy_challenge, version_answer
from app.blueprints.common import (
    API_VERSION,
    client_gone_check,
    config,
    log_record,
    token_proxy,
    token_realm,
    with_proxy_challenge,
)
from app.errors import Unsupported
from app.oci import BLOB, MANIFEST, REFERRERS, TAGS, parse_target
from app.proxy import Proxy, Read
from app.reply import Reply
from app.reqlog import counted, read_span
from app.upstream import ClientHeaders

bp = Blueprint("v2", __name__)
FILE_BLOCK = 1024 * 1024
_READ_METHODS = ("GET", "HEAD")
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_PASSTHROUGH_PARAMS = {TAGS: ("n", "last"), REFERRERS: ("artifactType",)}


def _proxy() -> Proxy:
    return current_app.extensions["oci_proxy"]


def client_headers() -> ClientHeaders:
    """The client's headers that matter upstream; every Accept header is kept."""
    h = request.headers
    return ClientHeaders(
        authorization=h.get("Authorization"),
        accept=tuple(h.getlist("Accept")),
        range=h.get("Range"),
        if_range=h.get("If-Range"),
        user_agent=h.get("User-Agent"),
    )


@bp.route("/v2/", methods=_ALL_METHODS)
def version_check() -> Response:
    """The API version check (§5 /v2/ rows)."""
    _require_read()
    challenge = proxy_challenge(token_realm())
    return to_response(version_answer(client_headers().authorization, challenge))


@bp.route("/v2/<path:rest>", methods=_ALL_METHODS)
def registry(rest: str) -> Response:
    """Every other registry endpoint, in any of the three addressing forms."""
    _require_read()
    target = parse_target(
        rest, ns=request.args.get("ns"), default_registry=config().upstream_registry
    )
    record = log_record()
    record.repository = f"{target.registry}/{target.name}"
    record.kind, record.reference = target.kind, target.reference
    proxy = _proxy()
    client = token_proxy().credentials_for(client_headers(), target.registry)
    if target.kind == MANIFEST:
        reply = proxy.manifest(Read(target, request.method, client, client_gone_check()))
    elif target.kind == BLOB:
        reply = proxy.blob(Read(target, request.method, client, client_gone_check()))
    else:
        if request.method != "GET":
            raise Unsupported(f"{request.method} is not supported on {target.kind}")
        allowed = _PASSTHROUGH_PARAMS[target.kind]
        params = [(k, v) for k, v in request.args.items(multi=True) if k in allowed]
        reply = proxy.passthrough(target, client, params)
    return to_response(with_proxy_challenge(reply, target, request.args.get("ns")))


def _require_read() -> None:
    if request.method not in _READ_METHODS:
        raise Unsupported(f"{request.method} is not supported: this registry is a read-only cache")


def to_response(reply: Reply) -> Response:
    """Turn a Reply into a Flask response, with zero-copy file bodies where the server allows."""
    record = log_record()
    record.status, record.outcome = reply.status, reply.outcome
    headers = [*reply.headers, API_VERSION]
    if reply.file is not None and request.method == "GET":
        length = reply.length or 0
        wrapper_class = request.environ.get("wsgi.file_wrapper")
        if wrapper_class is not None:  # sendfile; the request log counts the whole span
            record.bytes_sent = length
            body = wrapper_class(reply.file, FILE_BLOCK)
        else:
            body = read_span(reply.file, length, record, FILE_BLOCK)
        return Response(body, status=reply.status, headers=headers, direct_passthrough=True)
    if reply.file is not None:
        reply.file.close()
    if isinstance(reply.body, bytes):
        body_bytes = reply.body if request.method == "GET" else b""
        if not any(k.lower() == "content-length" for k, _ in headers):
            headers.append(("Content-Length", str(len(reply.body))))
        record.bytes_sent = len(body_bytes)
        return Response(
            [body_bytes] if body_bytes else [],
            status=reply.status,
            headers=headers,
            direct_passthrough=True,
        )
    return Response(
        counted(reply.body, record), status=reply.status, headers=headers, direct_passthrough=True
    )
