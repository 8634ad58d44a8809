"""The token proxy of §12: issue proxy tokens carrying upstream access, and use them.

No Flask here. For each upstream named by a token request's scopes, the issuer learns
the upstream's challenge and obtains access for the upstream-side names: a token from a
Bearer upstream's realm, checked Basic credentials, or nothing for an open registry. The
grants for every registry go into one sealed proxy token (app.auth.tokens); on a registry
request, only the grant for that request's registry is sent, and only to that registry.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
from dataclasses import dataclass, replace

from app.auth import Scheme
from app.auth.challenge import ChallengeCache
from app.auth.scopes import RepositoryScope, by_registry
from app.auth.tokens import Grant, Sealer, is_proxy_token
from app.config import TRANSPARENT, Config
from app.errors import RegistryError, UpstreamUnavailable
from app.upstream import ClientHeaders, TokenRefused, Upstream

log = logging.getLogger("oci_pull_through.tokens")
MIN_TTL = 10


class Unauthorized(RegistryError):
    """The upstream rejected the client's credentials."""

    status, code = 401, "UNAUTHORIZED"


@dataclass(frozen=True)
class Credentials:
    """Username and password a client sent to the token endpoint."""

    username: str
    password: str

    def basic(self) -> str:
        """The Basic Authorization value (without the scheme)."""
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")


def parse_basic(authorization: str | None) -> Credentials | None:
    """Credentials of a Basic Authorization header; None for anything else."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    username, sep, password = decoded.partition(":")
    return Credentials(username, password) if sep else None


@dataclass(frozen=True)
class Issued:
    """The token endpoint's answer."""

    token: str
    expires_in: int
    issued_at: int

    def body(self) -> dict[str, object]:
        """The Docker token / OAuth2 JSON body."""
        issued = dt.datetime.fromtimestamp(self.issued_at, dt.UTC)
        return {
            "token": self.token,
            "access_token": self.token,
            "expires_in": self.expires_in,
            "issued_at": issued.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


class TokenProxy:
    """Issues sealed proxy tokens and turns them back into upstream credentials."""

    def __init__(self, config: Config, upstream: Upstream, sealer: Sealer) -> None:
        self.config = config
        self.upstream = upstream
        self.sealer = sealer
        self.challenges = ChallengeCache(upstream)

    def issue(self, scopes: list[RepositoryScope], creds: Credentials | None) -> Issued:
        """One proxy token with a grant for each upstream the scopes name."""
        grants: dict[str, Grant] = {}
        ttl = self.config.token_ttl
        for registry, group in by_registry(scopes).items():
            grant, lifetime = self._grant(registry, group, creds)
            grants[registry] = grant
            if lifetime is not None:
                ttl = min(ttl, lifetime)
        token = self.sealer.seal(grants, max(ttl, MIN_TTL))
        return Issued(
            self.sealer.encode(token), token.expires_at - token.issued_at, token.issued_at
        )

    def credentials_for(self, client: ClientHeaders, registry: str) -> ClientHeaders:
        """The client's headers with a proxy token replaced by its grant for this registry.

        An expired, altered or foreign proxy token counts as anonymous; any other
        Authorization is left as the client sent it (§4).
        """
        if not is_proxy_token(client.authorization):
            return client
        token = self.sealer.open_header(client.authorization)
        grant = token.grant_for(registry) if token is not None else Grant(Scheme.NONE)
        return replace(client, authorization=grant.authorization())

    # -- per upstream --------------------------------------------------------------------

    def _grant(
        self, registry: str, scopes: list[RepositoryScope], creds: Credentials | None
    ) -> tuple[Grant, int | None]:
        self.upstream.check_allowed(registry)
        if not self.upstream.may_send_credentials(registry):
            creds = None  # §15: not to its /v2/, not to its realm; the grant is anonymous
        if creds is None and self.upstream.configured_credentials(registry) is not None:
            # An anonymous client of a registry UPSTREAM_AUTH_FILE covers: the grant stays
            # empty, so its registry requests carry nothing and the cache's own credentials
            # are used there (transparent mode only), never sealed into a client's token.
            return Grant(Scheme.NONE), None
        try:
            challenge = self.challenges.get(registry)
            if challenge.scheme == Scheme.BEARER:
                return self._bearer(registry, challenge.realm, challenge.service, scopes, creds)
            if challenge.scheme == Scheme.BASIC and creds is not None:
                self._check_basic(registry, creds)
                return Grant(Scheme.BASIC, creds.basic()), None
        except UpstreamUnavailable as exc:
            if self.config.proxy_mode != TRANSPARENT:
                raise
            log.warning("%s; issuing an anonymous proxy token", exc.message)
        return Grant(Scheme.NONE), None

    def _bearer(
        self,
        registry: str,
        realm: str,
        service: str,
        scopes: list[RepositoryScope],
        creds: Credentials | None,
    ) -> tuple[Grant, int | None]:
        params = [("service", service)] if service else []
        params += [("scope", scope.upstream_scope) for scope in scopes]
        basic = creds.basic() if creds is not None else None
        try:
            token = self.upstream.fetch_token(registry, realm, params, basic=basic)
        except TokenRefused:
            if creds is not None:
                raise Unauthorized(f"{registry} rejected the credentials") from None
            return Grant(Scheme.NONE), None
        return Grant(Scheme.BEARER, token.value), int(token.expires_in)

    def _check_basic(self, registry: str, creds: Credentials) -> None:
        """One upstream request with the credentials; a rejection is the client's 401."""
        client = ClientHeaders(authorization=f"Basic {creds.basic()}")
        response = self.upstream.send("GET", registry, "/v2/", client, token_dance=False)
        response.close()
        if response.status_code in (401, 403):
            raise Unauthorized(f"{registry} rejected the credentials")
        if response.status_code != 200:
            raise UpstreamUnavailable(registry, f"/v2/ answered {response.status_code}")
