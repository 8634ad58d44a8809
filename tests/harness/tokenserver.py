"""A small Docker registry token server (ES256 JWTs with an x5c header) for tests."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import fnmatch
import json
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from .ports import free_port

#: Actions a repository scope can carry.
ALL_ACTIONS = ("pull", "push", "delete")


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server received, for assertions."""

    method: str
    path: str
    query: dict[str, list[str]]
    user: str | None
    status: int
    granted: tuple[dict[str, Any], ...] = field(default=())

    @property
    def scopes(self) -> list[str]:
        """Return every requested scope (``scope`` params may hold several, space-separated)."""
        return [s for value in self.query.get("scope", []) for s in value.split()]


def b64url(data: bytes) -> str:
    """Encode bytes as unpadded base64url, as JWTs want."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode_jwt_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (header, claims) of a JWT without checking its signature."""
    header, claims, _sig = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(claims))


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """Split ``type:name:action,action`` into parts; None if malformed."""
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not name:
        return None
    return kind, name, [a for a in actions.split(",") if a]


class TokenServer:
    """Threaded HTTP token server implementing the Docker token auth spec subset tests need."""

    def __init__(
        self,
        workdir: Path,
        *,
        users: Mapping[str, str] | None = None,
        acl: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
        anonymous_pull: Iterable[str] = (),
        service: str = "test-registry",
        issuer: str = "test-token-issuer",
        host: str = "127.0.0.1",
        port: int | None = None,
        expires_in: int = 300,
    ) -> None:
        """Configure users (name->password), acl (user->{repo glob: actions}) and public repos."""
        self.workdir = Path(workdir)
        self.users: dict[str, str] = dict(users or {})
        self.acl: dict[str, dict[str, list[str]]] = {
            user: {repo: list(actions) for repo, actions in rules.items()}
            for user, rules in (acl or {}).items()
        }
        self.anonymous_pull: list[str] = list(anonymous_pull)
        self.service = service
        self.issuer = issuer
        self.host = host
        self.port = port or 0
        self.expires_in = expires_in
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._cert = self._make_cert()
        self.cert_pem: bytes = self._cert.public_bytes(serialization.Encoding.PEM)
        self.cert_path = self.workdir / "token-cert.pem"
        self._x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> TokenServer:
        """Write the certificate bundle and start serving on a background thread."""
        if self._server is not None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cert_path.write_bytes(self.cert_pem)
        if not self.port:
            self.port = free_port(self.host)
        server = ThreadingHTTPServer((self.host, self.port), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"tokenserver-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> TokenServer:
        """Start on entering a ``with`` block."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop on leaving a ``with`` block."""
        self.stop()

    # -- public info -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:PORT."""
        return f"http://{self.host}:{self.port}"

    @property
    def realm(self) -> str:
        """The token endpoint URL to configure as the registry's realm."""
        return f"{self.url}/token"

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The key tokens are signed with (for tests that verify signatures)."""
        return self._key.public_key()

    def clear_requests(self) -> None:
        """Forget recorded requests."""
        with self._lock:
            self.requests.clear()

    def recorded(self) -> list[TokenRequest]:
        """Return a snapshot of the recorded requests."""
        with self._lock:
            return list(self.requests)

    # -- policy ------------------------------------------------------------------------------

    def allowed_actions(self, user: str | None, repo: str) -> set[str]:
        """Return the actions ``user`` (None = anonymous) may perform on ``repo``."""
        allowed: set[str] = set()
        if any(fnmatch.fnmatchcase(repo, pat) for pat in self.anonymous_pull):
            allowed.add("pull")
        if user is not None:
            for pattern, actions in self.acl.get(user, {}).items():
                if fnmatch.fnmatchcase(repo, pattern):
                    allowed.update(ALL_ACTIONS if "*" in actions else actions)
        return allowed

    def grant(self, user: str | None, scopes: Iterable[str]) -> list[dict[str, Any]]:
        """Return the access claim entries granted for the requested scopes."""
        access: list[dict[str, Any]] = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            kind, name, requested = parsed
            if kind != "repository":
                continue
            allowed = self.allowed_actions(user, name)
            wanted = set(ALL_ACTIONS) if "*" in requested else set(requested)
            actions = sorted(wanted & allowed)
            access.append({"type": "repository", "name": name, "actions": actions})
        return access

    def issue(self, user: str | None, access: list[dict[str, Any]], service: str | None) -> str:
        """Return a signed ES256 JWT for ``user`` with the given access claim."""
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": service or self.service,  # distribution 2.8 needs a string, not a list
            "exp": now + self.expires_in,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        signing_input = (
            b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        der = self._key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # JOSE wants r||s, not DER
        return f"{signing_input}.{b64url(raw)}"

    # -- internals ---------------------------------------------------------------------------

    def _make_cert(self) -> x509.Certificate:
        """Create a self-signed certificate for the signing key."""
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    def _record(self, req: TokenRequest) -> None:
        """Append a request record."""
        with self._lock:
            self.requests.append(req)

    def _authenticate(self, authorization: str | None) -> tuple[bool, str | None]:
        """Return (ok, user) for an Authorization header; no header means anonymous."""
        if not authorization:
            return True, None
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, sep, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False, None
        if not sep:
            return False, user
        ok = user in self.users and secrets.compare_digest(self.users[user], password)
        return ok, user

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        """Serve one GET or POST /token request."""
        parts = urlsplit(handler.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        authorization = handler.headers.get("Authorization")
        if method == "POST":
            length = int(handler.headers.get("Content-Length") or 0)
            form = parse_qs(handler.rfile.read(length).decode(), keep_blank_values=True)
            for key, values in form.items():
                query.setdefault(key, []).extend(values)
            if form.get("grant_type") == ["password"] and "username" in form:
                creds = f"{form['username'][0]}:{form.get('password', [''])[0]}"
                authorization = "Basic " + base64.b64encode(creds.encode()).decode()
        if parts.path != "/token":
            self._record(TokenRequest(method, parts.path, query, None, 404))
            _send_json(handler, 404, {"errors": [{"code": "NOT_FOUND"}]})
            return
        ok, user = self._authenticate(authorization)
        if not ok:
            self._record(TokenRequest(method, parts.path, query, user, 401))
            _send_json(
                handler,
                401,
                {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                {"WWW-Authenticate": 'Basic realm="token"'},
            )
            return
        scopes = [s for value in query.get("scope", []) for s in value.split()]
        access = self.grant(user, scopes)
        service = (query.get("service") or [None])[0]
        token = self.issue(user, access, service)
        self._record(TokenRequest(method, parts.path, query, user, 200, tuple(access)))
        body = {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
        }
        _send_json(handler, 200, body)


def _send_json(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: dict[str, Any],
    headers: Mapping[str, str] | None = None,
) -> None:
    """Write a JSON response."""
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(data)


def _make_handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    """Build a request handler class bound to ``server``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            """Handle GET /token."""
            server._handle(self, "GET")

        def do_POST(self) -> None:  # noqa: N802 - http.server naming
            """Handle POST /token (OAuth2 password grant)."""
            server._handle(self, "POST")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            """Stay quiet; requests are recorded on the server object."""

    return Handler
