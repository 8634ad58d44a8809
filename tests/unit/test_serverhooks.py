"""gunicorn's settings and hooks (app/serverhooks.py): one parse, shared key, metrics dir."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from app import serverhooks
from app.config import EPHEMERAL_SECRET


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A valid environment with no .env to find and no metrics directory yet."""
    for name in list(os.environ):
        if name.startswith(("OCI_", "TOKEN_", "PROMETHEUS_", "WEB_", "LISTEN_", "LOG_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROXY_MODE", "transparent")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    return monkeypatch


def test_settings_follow_app_config_rules(env: pytest.MonkeyPatch) -> None:
    env.setenv("LISTEN_ADDR", "[::1]:9000")
    env.setenv("LOG_LEVEL", "WARNING")
    env.setenv("WEB_CONCURRENCY", "3")
    settings = serverhooks.load()
    assert settings.workers == 3 and settings.config.log_level == "warn"
    assert serverhooks.bind_address(settings.config.listen_addr) == "[::1]:9000"
    assert serverhooks.bind_address(":8080") == "0.0.0.0:8080"


@pytest.mark.parametrize(
    ("name", "value"), [("PROXY_MODE", "open"), ("WEB_CONCURRENCY", "many"), ("LISTEN_ADDR", "x")]
)
def test_an_invalid_setting_exits_with_one_line(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str
) -> None:
    env.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        serverhooks.load()
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"invalid configuration: {name}={value!r}" in err


def test_one_random_token_key_per_start_only_without_token_secret(
    env: pytest.MonkeyPatch,
) -> None:
    serverhooks.load()
    first = os.environ[EPHEMERAL_SECRET]
    serverhooks.load()  # a reload keeps the key the workers already hold
    assert os.environ[EPHEMERAL_SECRET] == first and len(first) >= 32
    env.delenv(EPHEMERAL_SECRET)
    env.setenv("TOKEN_SECRET", "x" * 16)
    serverhooks.load()
    assert EPHEMERAL_SECRET not in os.environ


def test_metrics_directory_made_and_removed_or_an_operators_one_cleared(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env.delenv("PROMETHEUS_MULTIPROC_DIR")
    env.delenv("OCI_PULL_THROUGH_METRICS_DIR_OWNED", raising=False)
    serverhooks.prepare_metrics_dir()
    made = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    assert made.is_dir()
    serverhooks.on_exit(None)
    assert not made.exists()

    ours = tmp_path / "operator"
    ours.mkdir()
    (ours / "counter_1.db").write_bytes(b"old")
    (ours / "keep.txt").write_text("x")
    env.setenv("PROMETHEUS_MULTIPROC_DIR", str(ours))
    env.delenv("OCI_PULL_THROUGH_METRICS_DIR_OWNED")
    serverhooks.prepare_metrics_dir()
    assert sorted(p.name for p in ours.iterdir()) == ["keep.txt"]
    serverhooks.on_exit(None)
    assert ours.is_dir(), "an operator's directory stays"


def test_gunicorn_json_lines_use_the_apps_formatter() -> None:
    from gunicorn.config import Config as GunicornConfig

    cfg = GunicornConfig()
    cfg.set("errorlog", "-")
    logger = serverhooks.json_logger_class("info")(cfg)
    (handler,) = logger.error_log.handlers
    record = logging.LogRecord(
        "gunicorn.error", logging.WARNING, __file__, 1, "hi %s", ("x",), exc_info=None
    )
    doc = json.loads(handler.format(record))
    assert doc["level"] == "warn" and doc["message"] == "hi x" and doc["logger"] == "gunicorn.error"
