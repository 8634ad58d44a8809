"""gunicorn's settings for oci-pull-through: `oci-pull-through serve` loads this module.

`gunicorn -c gunicorn.conf.py wsgi:app` loads the same settings through the top-level file.
Values come from the environment (and .env) by app/config.py's rules, read once; the
machinery behind them and the hooks are in app/serverhooks.py. Nothing imported here loads
ssl, requests or Flask: the gevent workers monkey-patch after the master has read this.
"""

from __future__ import annotations

import math

from app import serverhooks
from app.config import bind_addresses

_settings = serverhooks.load()  # an invalid setting: one line on stderr, exit 1
_config = _settings.config

bind = bind_addresses(_config.listen_addr)  # `:8080`: IPv6 and IPv4 where there is IPv6
# gevent, plus HEADER_TIMEOUT, SEND_TIMEOUT, connection slots and fair scheduling
worker_class = "app.worker.Worker"
workers = _settings.workers  # WEB_CONCURRENCY
worker_connections = _settings.limits.worker_connections  # WORKER_CONNECTIONS
timeout = 60
graceful_timeout = 30  # SIGTERM: in-flight downloads finish for up to 30 s
# gunicorn's keepalive is whole seconds and 0 turns keep-alive off; app/worker.py enforces
# KEEPALIVE_TIMEOUT itself.
keepalive = max(1, math.ceil(_settings.limits.keepalive_timeout))
preload_app = False  # the app is imported by each worker, after gevent has patched
control_socket_disable = True
accesslog = None  # the app writes one request line per request itself
errorlog = "-"
loglevel = "warning" if _config.log_level == "warn" else _config.log_level
forwarded_allow_ips = ",".join(_config.forwarded_allow_ips)
http_protocols = "h2,h1"
http2_cleartext = "both"  # h2c by prior knowledge and by Upgrade, next to HTTP/1.1
if _config.generate_self_signed_tls:
    certfile = keyfile = serverhooks.self_signed_memfd()
if _config.log_format == "json":
    logger_class = serverhooks.json_logger_class(_config.log_level)

post_worker_init = serverhooks.post_worker_init  # os.sendfile for filesystem hits
child_exit = serverhooks.child_exit  # a dead worker's gauges stop counting
on_exit = serverhooks.on_exit  # the metrics directory made at start goes
