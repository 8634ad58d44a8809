"""Talking to upstream registries: URLs, header forwarding, token exchange, timeouts, SSRF guard."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

import requests
from urllib3.exceptions import HTTPError

from app import metrics
from app.config import TRANSPARENT, Config
from app.errors import Denied, UpstreamUnavailable
from app.netguard import BlockedAddress, Guard, GuardedAdapter, matches_allowlist
from app.oci import api_host

CHUNK_SIZE = 1024 * 1024
MAX_CACHED_TOKENS = 1024
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


@dataclass(frozen=True)
class ClientHeaders:
    """The request headers of the client that matter upstream."""

    authorization: str | None = None
    accept: tuple[str, ...] = ()
    range: str | None = None
    if_range: str | None = None
    user_agent: str | None = None


@dataclass
class _Token:
    value: str
    expires_at: float


@dataclass
class TokenCache:
    """Anonymous Bearer tokens per (registry, scope), dropped shortly before they expire.

    Bounded (§15): at most max_entries tokens; expired ones go first, then the oldest.
    """

    margin: float = 10.0
    max_entries: int = MAX_CACHED_TOKENS
    _tokens: dict[tuple[str, str], _Token] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, registry: str, scope: str) -> str | None:
        """A still-valid token, or None."""
        with self._lock:
            token = self._tokens.get((registry, scope))
            if token is None or token.expires_at <= time.monotonic():
                self._tokens.pop((registry, scope), None)
                return None
            return token.value

    def put(self, registry: str, scope: str, value: str, expires_in: float) -> None:
        """Remember a token for its lifetime less the safety margin."""
        lifetime = max(0.0, expires_in - min(self.margin, expires_in / 2))
        now = time.monotonic()
        with self._lock:
            self._tokens.pop((registry, scope), None)
            if len(self._tokens) >= self.max_entries:
                for key in [k for k, t in self._tokens.items() if t.expires_at <= now]:
                    del self._tokens[key]
            while len(self._tokens) >= self.max_entries:
                del self._tokens[next(iter(self._tokens))]  # the oldest
            self._tokens[(registry, scope)] = _Token(value, now + lifetime)

    def __len__(self) -> int:
        return len(self._tokens)

    def drop(self, registry: str, scope: str) -> None:
        """Forget a token upstream rejected."""
        with self._lock:
            self._tokens.pop((registry, scope), None)


def parse_bearer_challenge(header: str | None) -> dict[str, str] | None:
    """The parameters of a Bearer WWW-Authenticate challenge, or None for other schemes."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return params if params.get("realm") else None


def raw_chunks(response: requests.Response, size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Whatever has arrived, up to size bytes at a time: slow upstreams stream without delay."""
    buffered = response._content  # bytes once something has read .content (a kept 401)
    if isinstance(buffered, bytes):
        if buffered:
            yield buffered
        return
    raw = response.raw
    while True:
        chunk = raw.read1(size, decode_content=False)
        if not chunk:
            return
        yield chunk


MAX_ERROR_BODY = 64 * 1024
MAX_TOKEN_BODY = 1024 * 1024


class TooLarge(Exception):
    """An upstream body went past its cap (counted in bytes read, not Content-Length)."""


class TokenRefused(UpstreamUnavailable):
    """A token realm answered 401 or 403: the credentials sent (or none) are not enough."""


@dataclass(frozen=True)
class RealmToken:
    """A token a registry's realm issued, and its lifetime in seconds."""

    value: str
    expires_in: float


def read_limited(response: requests.Response, limit: int) -> bytes:
    """The whole body, or TooLarge as soon as more than limit bytes arrive (§15 bounded work)."""
    parts: list[bytes] = []
    size = 0
    for chunk in raw_chunks(response, min(limit + 1, CHUNK_SIZE)):
        size += len(chunk)
        if size > limit:
            response.close()
            raise TooLarge(f"more than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def keep_error_body(response: requests.Response, registry: str) -> None:
    """Read an error answer into memory, capped at MAX_ERROR_BODY: beyond it, a clean 502."""
    try:
        body = read_limited(response, MAX_ERROR_BODY)
    except TooLarge:
        raise UpstreamUnavailable(
            registry, f"{response.status_code} answer larger than {MAX_ERROR_BODY} bytes"
        ) from None
    except Exception as exc:  # reset or timed out mid-body
        response.close()
        raise UpstreamUnavailable(registry, f"body failed: {type(exc).__name__}") from None
    response._content = body
    response._content_consumed = True


def iter_body(response: requests.Response, registry: str) -> Iterator[bytes]:
    """The raw body as upstream sent it, releasing the connection at the end.

    The first chunk is read before returning, so an upstream that fails before any
    body byte becomes a clean 502 instead of a broken response.
    """
    chunks = raw_chunks(response)
    try:
        first = next(chunks, b"")
    except Exception as exc:
        response.close()
        raise UpstreamUnavailable(registry, f"body failed: {type(exc).__name__}") from None

    def body() -> Iterator[bytes]:
        try:
            if first:
                yield first
            yield from chunks
        finally:
            response.close()

    return body()


class Upstream:
    """One pooled session per worker; every call goes through the allowlist and the SSRF guard."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.tokens = TokenCache()
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.max_redirects = 5
        self.session.headers["Accept-Encoding"] = "identity"
        guard = Guard.from_lists(config.allowed_registries, config.insecure_registries)
        adapter = GuardedAdapter(guard, pool_connections=16, pool_maxsize=64, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.timeout = (config.upstream_connect_timeout, config.upstream_read_timeout)

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
        params: Mapping[str, str] | list[tuple[str, str]] | None = None,
        forward_range: bool = False,
        follow_redirects: bool = False,
        token_dance: bool = True,
    ) -> requests.Response:
        """Send one request upstream, with the anonymous token dance and the transparent retry.

        A client Authorization for a registry outside CREDENTIAL_REGISTRIES is dropped here,
        the one door every registry request goes through: that registry is asked anonymously.
        """
        self.check_allowed(registry)
        if client.authorization is not None and not self.may_send_credentials(registry):
            client = replace(client, authorization=None)
        headers = self._forward_headers(client, forward_range)
        default_scope = f"repository:{name}:pull" if name else ""
        used_cached = False
        if client.authorization is None and default_scope:
            cached = self.tokens.get(registry, default_scope)
            if cached:
                headers["Authorization"] = f"Bearer {cached}"
                used_cached = True
        url = self.url(registry, path)
        response = self._request(method, registry, url, headers, params, follow_redirects)
        if response.status_code != 401:
            return response
        challenge = parse_bearer_challenge(response.headers.get("WWW-Authenticate"))
        retry_anonymously = client.authorization is None or self.config.proxy_mode == TRANSPARENT
        if challenge is None or not retry_anonymously or not token_dance:
            return response
        scope = challenge.get("scope", default_scope)
        if used_cached:
            self.tokens.drop(registry, default_scope)
        token = self.anonymous_token(registry, challenge, scope)
        if token is None:
            return response
        keep_error_body(response, registry)  # the original 401, to forward if the retry fails
        retry_headers = dict(headers, Authorization=f"Bearer {token}")
        retry = self._request(method, registry, url, retry_headers, params, follow_redirects)
        if retry.status_code == 401:
            retry.close()
            return response
        response.close()
        return retry

    def anonymous_token(
        self, registry: str, challenge: Mapping[str, str], scope: str
    ) -> str | None:
        """Fetch (or reuse) an anonymous token from the challenge's realm; None on any failure."""
        if scope:
            cached = self.tokens.get(registry, scope)
            if cached:
                return cached
        params = [(k, v) for k, v in (("service", challenge.get("service")), ("scope", scope)) if v]
        try:
            token = self.fetch_token(registry, challenge["realm"], params)
        except UpstreamUnavailable:  # TokenRefused too
            return None
        if scope:
            self.tokens.put(registry, scope, token.value, token.expires_in)
        return token.value

    def fetch_token(
        self, registry: str, realm: str, params: list[tuple[str, str]], basic: str | None = None
    ) -> RealmToken:
        """One token from a registry's realm, with Basic credentials when given.

        The one upstream token fetch, for the anonymous dance and the token proxy alike: SSRF
        guarded (Denied), body capped at MAX_TOKEN_BODY, counted in the upstream metrics.
        Raises TokenRefused for a 401/403 and UpstreamUnavailable for any other failure.
        """
        headers = {"Authorization": f"Basic {basic}"} if basic is not None else {}
        started = time.monotonic()
        try:
            reply = self.session.get(
                realm,
                params=params,
                headers=headers,
                timeout=self.timeout,
                allow_redirects=False,
                stream=True,
            )
        except BlockedAddress as exc:
            raise Denied(f"token realm of {registry} refused: {exc}") from None
        except (requests.RequestException, HTTPError, OSError, ValueError):
            metrics.upstream_answered(registry, "error", time.monotonic() - started)
            raise UpstreamUnavailable(registry, "token realm unreachable") from None
        metrics.upstream_answered(registry, reply.status_code, time.monotonic() - started)
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
        params: Mapping[str, str] | list[tuple[str, str]] | None,
        follow_redirects: bool,
    ) -> requests.Response:
        started = time.monotonic()
        try:
            response = self.session.request(
                method,
                url,
                headers=headers,
                params=params,
                stream=True,
                timeout=self.timeout,
                allow_redirects=follow_redirects,
            )
        except BlockedAddress as exc:
            raise Denied(f"upstream {registry} refused: {exc}") from None
        except requests.RequestException as exc:
            metrics.upstream_answered(registry, "error", time.monotonic() - started)
            raise UpstreamUnavailable(registry, _describe(exc)) from None
        metrics.upstream_answered(registry, response.status_code, time.monotonic() - started)
        return response


def _describe(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.TooManyRedirects):
        return "too many redirects"
    return "connection failed"
