"""The WSGI entry point, app.wsgi:app: `oci-pull-through serve`, and ./wsgi.py re-exports it."""

from __future__ import annotations

import sys

from dotenv import find_dotenv, load_dotenv

from app import create_app
from app.config import ConfigError

load_dotenv(find_dotenv(usecwd=True))  # the .env of the working directory, also when installed
try:
    app = create_app()
except ConfigError as error:
    print(f"oci-pull-through: {error}", file=sys.stderr)
    sys.exit(3)  # gunicorn's "worker failed to boot": the arbiter stops instead of respawning
