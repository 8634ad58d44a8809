"""How a request to a registry or its token realm leaves: the pooled session, and one send.

The session is built once per worker from the configuration: every connection goes through
the SSRF guard (app/netguard.py) and the egress proxy and trust store (app/egress.py);
TLS_SKIP_VERIFY_REGISTRIES get their own unverified adapter. Transport.send is the one
place a request is timed and counted in the upstream metrics and where transport failures
become our errors (Denied, UpstreamUnavailable), so callers never see requests' exceptions.
What to send (URLs, headers, the token dance) is app/upstream.py's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import requests
from urllib3.exceptions import HTTPError

from app import metrics
from app.config import Config
from app.egress import Egress, retry_policy, tls_context
from app.errors import Denied, UpstreamUnavailable
from app.netguard import BlockedAddress, Guard, GuardedAdapter
from app.oci import api_host

log = logging.getLogger("oci_pull_through.upstream")

Params = Mapping[str, str] | list[tuple[str, str]] | None
# A realm URL and its query are the upstream's word (its challenge): whatever parsing them
# raises is that realm failing. A registry URL is ours, built from a validated Target.
_REALM_ERRORS: tuple[type[Exception], ...] = (
    requests.RequestException,
    HTTPError,
    OSError,
    ValueError,
)


class Transport:
    """One pooled session per worker; every request goes through the SSRF guard."""

    def __init__(self, config: Config) -> None:
        self.session = requests.Session()
        self.session.trust_env = False  # proxies come from app/config.py, through the adapter
        self.session.max_redirects = 5
        self.session.headers["Accept-Encoding"] = "identity"
        guard = Guard.from_lists(config.allowed_registries, config.insecure_registries)
        egress = Egress(config.http_proxy, config.https_proxy, config.no_proxy)

        def adapter(verify: bool) -> GuardedAdapter:
            return GuardedAdapter(
                guard,
                egress=egress,
                ssl_context=tls_context(config.upstream_ca_bundle if verify else None, verify),
                verify=verify,
                max_retries=retry_policy(),
                pool_connections=16,
                pool_maxsize=64,
            )

        verified = adapter(True)
        self.session.mount("http://", verified)
        self.session.mount("https://", verified)
        for registry in sorted(config.tls_skip_verify_registries):
            log.warning("TLS_SKIP_VERIFY_REGISTRIES: %s is reached WITHOUT verifying TLS", registry)
            self.session.mount(f"https://{api_host(registry)}/", adapter(False))
        self.timeout = (config.upstream_connect_timeout, config.upstream_read_timeout)

    def send(
        self,
        method: str,
        registry: str,
        url: str,
        headers: Mapping[str, str],
        *,
        params: Params = None,
        form: list[tuple[str, str]] | None = None,
        follow_redirects: bool = False,
        realm: bool = False,
    ) -> requests.Response:
        """The one way out: streamed, timed and counted, failures raised as our errors.

        realm marks a request to registry's token realm (its URL came from a challenge).
        A blocked address raises Denied (403); no answer raises UpstreamUnavailable.
        """
        where = f"token realm of {registry}" if realm else f"upstream {registry}"
        errors = _REALM_ERRORS if realm else (requests.RequestException,)
        started = time.monotonic()
        try:
            response = self.session.request(
                method,
                url,
                params=params,
                data=form,
                headers=headers,
                timeout=self.timeout,
                allow_redirects=follow_redirects,
                stream=True,
            )
        except BlockedAddress as exc:
            raise Denied(f"{where} refused: {exc}") from None
        except errors as exc:
            metrics.upstream_answered(registry, "error", time.monotonic() - started)
            reason = "token realm unreachable" if realm else _describe(exc)
            raise UpstreamUnavailable(registry, reason) from None
        metrics.upstream_answered(registry, response.status_code, time.monotonic() - started)
        return response


def _describe(exc: Exception) -> str:
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.TooManyRedirects):
        return "too many redirects"
    return "connection failed"
