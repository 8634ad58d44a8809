"""gunicorn's settings in a checkout: gunicorn -c gunicorn.conf.py wsgi:app (or make run).

The settings and hook names are in app/gunicorn_conf.py, so that an installed wheel carries
them for `oci-pull-through serve`; the machinery behind them is in app/serverhooks.py.
Neither imports ssl, requests or Flask: gevent monkey-patches in the workers, afterwards.
"""

from app.gunicorn_conf import *  # noqa: F403
