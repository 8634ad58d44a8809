"""UPSTREAM_AUTH_FILE: the cache's own upstream credentials, in Docker's config.json format.

`{"auths": {"registry-1.docker.io": {"auth": "<base64 user:pass>"}}}`, or `username` and
`password`, or `identitytoken` (an OAuth2 refresh token). Keys are registries as clients
write them (`docker.io`, `index.docker.io`, `https://index.docker.io/v1/` all mean Docker
Hub). Used only in transparent mode, only for requests that carry no client credentials
(app/upstream.py decides). The file is re-read when its mtime, size or inode changes, which
is what a Kubernetes Secret update (a swapped symlink) looks like; a file that no longer
parses keeps nothing (no credentials are sent) and logs a warning.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from app.errors import RegistryError
from app.oci import normalize_registry

log = logging.getLogger("oci_pull_through.upstreamauth")
MAX_FILE = 1024 * 1024


@dataclass(frozen=True)
class UpstreamCredentials:
    """One registry's configured credentials: user and password, or an identity token."""

    username: str = ""
    password: str = ""
    identity_token: str = ""

    def basic(self) -> str:
        """The Basic Authorization value (without the scheme)."""
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")

    @property
    def fingerprint(self) -> str:
        """Tells tokens obtained with different credentials apart, revealing nothing."""
        material = f"{self.username}\0{self.password}\0{self.identity_token}".encode()
        return hashlib.sha256(material).hexdigest()[:16]


def registry_key(key: str) -> str:
    """An auths key as the cache names registries: no scheme or path, Docker Hub folded."""
    text = key.strip()
    if "://" in text:
        text = urlsplit(text).netloc
    text = text.split("/", 1)[0]
    if text.lower() in ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"):
        text = "docker.io"
    return normalize_registry(text.lower())


def _entry(registry: str, value: object) -> UpstreamCredentials:
    if not isinstance(value, dict):
        raise ValueError(f"auths entry {registry!r} is not an object")
    token = value.get("identitytoken") or ""
    user, password = value.get("username") or "", value.get("password") or ""
    if value.get("auth"):
        try:
            decoded = base64.b64decode(str(value["auth"]), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise ValueError(f"auths entry {registry!r}: auth is not base64") from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise ValueError(f"auths entry {registry!r}: auth is not user:password")
    if not all(isinstance(v, str) for v in (token, user, password)):
        raise ValueError(f"auths entry {registry!r}: values must be strings")
    if not token and not user:
        raise ValueError(f"auths entry {registry!r} has no auth, username or identitytoken")
    return UpstreamCredentials(user, password, token)


def parse(text: bytes) -> dict[str, UpstreamCredentials]:
    """Credentials by registry; ValueError says what is wrong (never echoing a secret)."""
    try:
        document = json.loads(text)
    except ValueError:
        raise ValueError("not JSON") from None
    auths = document.get("auths") if isinstance(document, dict) else None
    if not isinstance(auths, dict):
        raise ValueError('no "auths" object')
    found: dict[str, UpstreamCredentials] = {}
    for key, value in auths.items():
        try:
            registry = registry_key(str(key))
        except RegistryError:
            raise ValueError(f"auths key {key!r} is not a registry") from None
        found[registry] = _entry(registry, value)
    return found


def load(path: str) -> dict[str, UpstreamCredentials]:
    """Read and parse the file (capped at 1 MiB); OSError or ValueError on failure."""
    with open(path, "rb") as fh:
        text = fh.read(MAX_FILE + 1)
    if len(text) > MAX_FILE:
        raise ValueError(f"larger than {MAX_FILE} bytes")
    return parse(text)


class AuthFile:
    """The credentials file, re-read when it changes (one stat per lookup: cheap)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._known: dict[str, UpstreamCredentials] = {}

    def get(self, registry: str) -> UpstreamCredentials | None:
        """This registry's credentials as the file says now, or None."""
        try:
            st = os.stat(self.path)  # follows the symlink a Secret update swaps
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                self._known = self._reload()
            return self._known.get(registry)

    def _reload(self) -> dict[str, UpstreamCredentials]:
        try:
            known = load(self.path)
        except (OSError, ValueError) as exc:
            log.warning("UPSTREAM_AUTH_FILE %s unusable, no credentials sent: %s", self.path, exc)
            return {}
        log.info("UPSTREAM_AUTH_FILE %s read: credentials for %d registries", self.path, len(known))
        return known
