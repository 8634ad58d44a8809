"""How upstream traffic leaves: retries, a corporate forward proxy, and which CAs are trusted.

The SSRF guard (app/netguard.py) uses these: through a proxy the socket goes to the proxy,
so the target's addresses are checked by name before the request is handed to it.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from urllib3.exceptions import MaxRetryError, NameResolutionError, ResponseError
from urllib3.util.retry import Retry

from app import metrics
from app.bodies import MAX_ERROR_BODY

log = logging.getLogger("oci_pull_through.egress")

RETRIES = 2  # at most three attempts per request
RETRY_AFTER_CAP = 5.0  # seconds: a longer Retry-After is passed on to the client at once
BACKOFF_MAX = 2.0  # so one request waits at most RETRIES * RETRY_AFTER_CAP between attempts
RETRY_STATUSES = frozenset({502, 503, 504})  # and 429 (and 503) carrying Retry-After


class UpstreamRetry(Retry):
    """Retries that help and never hurt.

    GET and HEAD only, before the first body byte: a connect error (not a failed name
    resolution: the guard's answer is final), 502/503/504, and 429 or 503 with a
    Retry-After of at most RETRY_AFTER_CAP. Read errors are never retried (the request may
    have been answered). urllib3 drains the answer it retries; one without a Content-Length
    or longer than MAX_ERROR_BODY is passed on instead, so a huge error body is never read.
    """

    def increment(
        self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None
    ):
        """Count the retry, or refuse it (MaxRetryError) when it could hurt."""
        if isinstance(error, NameResolutionError):
            raise MaxRetryError(_pool, url, error)
        if response is not None:
            if not _cheap_to_drain(response) or _retry_after(response) > RETRY_AFTER_CAP:
                reason = ResponseError(f"{response.status} not retried")
                raise MaxRetryError(_pool, url, reason)
            metrics.upstream_retried(str(response.status))
        elif error is not None:
            metrics.upstream_retried("connect")
        return super().increment(method, url, response, error, _pool, _stacktrace)


def _cheap_to_drain(response: object) -> bool:
    remaining = getattr(response, "length_remaining", None)  # 0 for HEAD, None if unknown
    return isinstance(remaining, int) and remaining <= MAX_ERROR_BODY


def _retry_after(response: object) -> float:
    value = getattr(response, "headers", {}).get("Retry-After")
    if value is None:
        return 0.0
    try:
        return Retry.parse_retry_after(Retry(), value)
    except Exception:  # noqa: BLE001 - unparseable: treated as too long, never retried
        return RETRY_AFTER_CAP + 1


def retry_policy() -> UpstreamRetry:
    """The adapter's urllib3 Retry: bounded in count and in total waiting time."""
    return UpstreamRetry(
        total=RETRIES,
        connect=RETRIES,
        read=False,
        status=RETRIES,
        other=0,
        redirect=False,
        allowed_methods=frozenset({"GET", "HEAD"}),
        status_forcelist=RETRY_STATUSES,
        backoff_factor=0.25,
        backoff_max=BACKOFF_MAX,
        respect_retry_after_header=True,
        raise_on_status=False,
        raise_on_redirect=False,
    )


@dataclass(frozen=True)
class Egress:
    """HTTP(S)_PROXY and NO_PROXY as app/config.py read them; the proxy is trusted config."""

    http_proxy: str | None = None
    https_proxy: str | None = None
    no_proxy: tuple[str, ...] = ()

    def proxy_for(self, url: str) -> str | None:
        """The proxy this URL goes through, or None for a direct connection."""
        parts = urlsplit(url)
        proxy = self.https_proxy if parts.scheme == "https" else self.http_proxy
        if proxy is None or bypasses(parts.hostname or "", parts.port, self.no_proxy):
            return None
        return proxy


def bypasses(host: str, port: int | None, entries: tuple[str, ...]) -> bool:
    """curl's NO_PROXY rules: `*`, a domain and its subdomains, an IP or CIDR, `host:port`."""
    host = host.strip("[]").lower().rstrip(".")
    for entry in entries:
        entry = entry.strip().lower()
        if entry == "*":
            return True
        name, entry_port = entry, None
        if entry.startswith("[") and "]" in entry:
            name, _, rest = entry[1:].partition("]")
            entry_port = rest.lstrip(":") or None
        elif entry.count(":") == 1:
            name, entry_port = entry.split(":")
        if entry_port is not None and (not entry_port.isdigit() or int(entry_port) != port):
            continue
        try:
            if ipaddress.ip_address(host) in ipaddress.ip_network(name, strict=False):
                return True
            continue
        except ValueError:
            pass
        name = name.lstrip(".").rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def tls_context(ca_bundle: str | None, verify: bool = True) -> ssl.SSLContext:
    """The OS trust store plus UPSTREAM_CA_BUNDLE; or no verification at all."""
    if not verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    # The OS trust store through OpenSSL's default paths (/etc/ssl/certs on Debian), not the
    # truststore package: its SSLContext recurses in verify_mode's setter once gevent has
    # patched ssl (every worker), so it cannot be used here.
    context = ssl.create_default_context()
    if ca_bundle:
        context.load_verify_locations(cafile=ca_bundle)
    return context
