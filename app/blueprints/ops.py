"""Operational endpoints: the health probe and the Prometheus metrics."""

from __future__ import annotations

from flask import Blueprint, Response, abort, current_app

bp = Blueprint("ops", __name__)


@bp.route("/healthz", methods=["GET", "HEAD"])
def healthz() -> Response:
    """Answers while the server accepts connections; probes and -healthcheck use it."""
    return Response("ok", mimetype="text/plain")


@bp.route("/metrics", methods=["GET"])
def metrics() -> Response:
    """Prometheus text format, summed over every worker (§13); 404 with METRICS_ENABLED=false."""
    from app import metrics as figures

    config = current_app.config["OCI_CONFIG"]
    if not config.metrics_enabled:
        abort(404)
    evictor = current_app.extensions.get("oci_evictor")
    if evictor is not None:
        evictor.refresh_size()
    body, content_type = figures.render(config.metrics_multiproc_dir)
    return Response(body, content_type=content_type)
