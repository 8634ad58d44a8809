"""The WSGI entry point: gunicorn -c gunicorn.conf.py wsgi:app (or flask --app wsgi run)."""

import sys

from dotenv import load_dotenv

from app import create_app
from app.config import ConfigError

load_dotenv()
try:
    app = create_app()
except ConfigError as error:
    print(f"oci-pull-through: {error}", file=sys.stderr)
    sys.exit(3)  # gunicorn's "worker failed to boot": the arbiter stops instead of respawning
