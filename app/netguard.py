"""SSRF guard: refuse upstream connections to internal addresses unless explicitly allowed.

The check runs inside the connection itself, on the addresses it resolves and
then connects to, so redirects, token realms and DNS tricks are all covered.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NameResolutionError, NewConnectionError

from app.egress import Egress
from app.oci import split_hostport

log = logging.getLogger("oci_pull_through.netguard")

DEFAULT_PORTS = (443, 80)


class BlockedAddress(Exception):
    """A connection to an internal address was refused before it was made.

    The message names the host only: it reaches the client in a 403, and what an internal
    name resolves to is none of the client's business (the address is logged instead).
    """

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} is or resolves to an internal address, which is not allowed")
        self.host = host
        self.address = address


# Ranges the stdlib flags miss, or flag differently from one Python release to the next (§15).
_INTERNAL_V4 = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",
        "100.64.0.0/10",  # CGNAT; cloud metadata such as 100.100.100.200
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "224.0.0.0/4",
        "240.0.0.0/4",  # reserved, and the limited broadcast address
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: site-specific by definition


def _flagged(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_unspecified
        or ip.is_multicast
        or ip.is_reserved
    )


def _internal_v4(ip: ipaddress.IPv4Address) -> bool:
    return _flagged(ip) or any(ip in net for net in _INTERNAL_V4)


def is_internal(address: str) -> bool:
    """Whether a connection to this address could reach the proxy's own network (§15).

    Loopback, private, link-local, CGNAT, benchmarking, reserved, unspecified and multicast
    addresses are internal, and so are IPv6 forms that embed an internal IPv4 address
    (IPv4-mapped, NAT64, 6to4). A zone id (fe80::1%eth0) does not change the verdict.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return _internal_v4(ip)
    if ip.ipv4_mapped is not None:
        return _internal_v4(ip.ipv4_mapped)
    if ip in _NAT64:
        # The well-known NAT64 prefix reaches the embedded IPv4 address, and only that.
        return _internal_v4(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip in _NAT64_LOCAL:
        return True
    if ip.sixtofour is not None and _internal_v4(ip.sixtofour):
        return True
    return _flagged(ip)


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
        """An exemption names host:port, or host alone for the default ports (443, and 80).

        A port-less entry must not open every service of an internal host (§15); plain-HTTP
        INSECURE_REGISTRIES entries are reached on 80, so that is a default port too.
        """
        shown = f"[{host}]" if ":" in host else host.lower()
        for entry in self.exempt:
            entry_host, entry_port = split_hostport(entry)
            entry_shown = f"[{entry_host}]" if ":" in entry_host else entry_host.lower()
            ports = DEFAULT_PORTS if entry_port is None else (entry_port,)
            if entry_shown == shown and port in ports:
                return True
        return False

    def check(self, host: str, port: int, address: str) -> None:
        """Raise BlockedAddress unless connecting host:port to address is allowed."""
        if is_internal(address) and not self.is_exempt(host, port):
            log.warning(
                "refused upstream connection to %s port %s: %s is internal", host, port, address
            )
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
            if _to_proxy(self, host):
                # The configured proxy (trusted config): the adapter checked the target.
                return super()._new_conn()
            try:
                infos = socket.getaddrinfo(host, self.port, type=socket.SOCK_STREAM)
            except OSError as exc:
                # Fail closed: never hand the name to another resolver that is not checked.
                reason = exc if isinstance(exc, socket.gaierror) else socket.gaierror(str(exc))
                raise NameResolutionError(host, self, reason) from None
            if not infos:
                raise NameResolutionError(host, self, socket.gaierror("no addresses"))
            for *_, sockaddr in infos:
                guard.check(host, self.port, str(sockaddr[0]))
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
            raise NewConnectionError(self, f"Failed to establish a new connection: {error}")

    return GuardedConnection


def _to_proxy(conn: HTTPConnection, host: str) -> bool:
    proxy = getattr(conn, "proxy", None)
    if proxy is None or proxy.host is None:
        return False
    return proxy.host.strip("[]").lower() == host.lower() and (proxy.port or 80) == conn.port


def check_target(guard: Guard, host: str, port: int) -> None:
    """Through a proxy: resolve the target here and check every address it has (§15).

    Fails closed (a name that does not resolve here is not handed to the proxy). The proxy
    resolves the name again, so a DNS answer that changes in between is not seen: the
    residual rebinding window of docs/security.md.
    """
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise requests.ConnectionError(f"{host} does not resolve: {exc}") from None
    if not infos:
        raise requests.ConnectionError(f"{host} does not resolve")
    for *_, sockaddr in infos:
        guard.check(host, port, str(sockaddr[0]))


class GuardedAdapter(HTTPAdapter):
    """A requests adapter whose connections pass through the Guard.

    Direct connections are checked on the addresses they connect to; with an egress proxy
    (app.egress.Egress) the target is checked by name before the request goes to the proxy,
    and the socket to the proxy itself is not checked. TLS uses ssl_context (the OS trust
    store plus UPSTREAM_CA_BUNDLE), or no verification when verify is False.
    """

    def __init__(
        self,
        guard: Guard,
        *,
        egress: Egress | None = None,
        ssl_context: ssl.SSLContext | None = None,
        verify: bool = True,
        **kwargs: object,
    ) -> None:
        self._guard = guard
        self._egress = egress or Egress()
        self._ssl_context = ssl_context
        self._verify = verify
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def _pool_classes(self) -> dict[str, type[HTTPConnectionPool]]:
        guard = self._guard

        class Pool(HTTPConnectionPool):
            ConnectionCls = _guarded_connection(HTTPConnection, guard)

        class TLSPool(HTTPSConnectionPool):
            ConnectionCls = _guarded_connection(HTTPSConnection, guard)  # type: ignore[assignment]

        return {"http": Pool, "https": TLSPool}

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        """Swap in pool classes whose connections check every address."""
        if self._ssl_context is not None:
            kwargs["ssl_context"] = self._ssl_context
        super().init_poolmanager(*args, **kwargs)  # type: ignore[arg-type]
        self.poolmanager.pool_classes_by_scheme = self._pool_classes()

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: object) -> object:
        """The proxy's pools: the same guarded classes and TLS context for the target."""
        fresh = proxy not in self.proxy_manager
        if self._ssl_context is not None:
            proxy_kwargs.setdefault("ssl_context", self._ssl_context)
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if fresh:
            manager.pool_classes_by_scheme = self._pool_classes()
        return manager

    def send(self, request: PreparedRequest, *args: Any, **kwargs: Any) -> Response:
        """Each hop (redirects too) picks its proxy by NO_PROXY; a proxied target is checked."""
        url = request.url or ""
        proxy = self._egress.proxy_for(url)
        if proxy is not None:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            check_target(self._guard, parts.hostname or "", port)
        kwargs["proxies"] = {urlsplit(url).scheme: proxy} if proxy else {}
        if not self._verify:
            kwargs["verify"] = False
        return super().send(request, *args, **kwargs)
