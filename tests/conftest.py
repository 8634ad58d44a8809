"""Fixtures shared by every test: the app in-process with a mocked upstream, and SeaweedFS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import responses
from flask.testing import FlaskClient

from app.config import AUTHENTICATED
from tests.appclient import make_app
from tests.harness.seaweed import SeaweedFS


@pytest.fixture
def mock() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def client(tmp_path: Path) -> FlaskClient:
    return make_app(tmp_path).test_client()


@pytest.fixture
def auth_client(tmp_path: Path) -> FlaskClient:
    return make_app(tmp_path, AUTHENTICATED).test_client()


@pytest.fixture(scope="session")
def seaweed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS (S3) on loopback for the session's S3-backed tests."""
    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs-session")) as server:
        yield server
