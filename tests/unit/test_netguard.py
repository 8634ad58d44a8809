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


@pytest.mark.parametrize(
    "address",
    [
        "0.1.2.3",  # 0.0.0.0/8, "this network"
        "100.64.0.1",  # 100.64.0.0/10, CGNAT
        "100.100.100.200",  # Alibaba Cloud metadata, inside CGNAT
        "100.127.255.254",
        "192.0.0.9",  # 192.0.0.0/24, IETF protocol assignments
        "192.0.0.192",
        "198.18.0.1",  # 198.18.0.0/15, benchmarking
        "198.19.255.254",
        "240.0.0.1",  # 240.0.0.0/4, reserved
        "255.255.255.255",
        "::ffff:100.100.100.200",  # IPv4-mapped
        "::ffff:198.18.0.1",
        "64:ff9b::127.0.0.1",  # NAT64 of loopback
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b::100.100.100.200",
        "64:ff9b:1::8.8.8.8",  # RFC 8215 local-use NAT64 prefix: site-specific
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
        "2002:6464:64c8::1",  # 6to4 of 100.100.100.200
        "::127.0.0.1",  # IPv4-compatible (deprecated)
    ],
)
def test_internal_ranges_the_review_found_missing(address: str) -> None:
    """Attack: a registry name resolving here reached internal services before §15."""
    assert is_internal(address)


@pytest.mark.parametrize(
    "address",
    [
        "100.63.255.255",  # just below CGNAT
        "100.128.0.1",  # just above CGNAT
        "198.20.0.1",
        "192.0.1.1",
        "64:ff9b::8.8.8.8",  # NAT64 of a public address: reachable from IPv6-only hosts
        "64:ff9b::140.82.112.3",
        "2002:808:808::1",  # 6to4 of a public address
    ],
)
def test_embedded_or_neighbouring_public_addresses_stay_public(address: str) -> None:
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


def test_host_entry_exempts_only_the_default_ports() -> None:
    """Attack: a port-less exemption used to open every port of the host (§15)."""
    guard = Guard.from_lists(("registry.internal",), frozenset({"mirror.lan"}))
    assert guard.is_exempt("registry.internal", 443)
    assert guard.is_exempt("registry.internal", 80)
    assert guard.is_exempt("mirror.lan", 80)
    assert guard.is_exempt("mirror.lan", 443)
    for port in (22, 5000, 6379, 8080, 2375):
        assert not guard.is_exempt("registry.internal", port)
        assert not guard.is_exempt("mirror.lan", port)
    with pytest.raises(BlockedAddress):
        guard.check("mirror.lan", 6379, "10.0.0.5")


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


def test_blocked_message_names_the_host_but_never_the_address() -> None:
    """Attack: the 403 body (str of this exception) told the client what a name resolves to."""
    with pytest.raises(BlockedAddress) as info:
        Guard().check("sneaky.example.test", 443, "10.11.12.13")
    assert "sneaky.example.test" in str(info.value)
    assert "10.11.12.13" not in str(info.value)
    assert info.value.address == "10.11.12.13"  # kept for the server-side log


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


def test_exempt_host_connects(http_server: int) -> None:
    guard = Guard.from_lists((f"127.0.0.1:{http_server}",), frozenset())
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


@pytest.mark.parametrize("lists", [(("127.0.0.1",), frozenset()), (("*",), {"127.0.0.1"})])
def test_port_less_exemption_does_not_open_other_ports(
    listener: socket.socket, lists: tuple[tuple[str, ...], frozenset[str]]
) -> None:
    """Attack: ALLOWED/INSECURE_REGISTRIES=127.0.0.1 let a client reach any loopback port."""
    port = listener.getsockname()[1]
    guard = Guard.from_lists(lists[0], frozenset(lists[1]))
    with guarded_session(guard) as session, pytest.raises(BlockedAddress):
        session.get(f"http://127.0.0.1:{port}/", timeout=2)
    assert_no_connection(listener)


# -- name resolution fails closed ------------------------------------------------------------------


def test_unresolvable_name_is_not_handed_to_another_resolver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attack: on a resolver error the name went to urllib3, which resolved it again unchecked.

    Here the guard's lookup fails and any second lookup (a rebinding or split resolver) would
    answer with a public-looking address; the connection must fail without a second lookup.
    """
    calls: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def flaky_getaddrinfo(host: str, *args: object, **kwargs: object) -> object:
        calls.append(host)
        if host == "rebind.example.test":
            if len(calls) == 1:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return real_getaddrinfo("127.0.0.1", *args, **kwargs)  # type: ignore[arg-type]
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    def no_connect(*args: object, **kwargs: object) -> None:
        raise AssertionError("urllib3 must not resolve or connect on its own")

    monkeypatch.setattr(socket, "getaddrinfo", flaky_getaddrinfo)
    monkeypatch.setattr("urllib3.util.connection.create_connection", no_connect)
    with guarded_session(Guard()) as session, pytest.raises(requests.ConnectionError):
        session.get("http://rebind.example.test:8080/v2/", timeout=2)
    assert calls == ["rebind.example.test"]


def test_unresolvable_name_fails_as_a_connection_error() -> None:
    """A name under the reserved .invalid TLD never resolves: a plain connection error."""
    with guarded_session(Guard()) as session, pytest.raises(requests.ConnectionError) as info:
        session.get("http://no-such-registry.invalid/v2/", timeout=5)
    assert not isinstance(info.value, BlockedAddress)
