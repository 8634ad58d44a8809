"""Operational endpoints: the health probe."""

from __future__ import annotations

from flask import Blueprint, Response

bp = Blueprint("ops", __name__)


@bp.route("/healthz", methods=["GET", "HEAD"])
def healthz() -> Response:
    """Answers while the server accepts connections; probes and -healthcheck use it."""
    return Response("ok", mimetype="text/plain")
