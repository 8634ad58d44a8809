"""Talking to upstream registries: URLs, header forwarding, credentials, the token exchange.

How a request leaves (the guarded session, timeouts, metrics, transport errors) is
app/transport.py's; this module decides what is sent, to whom, with which credentials.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

import requests
from urllib3.exceptions import HTTPError

from app import ratelimit, wwwauth
from app.auth.tokencache import TokenCache
from app.bodies import MAX_TOKEN_BODY, TooLarge, keep_error_body, read_limited
from app.config import TRANSPARENT, Config
from app.errors import Denied, UpstreamUnavailable
from app.netguard import matches_allowlist
from app.oci import api_host
from app.transport import Params, Transport
from app.upstreamauth import AuthFile, UpstreamCredentials

log = logging.getLogger("oci_pull_through.upstream")


@dataclass(frozen=True)
class ClientHeaders:
    """The request headers of the client that matter upstream."""

    authorization: str | None = None
    accept: tuple[str, ...] = ()
    range: str | None = None
    if_range: str | None = None
    user_agent: str | None = None


def parse_bearer_challenge(header: str | Sequence[str] | None) -> dict[str, str] | None:
    """The first Bearer challenge naming a realm among the WWW-Authenticate value(s), or None."""
    if not header:
        return None
    values = [header] if isinstance(header, str) else list(header)
    return wwwauth.bearer(wwwauth.parse_all(values))


class TokenRefused(UpstreamUnavailable):
    """A token realm answered 401 or 403: the credentials sent (or none) are not enough."""


@dataclass(frozen=True)
class RealmToken:
    """A token a registry's realm issued, and its lifetime in seconds."""

    value: str
    expires_in: float


class Upstream:
    """Every call goes through the allowlist, then out through the worker's Transport."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.tokens = TokenCache()
        self.transport = Transport(config)
        self.auth_file: AuthFile | None = None
        if config.upstream_auth_file and config.proxy_mode == TRANSPARENT:
            self.auth_file = AuthFile(config.upstream_auth_file)
        elif config.upstream_auth_file:
            log.warning("UPSTREAM_AUTH_FILE is ignored in authenticated mode (SPEC §5)")
        ratelimit.configure(config.rate_limit_reserve)

    def configured_credentials(self, registry: str) -> UpstreamCredentials | None:
        """UPSTREAM_AUTH_FILE's credentials for registry: transparent mode only (SPEC §5)."""
        if self.auth_file is None or self.config.proxy_mode != TRANSPARENT:
            return None
        return self.auth_file.get(registry)

    def may_send_credentials(self, registry: str) -> bool:
        """§15: a client's credentials only ever go to CREDENTIAL_REGISTRIES (and their realms)."""
        return matches_allowlist(registry, self.config.credential_patterns)

    def check_allowed(self, registry: str) -> None:
        """ALLOWED_REGISTRIES decides which upstreams a request may name."""
        if not matches_allowlist(registry, self.config.allowed_registries):
            raise Denied(f"registry {registry} is not in ALLOWED_REGISTRIES")

    def url(self, registry: str, path: str) -> str:
        """Plain HTTP only for INSECURE_REGISTRIES."""
        scheme = "http" if registry in self.config.insecure_registries else "https"
        return f"{scheme}://{api_host(registry)}{path}"

    def send(
        self,
        method: str,
        registry: str,
        path: str,
        client: ClientHeaders,
        *,
        name: str | None = None,
        params: Params = None,
        forward_range: bool = False,
        follow_redirects: bool = False,
        token_dance: bool = True,
    ) -> requests.Response:
        """Send one request upstream, with the anonymous token dance and the transparent retry.

        A client Authorization for a registry outside CREDENTIAL_REGISTRIES is dropped here,
        the one door every registry request goes through: that registry is asked anonymously.
        """
        self.check_allowed(registry)
        sent_by_client = client.authorization is not None
        if sent_by_client and not self.may_send_credentials(registry):
            client = replace(client, authorization=None)
        # The cache's own credentials: only for a request that carries none of the client's.
        configured = None if sent_by_client else self.configured_credentials(registry)
        token_key = registry if configured is None else f"{registry}#{configured.fingerprint}"
        headers = self._forward_headers(client, forward_range)
        default_scope = f"repository:{name}:pull" if name else ""
        used_cached = False
        if client.authorization is None and default_scope:
            cached = self.tokens.get(token_key, default_scope)
            if cached:
                headers["Authorization"] = f"Bearer {cached}"
                used_cached = True
        url = self.url(registry, path)
        response = self._request(method, registry, url, headers, params, follow_redirects)
        if response.status_code != 401:
            return response
        challenges = wwwauth.parse_all(wwwauth.header_values(response))
        challenge = wwwauth.bearer(challenges)
        retry_anonymously = client.authorization is None or self.config.proxy_mode == TRANSPARENT
        if not retry_anonymously or not token_dance:
            return response
        if configured is not None and not _answered_by(response, registry):
            configured = None  # a redirect target's challenge never gets the cache's credentials
        if used_cached:
            self.tokens.drop(token_key, default_scope)
        authorization = None
        if challenge is not None:
            scope = challenge.get("scope", default_scope)
            token = self.realm_token(registry, challenge, scope, configured)
            authorization = f"Bearer {token}" if token else None
        elif configured is not None and configured.username and wwwauth.offers_basic(challenges):
            authorization = f"Basic {configured.basic()}"
        if authorization is None:
            return response
        keep_error_body(response, registry)  # the original 401, to forward if the retry fails
        retry_headers = dict(headers, Authorization=authorization)
        retry = self._request(method, registry, url, retry_headers, params, follow_redirects)
        if retry.status_code == 401:
            retry.close()
            return response
        response.close()
        return retry

    def realm_token(
        self,
        registry: str,
        challenge: Mapping[str, str],
        scope: str,
        configured: UpstreamCredentials | None = None,
    ) -> str | None:
        """A token from the challenge's realm, with the configured credentials when given."""
        if configured is not None:
            key = f"{registry}#{configured.fingerprint}"
            cached = self.tokens.get(key, scope) if scope else None
            if cached:
                return cached
            params = _token_params(challenge, scope)
            try:
                token = self.fetch_token(
                    registry,
                    challenge["realm"],
                    params,
                    basic=None if configured.identity_token else configured.basic(),
                    refresh_token=configured.identity_token or None,
                )
            except UpstreamUnavailable as exc:  # TokenRefused too: go anonymous
                log.warning("UPSTREAM_AUTH_FILE credentials for %s: %s", registry, exc.message)
            else:
                if scope:
                    self.tokens.put(key, scope, token.value, token.expires_in)
                return token.value
        return self.anonymous_token(registry, challenge, scope)

    def anonymous_token(
        self, registry: str, challenge: Mapping[str, str], scope: str
    ) -> str | None:
        """Fetch (or reuse) an anonymous token from the challenge's realm; None on any failure."""
        if scope:
            cached = self.tokens.get(registry, scope)
            if cached:
                return cached
        try:
            token = self.fetch_token(registry, challenge["realm"], _token_params(challenge, scope))
        except UpstreamUnavailable:  # TokenRefused too
            return None
        if scope:
            self.tokens.put(registry, scope, token.value, token.expires_in)
        return token.value

    def fetch_token(
        self,
        registry: str,
        realm: str,
        params: list[tuple[str, str]],
        basic: str | None = None,
        refresh_token: str | None = None,
    ) -> RealmToken:
        """One token from a registry's realm, with Basic credentials when given.

        With refresh_token (a config.json identitytoken), the OAuth2 form POST instead.

        The one upstream token fetch, for the anonymous dance and the token proxy alike: SSRF
        guarded (Denied), body capped at MAX_TOKEN_BODY, counted in the upstream metrics.
        Raises TokenRefused for a 401/403 and UpstreamUnavailable for any other failure.
        """
        headers = {"Authorization": f"Basic {basic}"} if basic is not None else {}
        form = None
        if refresh_token is not None:
            grant = [("grant_type", "refresh_token"), ("refresh_token", refresh_token)]
            form, params = [*grant, ("client_id", "oci-pull-through"), *params], []
        method = "GET" if form is None else "POST"
        reply = self.transport.send(
            method, registry, realm, headers, params=params, form=form, realm=True
        )
        with reply:
            if reply.status_code in (401, 403):
                raise TokenRefused(registry, f"token realm answered {reply.status_code}")
            if reply.status_code != 200:
                raise UpstreamUnavailable(registry, f"token realm answered {reply.status_code}")
            try:
                body = json.loads(read_limited(reply, MAX_TOKEN_BODY))
            except TooLarge:
                raise UpstreamUnavailable(
                    registry, f"token answer larger than {MAX_TOKEN_BODY} bytes"
                ) from None
            except ValueError:
                raise UpstreamUnavailable(registry, "token realm sent no JSON") from None
            except (requests.RequestException, HTTPError, OSError):
                raise UpstreamUnavailable(registry, "token answer failed") from None
        value = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise UpstreamUnavailable(registry, "token realm sent no token")
        try:
            expires_in = float(body.get("expires_in") or 60)
        except (TypeError, ValueError):
            expires_in = 60.0
        return RealmToken(value, expires_in if math.isfinite(expires_in) else 60.0)

    def _forward_headers(self, client: ClientHeaders, forward_range: bool) -> dict[str, str]:
        headers: dict[str, str] = {}
        if client.authorization:
            headers["Authorization"] = client.authorization
        if client.accept:
            headers["Accept"] = ", ".join(client.accept)
        if client.user_agent:
            headers["User-Agent"] = client.user_agent
        if forward_range and client.range:
            headers["Range"] = client.range
            if client.if_range:
                headers["If-Range"] = client.if_range
        return headers

    def _request(
        self,
        method: str,
        registry: str,
        url: str,
        headers: dict[str, str],
        params: Params,
        follow_redirects: bool,
    ) -> requests.Response:
        response = self.transport.send(
            method, registry, url, headers, params=params, follow_redirects=follow_redirects
        )
        ratelimit.observe(registry, response.headers)
        return response


def _token_params(challenge: Mapping[str, str], scope: str) -> list[tuple[str, str]]:
    pairs = (("service", challenge.get("service")), ("scope", scope))
    return [(k, v) for k, v in pairs if v]


def _answered_by(response: requests.Response, registry: str) -> bool:
    """Whether the answer came from the registry's own host, not from a redirect target."""
    return urlsplit(response.url).netloc.lower() == api_host(registry).lower()
