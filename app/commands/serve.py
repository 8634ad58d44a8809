"""`oci-pull-through serve`: gunicorn with the shipped settings, from the installed package.

A pip or pipx install has no gunicorn.conf.py or wsgi.py to point gunicorn at: the settings
are the module app.gunicorn_conf and the WSGI entry app.wsgi:app. Extra gunicorn options go
in GUNICORN_CMD_ARGS.
"""

from __future__ import annotations

import argparse
import os
import sys

SETTINGS = "python:app.gunicorn_conf"
WSGI_APP = "app.wsgi:app"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the serve subcommand."""
    sub.add_parser(
        "serve",
        help="run the proxy: gunicorn, gevent workers, HTTP/1.1 and h2c on LISTEN_ADDR",
        description="Run the proxy under gunicorn with its shipped settings "
        "(the same as `gunicorn -c gunicorn.conf.py wsgi:app` in a checkout).",
    )


def command() -> list[str]:
    """gunicorn's command line, run by this environment's interpreter (a venv's, pipx's)."""
    return [sys.executable, "-m", "gunicorn", "-c", SETTINGS, WSGI_APP]


def run(args: argparse.Namespace) -> int:
    """Become gunicorn: its master gets signals directly (SIGTERM drains, PID 1 in an image).

    A fresh interpreter, too: nothing this command imported is loaded before gevent patches.
    """
    argv = command()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
    return 1  # pragma: no cover - execv does not return
