"""Typed reading of settings from an environment mapping: each failure is one ConfigError line.

app/config.py hands it the environment (it alone reads os.environ); the gunicorn settings
(app/serverhooks.py) use the same rules for their own few values.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from app.errors import RegistryError
from app.oci import normalize_registry, split_hostport
from app.units import parse_bytes, parse_duration

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_MAX_PRESIGN_SECONDS = 7 * 24 * 3600
_MIN_SECRET = 16
_DNS_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?(?::[0-9]{1,5})?")


class ConfigError(Exception):
    """An invalid setting; str() is the one line printed at start-up."""

    def __init__(self, name: str, value: str | None, allowed: str) -> None:
        shown = "unset" if value is None else repr(value)
        super().__init__(f"invalid configuration: {name}={shown}: {allowed}")
        self.name = name


class Reader:
    """Typed coercion of environment values, each failure a ConfigError."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def text(self, name: str, default: str) -> str:
        value = self.raw(name)
        return default if value is None else value

    def choice(self, name: str, default: str | None, allowed: tuple[str, ...]) -> str:
        value = self.raw(name)
        if value is None and default is not None:
            return default
        if value is None or value.lower() not in allowed:
            raise ConfigError(name, value, "allowed values are " + ", ".join(allowed))
        return value.lower()

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ConfigError(name, value, "expected true or false")

    def integer(self, name: str, default: int, *, minimum: int) -> int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            raise ConfigError(name, value, f"expected an integer >= {minimum}")
        return number

    def seconds(self, name: str, default: float) -> float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = float(value.removesuffix("s"))
        except ValueError:
            number = -1.0
        if not number > 0:
            raise ConfigError(name, value, "expected a positive number of seconds")
        return number

    def duration(self, name: str, default: float) -> float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return parse_duration(value)
        except ValueError:
            raise ConfigError(
                name, value, "expected a duration such as 30s, 10m, 6h or 28d"
            ) from None

    def size(self, name: str) -> int | None:
        value = self.raw(name)
        if value is None:
            return None
        try:
            number = parse_bytes(value)
        except ValueError:
            number = 0
        if number <= 0:
            raise ConfigError(name, value, "expected a size in bytes such as 500Mi or 50Gi")
        return number

    def presign_expiry(self, name: str, default: int) -> int:
        value = self.raw(name)
        if value is None:
            return default
        seconds = int(self.seconds(name, default))
        if not 1 <= seconds <= _MAX_PRESIGN_SECONDS:  # SigV4 presigned URLs live at most 7 days
            raise ConfigError(name, value, f"expected 1 to {_MAX_PRESIGN_SECONDS} seconds")
        return seconds

    def url(self, name: str) -> str | None:
        value = self.raw(name)
        if value is None:
            return None
        parsed = urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.query:
            raise ConfigError(name, value, "expected an http:// or https:// URL")
        return value.rstrip("/")

    def registry(self, name: str, default: str) -> str:
        value = self.raw(name) or default
        try:
            return normalize_registry(value)
        except RegistryError:
            raise ConfigError(name, value, "expected a registry host[:port]") from None

    def registry_list(self, name: str) -> list[str]:
        value = self.raw(name) or ""
        items = [item.strip() for item in value.split(",") if item.strip()]
        try:
            return [normalize_registry(item) for item in items]
        except RegistryError:
            raise ConfigError(name, value, "expected comma-separated host[:port]") from None

    def optional_patterns(self, name: str) -> tuple[str, ...] | None:
        value = self.raw(name)
        if value is None:
            return None
        if not any(item.strip() for item in value.split(",")):
            raise ConfigError(name, value, "expected host[:port] patterns with *")
        return self.patterns(name)

    def patterns(self, name: str) -> tuple[str, ...]:
        value = self.raw(name) or "*"
        items = [item.strip().lower() for item in value.split(",") if item.strip()]
        if not items:  # "," is a list that names nothing, never "every registry" (fail closed)
            raise ConfigError(name, value, "expected host[:port] patterns with *")
        try:
            for item in items:
                normalize_registry(item.replace("*", "x"))
            items = [item if "*" in item else normalize_registry(item) for item in items]
        except RegistryError:
            raise ConfigError(name, value, "expected host[:port] patterns with *") from None
        return tuple(items)

    def secret(self, name: str) -> str | None:
        value = self.raw(name)
        if value is not None and len(value) < _MIN_SECRET:
            raise ConfigError(name, "<hidden>", f"expected at least {_MIN_SECRET} characters")
        return value

    def cluster(self) -> tuple[tuple[str, ...], str | None, str | None]:
        """PEERS, PEERS_DNS and PEER_URL, checked together."""
        peers_value = self.raw("PEERS") or ""
        try:
            peers = tuple(canonical_url(p) for p in peers_value.split(",") if p.strip())
        except ValueError:
            raise ConfigError(
                "PEERS", peers_value, "expected comma-separated http(s)://host:port"
            ) from None
        dns = self.raw("PEERS_DNS")
        if dns is not None and not _DNS_NAME.fullmatch(dns):
            raise ConfigError("PEERS_DNS", dns, "expected a DNS name[:port]")
        peer_url = self.raw("PEER_URL")
        if peer_url is not None:
            try:
                peer_url = canonical_url(peer_url)
            except ValueError:
                raise ConfigError("PEER_URL", peer_url, "expected http(s)://host:port") from None
        if (peers or dns) and peer_url is None:
            raise ConfigError("PEER_URL", None, "required with PEERS or PEERS_DNS")
        if (peers or dns) and (self.raw("STORAGE_BACKEND") or "s3").lower() == "fs":
            raise ConfigError("PEERS", peers_value or dns, "replicas need STORAGE_BACKEND=s3")
        return peers, dns, peer_url

    def networks(self, name: str, default: str) -> tuple[str, ...]:
        value = self.raw(name) or default
        items = [item.strip() for item in value.split(",") if item.strip()]
        try:
            for item in items:
                if item != "*":
                    ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(name, value, "expected comma-separated IPs, networks or *") from None
        return tuple(items)

    def listen_addr(self, name: str, default: str) -> str:
        value = self.raw(name) or default
        host, _, port = value.rpartition(":")
        try:
            if host:
                split_hostport(host)
            valid = port.isdigit() and 0 <= int(port) < 65536
        except ValueError:
            valid = False
        if not valid:
            raise ConfigError(name, value, "expected [host]:port, for example :8080")
        return value

    # -- upstream egress and credentials (issue 14) --------------------------------------------

    def proxy(self, name: str) -> str | None:
        """HTTP(S)_PROXY, the lower-case spelling first as curl reads it; http(s)://host:port."""
        value = self.raw(name.lower()) or self.raw(name)
        if value is None:
            return None
        parsed = urlsplit(value if "://" in value else f"http://{value}")
        try:
            valid = parsed.scheme in ("http", "https") and bool(parsed.hostname)
            valid = valid and (parsed.port or 0) >= 0  # a bad port raises ValueError
        except ValueError:
            valid = False
        if not valid or parsed.path not in ("", "/") or parsed.query:
            shown = "<hidden>" if "@" in value else value  # user:password@ stays out of logs
            raise ConfigError(name, shown, "expected a proxy URL such as http://proxy:3128")
        return parsed.geturl().rstrip("/")

    def no_proxy(self, name: str) -> tuple[str, ...]:
        """NO_PROXY (or no_proxy): hosts, domains, IPs/CIDRs, host:port or `*`."""
        value = self.raw(name.lower()) or self.raw(name) or ""
        items = tuple(item.strip() for item in value.split(",") if item.strip())
        for item in items:
            if any(c.isspace() or c in "/@?#" for c in item.split("/", 1)[0]):
                raise ConfigError(name, value, "expected comma-separated hosts, domains or IPs")
        return items

    def auth_file(self, name: str) -> str | None:
        """A readable Docker config.json; its content is checked here and re-read on change."""
        from app.upstreamauth import load

        path = self.raw(name)
        if path is None:
            return None
        try:
            load(path)
        except OSError as exc:
            raise ConfigError(name, path, f"cannot read it ({exc.strerror})") from None
        except ValueError as exc:
            raise ConfigError(name, path, f"expected a Docker config.json: {exc}") from None
        return path

    def ca_bundle(self, name: str) -> str | None:
        """A PEM file of CA certificates, trusted in addition to the OS trust store.

        Checked without importing ssl: the master must not, before gevent patches it.
        """
        path = self.raw(name)
        if path is None:
            return None
        try:
            with open(path, "rb") as fh:
                pem = fh.read(16 * 1024 * 1024)
        except OSError:
            pem = b""
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            raise ConfigError(name, path, "expected a readable PEM file of CA certificates")
        return path

    def percent(self, name: str, default: float) -> float:
        """A percentage from 0 to 100 (`10` or `10%`)."""
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = float(value.removesuffix("%"))
        except ValueError:
            number = -1.0
        if not 0 <= number <= 100:
            raise ConfigError(name, value, "expected a percentage from 0 to 100, such as 10%")
        return number


def canonical_url(url: str) -> str:
    """A peer URL (PEERS, PEER_URL) as one spelling: scheme://host:port, host lower-cased."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"a peer URL is scheme://host[:port] only: {url!r}")
    host = parts.hostname.lower()
    with contextlib.suppress(ValueError):
        host = str(ipaddress.ip_address(host))
    port = parts.port or (443 if parts.scheme == "https" else 80)
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown}:{port}"
