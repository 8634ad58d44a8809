"""`oci-pull-through serve` and `--version` (app/cli.py, app/commands/serve.py)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

import pytest

from app import cli
from app.commands import serve


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--version"])
    assert stopped.value.code == 0
    expected = importlib.metadata.version("oci-pull-through")
    assert capsys.readouterr().out == f"oci-pull-through {expected}\n"


def test_serve_becomes_gunicorn_with_the_shipped_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append((path, list(argv))))
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("OCI_TEST_FROM_DOTENV=yes\n")
    monkeypatch.delenv("OCI_TEST_FROM_DOTENV", raising=False)
    cli.main(["serve"])
    assert calls == [
        (
            sys.executable,
            [sys.executable, "-m", "gunicorn", "-c", "python:app.gunicorn_conf", "app.wsgi:app"],
        )
    ]
    # The working directory's .env is read (and inherited by gunicorn), installed or not.
    assert os.environ.pop("OCI_TEST_FROM_DOTENV") == "yes"


def test_serve_names_modules_that_the_package_ships() -> None:
    module, _, attribute = serve.WSGI_APP.partition(":")
    settings = serve.SETTINGS.removeprefix("python:")
    for name in (module, settings):
        assert importlib.util.find_spec(name) is not None, name
    assert attribute == "app"
