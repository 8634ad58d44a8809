"""SSRF guard: refuse upstream connections to internal addresses unless explicitly allowed.

The check runs inside the connection itself, on the addresses it resolves and
then connects to, so redirects, token realms and DNS tricks are all covered.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from app.oci import split_hostport


class BlockedAddress(Exception):
    """A connection to an internal address was refused before it was made."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} resolves to {address}, an internal address that is not allowed")
        self.host = host
        self.address = address


def is_internal(address: str) -> bool:
    """Loopback, private, link-local, unspecified and multicast addresses are internal."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_unspecified
        or ip.is_multicast
        or ip.is_reserved
    )


@dataclass(frozen=True)
class Guard:
    """Which hosts may resolve to internal addresses: explicit allow entries and insecure ones."""

    exempt: tuple[str, ...] = ()

    @classmethod
    def from_lists(cls, allowed: tuple[str, ...], insecure: frozenset[str]) -> Guard:
        """Wildcard allow entries never exempt a host; explicit ones and insecure hosts do."""
        explicit = tuple(p for p in allowed if "*" not in p)
        return cls(explicit + tuple(sorted(insecure)))

    def is_exempt(self, host: str, port: int) -> bool:
        """An exemption names host or host:port (IPv6 hosts in brackets)."""
        shown = f"[{host}]" if ":" in host else host.lower()
        for entry in self.exempt:
            entry_host, entry_port = split_hostport(entry)
            entry_shown = f"[{entry_host}]" if ":" in entry_host else entry_host
            if entry_shown == shown and entry_port in (None, port):
                return True
        return False

    def check(self, host: str, port: int, address: str) -> None:
        """Raise BlockedAddress unless connecting host:port to address is allowed."""
        if is_internal(address) and not self.is_exempt(host, port):
            raise BlockedAddress(host, address)


def _host_part(registry: str) -> str:
    if registry.startswith("["):
        return registry[: registry.index("]") + 1]
    return registry.split(":", 1)[0]


def _has_port(text: str) -> bool:
    return ":" in text.rsplit("]", 1)[-1]


def matches_allowlist(registry: str, patterns: tuple[str, ...]) -> bool:
    """ALLOWED_REGISTRIES: a pattern with a port matches host:port, one without matches host."""
    for pattern in patterns:
        subject = registry if _has_port(pattern) else _host_part(registry)
        # Only * is a wildcard: brackets of IPv6 literals and ? are literal characters.
        regex = "".join(".*" if c == "*" else re.escape(c) for c in pattern)
        if re.fullmatch(regex, subject):
            return True
    return False


def _guarded_connection(base: type[HTTPConnection], guard: Guard) -> type[HTTPConnection]:
    class GuardedConnection(base):  # type: ignore[valid-type,misc]
        def _new_conn(self) -> socket.socket:
            host = self._dns_host.strip("[]")
            try:
                infos = socket.getaddrinfo(host, self.port, type=socket.SOCK_STREAM)
            except OSError:
                return super()._new_conn()  # let urllib3 report the resolution error
            for *_, sockaddr in infos:
                guard.check(host, self.port, sockaddr[0])
            sock: socket.socket | None = None
            error: OSError | None = None
            for family, socktype, proto, _, sockaddr in infos:
                try:
                    sock = socket.socket(family, socktype, proto)
                    if self.timeout is None or isinstance(self.timeout, (int, float)):
                        sock.settimeout(self.timeout)
                    for opt in self.socket_options or ():
                        sock.setsockopt(*opt)
                    sock.connect(sockaddr)
                    # The address actually connected to, re-checked after the fact.
                    guard.check(host, self.port, sock.getpeername()[0])
                    return sock
                except OSError as exc:
                    error = exc
                    if sock is not None:
                        sock.close()
                except BlockedAddress:
                    if sock is not None:
                        sock.close()
                    raise
            from urllib3.exceptions import NewConnectionError

            raise NewConnectionError(self, f"Failed to establish a new connection: {error}")

    return GuardedConnection


class GuardedAdapter(HTTPAdapter):
    """A requests adapter whose connections pass through the Guard."""

    def __init__(self, guard: Guard, **kwargs: object) -> None:
        self._guard = guard
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        """Swap in pool classes whose connections check every address."""
        super().init_poolmanager(*args, **kwargs)  # type: ignore[arg-type]
        guard = self._guard

        class Pool(HTTPConnectionPool):
            ConnectionCls = _guarded_connection(HTTPConnection, guard)

        class TLSPool(HTTPSConnectionPool):
            ConnectionCls = _guarded_connection(HTTPSConnection, guard)  # type: ignore[assignment]

        self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": TLSPool}
