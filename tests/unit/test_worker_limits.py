"""The serving limits (HEADER_TIMEOUT, KEEPALIVE_TIMEOUT, SEND_TIMEOUT, WORKER_CONNECTIONS)."""

from __future__ import annotations

import pytest

from app.config import ConfigError
from app.serverhooks import Limits


def test_defaults() -> None:
    """Unset: 30 s for headers, 15 s idle, 60 s stalled send, 1000 slots per worker."""
    assert Limits.from_env({}) == Limits(30.0, 15.0, 60.0, 1000)


def test_values_are_read() -> None:
    """Seconds take an optional s suffix."""
    env = {
        "HEADER_TIMEOUT": "2",
        "KEEPALIVE_TIMEOUT": "1.5s",
        "SEND_TIMEOUT": "90",
        "WORKER_CONNECTIONS": "50",
    }
    assert Limits.from_env(env) == Limits(2.0, 1.5, 90.0, 50)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HEADER_TIMEOUT", "0"),
        ("KEEPALIVE_TIMEOUT", "-1"),
        ("SEND_TIMEOUT", "soon"),
        ("WORKER_CONNECTIONS", "0"),
    ],
)
def test_invalid_values_name_the_variable(name: str, value: str) -> None:
    """A bad value stops the server at start with one line naming the variable."""
    with pytest.raises(ConfigError) as caught:
        Limits.from_env({name: value})
    assert caught.value.name == name
