"""End-to-end test harness: real registries, a token server, test images and skopeo."""

from __future__ import annotations

from .hosts import HostsError, ensure_alias
from .images import (
    Blob,
    BuiltImage,
    PlatformImage,
    SkopeoError,
    build_image,
    dir_digests,
    file_digest,
    push,
    sha256_digest,
    skopeo_pull,
    verify_pulled,
)
from .names import ALIAS, ALIAS_IP, PASSWORD, USER
from .ports import free_port
from .registry import AccessLogEntry, Registry, RegistryError, make_htpasswd, parse_access_log
from .tokenserver import TokenRequest, TokenServer

__all__ = [
    "ALIAS",
    "ALIAS_IP",
    "PASSWORD",
    "USER",
    "AccessLogEntry",
    "Blob",
    "BuiltImage",
    "HostsError",
    "PlatformImage",
    "Registry",
    "RegistryError",
    "SkopeoError",
    "TokenRequest",
    "TokenServer",
    "build_image",
    "dir_digests",
    "ensure_alias",
    "file_digest",
    "free_port",
    "make_htpasswd",
    "parse_access_log",
    "push",
    "sha256_digest",
    "skopeo_pull",
    "verify_pulled",
]
