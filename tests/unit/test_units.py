"""Durations and sizes in the configuration (TAG_TTL, LATEST_TTL, FS_MAX_BYTES)."""

from __future__ import annotations

import pytest

from app.config import Config, ConfigError
from app.units import format_bytes, parse_bytes, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("30s", 30),
        ("10m", 600),
        ("6h", 21600),
        ("28d", 2419200),
        ("2w", 1209600),
        ("1.5h", 5400),
        (" 2S ", 2),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "10y", "-5s", "1h30m", "ten"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1048576),
        ("500M", 500_000_000),
        ("50Gi", 50 * 1024**3),
        ("2TB", 2 * 10**12),
        ("512Ki", 524288),
        ("1.5Mi", 1572864),
        ("10MiB", 10 * 1024**2),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_bytes(text) == size


@pytest.mark.parametrize("text", ["", "Gi", "5i", "5X", "-1", "5 G i"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(50 * 1024**3) == "50.0 GiB"


def test_config_defaults_keep_section_6_values() -> None:
    config = Config.from_env({"PROXY_MODE": "transparent"})
    assert config.tag_ttl == 28 * 86400 and config.latest_ttl == 3600
    assert config.fs_max_bytes is None and config.metrics_enabled is True


def test_config_reads_the_new_variables() -> None:
    config = Config.from_env(
        {
            "PROXY_MODE": "transparent",
            "TAG_TTL": "10m",
            "LATEST_TTL": "30s",
            "FS_MAX_BYTES": "50Gi",
            "METRICS_ENABLED": "false",
        }
    )
    assert (config.tag_ttl, config.latest_ttl) == (600, 30)
    assert config.fs_max_bytes == 50 * 1024**3 and config.metrics_enabled is False


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TAG_TTL", "soon"),
        ("LATEST_TTL", "1y"),
        ("FS_MAX_BYTES", "lots"),
        ("FS_MAX_BYTES", "0"),
        ("METRICS_ENABLED", "maybe"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"PROXY_MODE": "transparent", name: value})
    assert f"{name}={value!r}" in str(caught.value)
