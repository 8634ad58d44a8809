"""Configuration: the only place that reads the environment."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from app.errors import RegistryError
from app.oci import normalize_registry, split_hostport
from app.units import parse_bytes, parse_duration

TRANSPARENT, AUTHENTICATED = "transparent", "authenticated"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_LOG_LEVELS = ("debug", "info", "warn", "warning", "error")
_MAX_PRESIGN_SECONDS = 7 * 24 * 3600
_MIN_SECRET = 16
_DNS_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?(?::[0-9]{1,5})?")
# Set by gunicorn.conf.py in the master when TOKEN_SECRET is unset, so that all workers
# of one server share one random per-start key.
EPHEMERAL_SECRET = "OCI_PULL_THROUGH_EPHEMERAL_TOKEN_SECRET"


class ConfigError(Exception):
    """An invalid setting; str() is the one line printed at start-up."""

    def __init__(self, name: str, value: str | None, allowed: str) -> None:
        shown = "unset" if value is None else repr(value)
        super().__init__(f"invalid configuration: {name}={shown}: {allowed}")
        self.name = name


@dataclass(frozen=True)
class Config:
    """Every setting of the proxy, typed and validated."""

    proxy_mode: str
    storage_backend: str = "s3"
    listen_addr: str = ":8080"
    generate_self_signed_tls: bool = False
    log_level: str = "info"
    log_format: str = "text"
    cache_tag_manifests: bool = True
    cache_latest_tag: bool = False
    upstream_registry: str = "docker.io"
    insecure_registries: frozenset[str] = frozenset()
    allowed_registries: tuple[str, ...] = ("*",)
    # None: the default, UPSTREAM_REGISTRY plus the explicit ALLOWED_REGISTRIES entries
    credential_registries: tuple[str, ...] | None = None
    upstream_connect_timeout: float = 10.0
    upstream_read_timeout: float = 60.0
    fs_root: str = "/data/oci-cache"
    spool_dir: str = ""
    s3_bucket: str = "oci-cache"
    s3_prefix: str = ""
    s3_force_path_style: bool = True
    s3_lifecycle_days: int = 28
    s3_presign_expiry: int = 900
    s3_public_endpoint_url: str | None = None
    s3_redirect: bool = True
    public_url: str | None = None
    token_secret: str | None = None
    token_secret_ephemeral: bool = False
    token_ttl: int = 300
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")
    metrics_enabled: bool = True
    metrics_multiproc_dir: str | None = None
    tag_ttl: float = 28 * 86400.0
    latest_ttl: float = 3600.0
    tag_revalidate: str = "inline"  # or "background": serve a stale tag at once (§13)
    serve_stale_on_404: bool = False
    fs_max_bytes: int | None = None
    spool_max_bytes: int | None = None
    prefetch_concurrency: int = 4
    peers: tuple[str, ...] = ()
    peers_dns: str | None = None
    peer_url: str | None = None
    cluster_secret: str | None = None
    # Upstream egress and credentials (issue 14)
    upstream_auth_file: str | None = None
    http_proxy: str | None = None
    https_proxy: str | None = None
    no_proxy: tuple[str, ...] = ()
    upstream_ca_bundle: str | None = None
    tls_skip_verify_registries: frozenset[str] = frozenset()
    rate_limit_reserve: float = 0.10

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Build and validate the configuration; raises ConfigError naming the bad variable."""
        env = os.environ if environ is None else environ
        reader = _Reader(env)
        tls = reader.boolean("GENERATE_SELF_SIGNED_TLS", False)
        cluster = reader.cluster()
        return cls(
            proxy_mode=reader.choice("PROXY_MODE", None, (TRANSPARENT, AUTHENTICATED)),
            storage_backend=reader.choice("STORAGE_BACKEND", "s3", ("s3", "fs")),
            listen_addr=reader.listen_addr("LISTEN_ADDR", ":8443" if tls else ":8080"),
            generate_self_signed_tls=tls,
            log_level=reader.choice("LOG_LEVEL", "info", _LOG_LEVELS).replace("warning", "warn"),
            log_format=reader.choice("LOG_FORMAT", "text", ("text", "json")),
            cache_tag_manifests=reader.boolean("CACHE_TAG_MANIFESTS", True),
            cache_latest_tag=reader.boolean("CACHE_LATEST_TAG", False),
            upstream_registry=reader.registry("UPSTREAM_REGISTRY", "docker.io"),
            insecure_registries=frozenset(reader.registry_list("INSECURE_REGISTRIES")),
            allowed_registries=reader.patterns("ALLOWED_REGISTRIES"),
            credential_registries=reader.optional_patterns("CREDENTIAL_REGISTRIES"),
            upstream_connect_timeout=reader.seconds("UPSTREAM_CONNECT_TIMEOUT", 10.0),
            upstream_read_timeout=reader.seconds("UPSTREAM_READ_TIMEOUT", 60.0),
            fs_root=reader.text("FS_ROOT", "/data/oci-cache"),
            spool_dir=reader.text("SPOOL_DIR", ""),
            s3_bucket=reader.text("S3_BUCKET", "oci-cache"),
            s3_prefix=reader.text("S3_PREFIX", "").strip("/"),
            s3_force_path_style=reader.boolean("S3_FORCE_PATH_STYLE", True),
            s3_lifecycle_days=reader.integer("S3_LIFECYCLE_DAYS", 28, minimum=0),
            s3_presign_expiry=reader.presign_expiry("S3_PRESIGN_EXPIRY", 900),
            s3_public_endpoint_url=reader.url("S3_PUBLIC_ENDPOINT_URL"),
            s3_redirect=reader.boolean("S3_REDIRECT", True),
            public_url=reader.url("PUBLIC_URL"),
            token_secret=reader.secret("TOKEN_SECRET") or reader.raw(EPHEMERAL_SECRET),
            token_secret_ephemeral=reader.raw("TOKEN_SECRET") is None,
            token_ttl=reader.integer("TOKEN_TTL", 300, minimum=60),
            forwarded_allow_ips=reader.networks("FORWARDED_ALLOW_IPS", "127.0.0.1,::1"),
            metrics_enabled=reader.boolean("METRICS_ENABLED", True),
            metrics_multiproc_dir=reader.raw("PROMETHEUS_MULTIPROC_DIR"),
            tag_ttl=reader.duration("TAG_TTL", 28 * 86400.0),
            latest_ttl=reader.duration("LATEST_TTL", 3600.0),
            tag_revalidate=reader.choice("TAG_REVALIDATE", "inline", ("inline", "background")),
            serve_stale_on_404=reader.boolean("SERVE_STALE_ON_404", False),
            fs_max_bytes=reader.size("FS_MAX_BYTES"),
            spool_max_bytes=reader.size("SPOOL_MAX_BYTES"),
            prefetch_concurrency=reader.integer("PREFETCH_CONCURRENCY", 4, minimum=0),
            peers=cluster[0],
            peers_dns=cluster[1],
            peer_url=cluster[2],
            cluster_secret=reader.secret("CLUSTER_SECRET"),
            upstream_auth_file=reader.auth_file("UPSTREAM_AUTH_FILE"),
            http_proxy=reader.proxy("HTTP_PROXY"),
            https_proxy=reader.proxy("HTTPS_PROXY"),
            no_proxy=reader.no_proxy("NO_PROXY"),
            upstream_ca_bundle=reader.ca_bundle("UPSTREAM_CA_BUNDLE"),
            tls_skip_verify_registries=frozenset(
                reader.registry_list("TLS_SKIP_VERIFY_REGISTRIES")
            ),
            rate_limit_reserve=reader.percent("RATE_LIMIT_RESERVE", 10.0) / 100,
        )

    @property
    def peer_secret(self) -> str | None:
        """The peer HMAC's key material: CLUSTER_SECRET, else a chosen TOKEN_SECRET, else None
        (a per-start random TOKEN_SECRET differs between replicas: clustering is then off)."""
        if self.cluster_secret:
            return self.cluster_secret
        return None if self.token_secret_ephemeral else self.token_secret

    @property
    def credential_patterns(self) -> tuple[str, ...]:
        """Where a client's credentials may go (§15): CREDENTIAL_REGISTRIES, else its default."""
        if self.credential_registries is not None:
            return self.credential_registries
        explicit = tuple(p for p in self.allowed_registries if "*" not in p)
        return tuple(dict.fromkeys((self.upstream_registry, *explicit)))


def spool_dir(config: Config) -> str:
    """Where in-flight downloads are spooled: shared by the workers of one instance."""
    if config.spool_dir:
        return config.spool_dir
    # Not under FS_ROOT: a full cache disk must not break downloads that pass through.
    # One directory per cache, so two instances on a host never share a flight.
    store = (
        os.path.abspath(config.fs_root)
        if config.storage_backend == "fs"
        else f"s3://{config.s3_bucket}/{config.s3_prefix}"
    )
    tag = hashlib.sha256(store.encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"oci-pull-through-spool-{os.getuid()}-{tag}")


class _Reader:
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
        try:
            for item in items:
                normalize_registry(item.replace("*", "x"))
            items = [item if "*" in item else normalize_registry(item) for item in items]
        except RegistryError:
            raise ConfigError(name, value, "expected host[:port] patterns with *") from None
        return tuple(items) or ("*",)

    def secret(self, name: str) -> str | None:
        value = self.raw(name)
        if value is not None and len(value) < _MIN_SECRET:
            raise ConfigError(name, "<hidden>", f"expected at least {_MIN_SECRET} characters")
        return value

    def cluster(self) -> tuple[tuple[str, ...], str | None, str | None]:
        """PEERS, PEERS_DNS and PEER_URL, checked together."""
        from app.peers import canonical_url

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


def bind_addresses(listen_addr: str) -> list[str]:
    """gunicorn's bind for LISTEN_ADDR: an empty host means IPv6 and IPv4 where there is IPv6.

    `[::]:port` with IPV6_V6ONLY off (Linux's default, net.ipv6.bindv6only=0) takes both;
    where the host forces v6only, `0.0.0.0:port` is bound as well; without IPv6, IPv4 only.
    """
    host, _, port = listen_addr.rpartition(":")
    if host:
        return [listen_addr]
    if not _has_ipv6():
        return [f"0.0.0.0:{port}"]
    try:
        with open("/proc/sys/net/ipv6/bindv6only") as fh:
            v6only = fh.read().strip() == "1"
    except OSError:
        v6only = False
    return [f"[::]:{port}", f"0.0.0.0:{port}"] if v6only else [f"[::]:{port}"]


def _has_ipv6() -> bool:
    import socket

    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True
