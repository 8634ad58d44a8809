"""oci-pull-through: a pull-through cache for OCI registries."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from app.config import Config

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(config: Config) -> None:
    """One line (LOG_FORMAT=text) or JSON object (json) per record on stderr at LOG_LEVEL."""
    from app.logfmt import make_formatter

    root = logging.getLogger()
    if not any(getattr(h, "_oci", False) for h in root.handlers):
        ours = logging.StreamHandler()
        ours._oci = True  # type: ignore[attr-defined]
        root.addHandler(ours)
    formatter = make_formatter(config.log_format, config.log_level)
    for handler in root.handlers:
        if getattr(handler, "_oci", False):
            handler.setFormatter(formatter)
    if config.log_format == "json":  # gunicorn's own lines, as written by this worker
        for gunicorn_handler in logging.getLogger("gunicorn.error").handlers:
            gunicorn_handler.setFormatter(formatter)
    root.setLevel(_LEVELS[config.log_level])
    logging.getLogger("urllib3").setLevel(max(logging.WARNING, _LEVELS[config.log_level]))


def _token_secret(config: Config) -> bytes:
    """TOKEN_SECRET, else a random per-start key (shared by gunicorn's workers), with a warning."""
    if config.token_secret_ephemeral:
        logging.getLogger("oci_pull_through.tokens").warning(
            "TOKEN_SECRET is not set: proxy tokens use a random key and stop working on restart "
            "and across replicas"
        )
    if config.token_secret:
        return config.token_secret.encode()
    import secrets

    return secrets.token_bytes(32)


def create_app(config: Config | None = None) -> Flask:
    """Build the application: configuration, storage, upstream client and blueprints."""
    from flask import Flask, Response, request

    from app import metrics, reqlog
    from app.auth.proxy import TokenProxy
    from app.auth.tokens import Sealer
    from app.blueprints import ops, token, v2
    from app.blueprints.internal import bp as peer_bp
    from app.config import Config, spool_dir
    from app.errors import RegistryError
    from app.flight import Flights
    from app.peers import make_cluster
    from app.proxy import Proxy
    from app.storage import sweep_in_background
    from app.storage.factory import make_storage
    from app.upstream import Upstream

    config = config or Config.from_env()
    configure_logging(config)
    metrics.know_registries(
        [
            config.upstream_registry,
            *config.allowed_registries,
            *config.insecure_registries,
            *(getattr(config, "credential_registries", None) or ()),
        ]
    )
    app = Flask(__name__)
    app.config["OCI_CONFIG"] = config
    app.config["OCI_LOG_JSON"] = config.log_format == "json"
    storage = make_storage(config)
    if config.storage_backend == "fs":  # FS_MAX_BYTES and the cache size gauge (§13)
        from app.evictor import Evictor

        evictor = Evictor(config.fs_root, spool_dir(config), config.fs_max_bytes)
        storage = evictor.track(storage)  # hits and commits reach the evictor
        app.extensions["oci_evictor"] = evictor
        app.before_request(evictor.start)
    sweep_in_background(storage)  # what writers that died left behind (§15)
    flights = Flights(spool_dir(config))
    upstream = Upstream(config)
    app.extensions["oci_proxy"] = Proxy(config, storage, upstream, flights)
    cluster = make_cluster(config)  # PEERS: misses another replica owns are fetched from it
    if cluster is not None:
        app.extensions["oci_proxy"].join_cluster(*cluster)
        app.extensions["oci_cluster"] = cluster
    app.extensions["oci_tokens"] = TokenProxy(config, upstream, Sealer(_token_secret(config)))
    app.register_blueprint(ops.bp)
    app.register_blueprint(token.bp)
    app.register_blueprint(v2.bp)
    app.register_blueprint(peer_bp)
    reqlog.init_app(app)  # one line per registry request, after its last byte

    @app.errorhandler(RegistryError)
    def registry_error(error: RegistryError) -> Response:
        record = reqlog.record_of(request.environ)
        if record is not None:  # reqlog.init_app logs it once the body is out
            record.status, record.outcome = error.status, "error"
            record.bytes_sent = len(error.body())
        headers = {"Content-Type": "application/json"}
        if request.path.startswith("/v2"):
            headers["Docker-Distribution-API-Version"] = "registry/2.0"
        body = error.body() if request.method != "HEAD" else b""
        return Response(body, status=error.status, headers=headers)

    return app
