"""The internal peer endpoint: another replica asks this one for an object it owns.

GET /_oci/peer/v1/<blob|manifest>/<digest>?registry=…&name=… answers only a request
signed with the cluster key (app/peers.py): for this replica, recently, never seen before,
method, path, query, the client credential and Accept unaltered. Anything else is a 401
that says nothing more (404 when clustering is off). The object is served through this
replica's own read path and single flight with local_only set: a peer request is never
forwarded to a third replica, whatever this replica thinks of ownership.
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, current_app, request

from app import metrics
from app.blueprints.common import client_gone_check
from app.errors import DigestInvalid, NameInvalid, RegistryError
from app.oci import BLOB, MANIFEST, Target, is_digest, is_valid_name, normalize_registry
from app.peers import AUTH_HEADER, CREDENTIAL_HEADER, SERVED_HEADER, PeerAuth, PeerSet
from app.proxy import Proxy, Read
from app.reply import Reply
from app.upstream import ClientHeaders

bp = Blueprint("internal", __name__)
BLOCK = 1024 * 1024


class PeerRefused(RegistryError):
    """A peer request without a valid signature: no detail, whatever was wrong."""

    status, code = 401, "UNAUTHORIZED"


def _refused() -> Response:
    metrics.PEER_REQUESTS.labels("refused").inc()
    body = PeerRefused("peer request refused").body()
    return Response(body, status=401, content_type="application/json")


@bp.route("/_oci/peer/v1/<kind>/<digest>", methods=["GET"])
def peer_object(kind: str, digest: str) -> Response:
    """Serve a blob or a manifest by digest to the replica that asked this one, its owner."""
    cluster: tuple[PeerSet, PeerAuth] | None = current_app.extensions.get("oci_cluster")
    if cluster is None:
        return Response(status=404)
    peers, auth = cluster
    if request.method != "GET":  # HEAD: a GET's flight must not start for it
        return _refused()
    credential = request.headers.get(CREDENTIAL_HEADER, "")
    accept = request.headers.get("Accept", "")
    query = request.query_string.decode("latin-1")
    signed = auth.verify(
        request.headers.get(AUTH_HEADER),
        peers.self_url,
        request.method,
        request.path,
        query,
        credential,
        accept,
    )
    if not signed:
        return _refused()
    target = _target(kind, digest, request.args.get("registry", ""), request.args.get("name", ""))
    client = ClientHeaders(
        authorization=credential or None,
        accept=(accept,) if accept else (),
        user_agent=request.headers.get("User-Agent"),
    )
    proxy: Proxy = current_app.extensions["oci_proxy"]
    serve = proxy.blob if kind == BLOB else proxy.manifest
    reply = serve(Read(target, "GET", client, client_gone_check(), local_only=True))
    metrics.PEER_REQUESTS.labels("served").inc()
    return _response(reply)


def _target(kind: str, digest: str, registry: str, name: str) -> Target:
    """The object asked for, validated as strictly as a registry path (digests only)."""
    if kind not in (BLOB, MANIFEST) or not is_digest(digest):
        raise DigestInvalid("peers ask for blobs and manifests by digest only")
    if not registry or normalize_registry(registry) != registry or not is_valid_name(name):
        raise NameInvalid("invalid registry or repository name")
    return Target(registry, name, kind, digest, name)


def _response(reply: Reply) -> Response:
    """The Reply as sent to the asking replica, marked as this replica's own answer."""
    headers = [*reply.headers, (SERVED_HEADER, "1")]
    if reply.file is not None:
        return Response(_read(reply), status=reply.status, headers=headers)
    body = [reply.body] if isinstance(reply.body, bytes) else reply.body
    return Response(body, status=reply.status, headers=headers, direct_passthrough=True)


def _read(reply: Reply) -> Iterator[bytes]:
    """A cached file's span (S3_REDIRECT=false or a store without redirects), then closed."""
    assert reply.file is not None
    left = reply.length
    try:
        while left is None or left > 0:
            chunk = reply.file.read(BLOCK if left is None else min(BLOCK, left))
            if not chunk:
                return
            if left is not None:
                left -= len(chunk)
            yield chunk
    finally:
        reply.file.close()
