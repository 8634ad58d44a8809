"""oci-pull-through: a pull-through cache for OCI registries."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flask import Flask, Response, request

if TYPE_CHECKING:
    from app.config import Config

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(config: Config) -> None:
    """One line per record on stderr at LOG_LEVEL."""
    root = logging.getLogger()
    if not any(getattr(h, "_oci", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        handler._oci = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(_LEVELS[config.log_level])
    logging.getLogger("urllib3").setLevel(max(logging.WARNING, _LEVELS[config.log_level]))


def create_app(config: Config | None = None) -> Flask:
    """Build the application: configuration, storage, upstream client and blueprints."""
    from app.blueprints import ops, v2
    from app.config import Config
    from app.errors import RegistryError
    from app.proxy import Proxy
    from app.storage import make_storage
    from app.upstream import Upstream

    config = config or Config.from_env()
    configure_logging(config)
    app = Flask(__name__)
    app.config["OCI_CONFIG"] = config
    app.config["OCI_LOG_JSON"] = config.log_format == "json"
    storage = make_storage(config)
    app.extensions["oci_proxy"] = Proxy(config, storage, Upstream(config))
    app.register_blueprint(ops.bp)
    app.register_blueprint(v2.bp)

    @app.errorhandler(RegistryError)
    def registry_error(error: RegistryError) -> Response:
        record = request.environ.get("oci.record")
        if record is not None:
            record.status, record.outcome = error.status, "error"
            record.bytes_sent = len(error.body())
            record.finish()
        headers = {"Content-Type": "application/json"}
        if request.path.startswith("/v2"):
            headers["Docker-Distribution-API-Version"] = "registry/2.0"
        body = error.body() if request.method != "HEAD" else b""
        return Response(body, status=error.status, headers=headers)

    return app
