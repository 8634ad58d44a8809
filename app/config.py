"""Configuration: the only place that reads the environment."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

from app.envreader import ConfigError, Reader

__all__ = ["AUTHENTICATED", "TRANSPARENT", "Config", "ConfigError", "bind_addresses", "spool_dir"]

TRANSPARENT, AUTHENTICATED = "transparent", "authenticated"
_LOG_LEVELS = ("debug", "info", "warn", "warning", "error")
# Set by gunicorn.conf.py in the master when TOKEN_SECRET is unset, so that all workers
# of one server share one random per-start key.
EPHEMERAL_SECRET = "OCI_PULL_THROUGH_EPHEMERAL_TOKEN_SECRET"


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
        reader = Reader(env)
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


def healthcheck_url(listen_addr: str, tls: bool) -> str:
    """The /healthz URL of the server bound to LISTEN_ADDR, reached over loopback."""
    host, _, port = listen_addr.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}/healthz"
