"""app/netguard.py: internal addresses, exemptions, the allowlist, and the guarded connection."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest
import requests

from app.netguard import BlockedAddress, Guard, GuardedAdapter, is_internal, matches_allowlist

# -- is_internal -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.0.9",
        "::1",
        "10.0.0.1",
        "172.16.5.4",
        "172.31.255.255",
        "192.168.1.1",
        "fd00::1",  # RFC 4193
        "fc12:3456::1",
        "169.254.169.254",  # link-local, cloud metadata
        "fe80::1",
        "fe80::1%eth0",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "239.255.255.250",
        "ff02::1",
        "::ffff:127.0.0.1",  # IPv4-mapped IPv6
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
    ],
)
def test_internal_addresses(address: str) -> None:
    assert is_internal(address)


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "140.82.112.3", "172.32.0.1", "2606:4700::1111", "::ffff:8.8.8.8"],
)
def test_public_addresses(address: str) -> None:
    assert not is_internal(address)


# -- Guard exemptions ------------------------------------------------------------------------------


def test_explicit_allow_entries_and_insecure_hosts_are_exempt() -> None:
    guard = Guard.from_lists(("registry.internal", "*.corp.test"), frozenset({"mirror.lan:5000"}))
    assert guard.is_exempt("registry.internal", 443)
    assert guard.is_exempt("mirror.lan", 5000)


def test_wildcard_entries_never_exempt() -> None:
    guard = Guard.from_lists(("*", "*.corp.test", "reg*.lan"), frozenset())
    assert not guard.is_exempt("a.corp.test", 443)
    assert not guard.is_exempt("registry.lan", 443)
    with pytest.raises(BlockedAddress):
        guard.check("a.corp.test", 443, "10.0.0.5")


def test_host_entry_exempts_every_port() -> None:
    guard = Guard.from_lists(("registry.internal",), frozenset())
    assert guard.is_exempt("registry.internal", 443)
    assert guard.is_exempt("registry.internal", 5000)


def test_host_port_entry_exempts_only_that_port() -> None:
    guard = Guard.from_lists(("registry.internal:5000",), frozenset())
    assert guard.is_exempt("registry.internal", 5000)
    assert not guard.is_exempt("registry.internal", 443)


def test_exemption_matches_host_case_insensitively() -> None:
    guard = Guard.from_lists(("registry.internal",), frozenset())
    assert guard.is_exempt("Registry.Internal", 443)


def test_other_hosts_are_not_exempt() -> None:
    guard = Guard.from_lists(("registry.internal",), frozenset({"mirror.lan"}))
    assert not guard.is_exempt("evil.test", 443)
    assert not guard.is_exempt("registry.internal.evil.test", 443)


def test_ipv6_exemption() -> None:
    guard = Guard.from_lists(("[fd00::5]:5000",), frozenset())
    assert guard.is_exempt("fd00::5", 5000)
    assert not guard.is_exempt("fd00::5", 443)


def test_check_blocks_internal_and_allows_public_and_exempt() -> None:
    guard = Guard.from_lists(("registry.internal",), frozenset())
    guard.check("example.test", 443, "93.184.216.34")
    guard.check("registry.internal", 443, "10.0.0.5")
    with pytest.raises(BlockedAddress) as info:
        guard.check("example.test", 443, "169.254.169.254")
    assert info.value.address == "169.254.169.254"
    assert info.value.host == "example.test"


# -- matches_allowlist -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("registry", "patterns", "expected"),
    [
        ("ghcr.io", ("*",), True),
        ("registry.test:5000", ("*",), True),
        ("[::1]:5000", ("*",), True),
        ("ghcr.io", ("ghcr.io",), True),
        ("ghcr.io", ("quay.io",), False),
        ("a.example.com", ("*.example.com",), True),
        ("example.com", ("*.example.com",), False),
        ("evilexample.com", ("*.example.com",), False),
        ("registry.test:5000", ("registry.test",), True),  # no port in pattern: any port
        ("registry.test:5000", ("registry.test:5000",), True),
        ("registry.test:5001", ("registry.test:5000",), False),
        ("registry.test", ("registry.test:5000",), False),
        ("registry.test:5000", ("*.test:5000",), True),
        ("docker.io", ("quay.io", "docker.io"), True),
        ("ghcr.io", (), False),
        ("[fd00::5]:5000", ("[fd00::5]:5000",), True),  # IPv6 brackets are literal
        ("[::1]:5000", ("[::1]",), True),
        ("[::1]:5000", ("[::2]",), False),
        ("1", ("[::1]",), False),  # not a character class either
    ],
)
def test_matches_allowlist(registry: str, patterns: tuple[str, ...], expected: bool) -> None:
    assert matches_allowlist(registry, patterns) is expected


# -- the guarded adapter, for real -----------------------------------------------------------------


def guarded_session(guard: Guard) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    adapter = GuardedAdapter(guard, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A loopback socket that records whether anything connected to it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.3)
    yield sock
    sock.close()


def assert_no_connection(sock: socket.socket) -> None:
    with pytest.raises(TimeoutError):
        conn, _ = sock.accept()
        conn.close()


def test_guarded_session_refuses_loopback_without_connecting(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with guarded_session(Guard()) as session, pytest.raises(BlockedAddress):
        session.get(f"http://127.0.0.1:{port}/v2/", timeout=2)
    assert_no_connection(listener)


def test_guarded_session_refuses_names_resolving_to_loopback(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with guarded_session(Guard()) as session, pytest.raises(BlockedAddress):
        session.get(f"http://localhost:{port}/v2/", timeout=2)
    assert_no_connection(listener)


def test_guarded_session_refuses_cloud_metadata_address() -> None:
    with guarded_session(Guard()) as session, pytest.raises(BlockedAddress) as info:
        session.get("http://169.254.169.254/latest/meta-data/", timeout=2)
    assert info.value.address == "169.254.169.254"


def test_wildcard_allowlist_does_not_open_loopback(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    guard = Guard.from_lists(("*", "127.0.0.*"), frozenset())
    with guarded_session(guard) as session, pytest.raises(BlockedAddress):
        session.get(f"http://127.0.0.1:{port}/", timeout=2)
    assert_no_connection(listener)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def http_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.parametrize("entry", ["127.0.0.1", "127.0.0.1:{port}"])
def test_exempt_host_connects(http_server: int, entry: str) -> None:
    guard = Guard.from_lists((entry.format(port=http_server),), frozenset())
    with guarded_session(guard) as session:
        response = session.get(f"http://127.0.0.1:{http_server}/", timeout=5)
    assert (response.status_code, response.content) == (200, b"hello")


def test_insecure_host_connects(http_server: int) -> None:
    guard = Guard.from_lists(("*",), frozenset({f"localhost:{http_server}"}))
    with guarded_session(guard) as session:
        response = session.get(f"http://localhost:{http_server}/", timeout=5)
    assert response.content == b"hello"


def test_exemption_for_another_port_does_not_apply(http_server: int) -> None:
    other_port = http_server - 1 if http_server > 1024 else http_server + 1
    guard = Guard.from_lists((f"127.0.0.1:{other_port}",), frozenset())
    with guarded_session(guard) as session, pytest.raises(BlockedAddress):
        session.get(f"http://127.0.0.1:{http_server}/", timeout=5)
