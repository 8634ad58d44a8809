"""The WSGI entry point in a checkout: gunicorn -c gunicorn.conf.py wsgi:app, flask --app wsgi run.

It is app/wsgi.py (load_dotenv(), then app = create_app()), which an installed wheel carries
for `oci-pull-through serve`.
"""

from app.wsgi import app

__all__ = ["app"]
