"""Pure parsing of registry requests: names, references, addressing forms, media types.

No I/O happens here; every value that later reaches a storage key or an upstream
URL has passed through one of these validators first.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from app.errors import DigestInvalid, NameInvalid, NotFoundError, TagInvalid

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_Q_ZERO_RE = re.compile(r"0(?:\.0{0,3})?")  # RFC 9110 §12.4.2 spellings of q=0
_KEYWORDS = ("manifests", "blobs", "referrers", "tags")
_MAX_NAME = 255

MANIFEST, BLOB, REFERRERS, TAGS = "manifest", "blob", "referrers", "tags"


@dataclass(frozen=True)
class Target:
    """One registry resource: which upstream, which repository, which object."""

    registry: str  # canonical host[:port], lower-case; "docker.io" for Docker Hub
    name: str  # upstream-side repository name (library/ added for Docker Hub)
    kind: str  # MANIFEST, BLOB, REFERRERS or TAGS
    reference: str  # tag or digest; "list" for TAGS
    client_name: str = ""  # the repository name as the client wrote it

    @property
    def is_digest(self) -> bool:
        """Content-addressed references are immutable and always cacheable."""
        return is_digest(self.reference)


def is_digest(value: str) -> bool:
    """True for a well-formed sha256/sha512 digest."""
    return _DIGEST_RE.fullmatch(value) is not None


def is_valid_tag(value: str) -> bool:
    """True for a tag the distribution grammar accepts."""
    return _TAG_RE.fullmatch(value) is not None


def is_valid_name(value: str) -> bool:
    """True for a repository name the distribution grammar accepts."""
    return len(value) <= _MAX_NAME and _NAME_RE.fullmatch(value) is not None


def looks_like_host(segment: str) -> bool:
    """Docker's rule for telling a registry host from a Docker Hub namespace."""
    return "." in segment or ":" in segment or segment == "localhost"


def split_hostport(value: str) -> tuple[str, int | None]:
    """Split host[:port]; IPv6 literals come back without brackets, and never with a zone id."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"unclosed IPv6 bracket in {value!r}")
        host, rest = value[1:end], value[end + 1 :]
        if "%" in host:
            # A zone id names a local interface (link-local reach) and may carry '@' or spaces.
            raise ValueError(f"IPv6 zone identifiers are not allowed in {value!r}")
        if rest and not rest.startswith(":"):
            raise ValueError(f"junk after IPv6 literal in {value!r}")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text = value.partition(":")
        port_text = port_text if sep else None
    port = None
    if port_text is not None:
        # ASCII digits only: str.isdigit() and int() also take Unicode digits (§15 Input).
        if _PORT_RE.fullmatch(port_text) is None or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad port in {value!r}")
        port = int(port_text)
    return host, port


def normalize_registry(value: str) -> str:
    """Validate host[:port] and return its canonical spelling (Docker Hub aliases folded)."""
    try:
        host, port = split_hostport(value)
    except ValueError as exc:
        raise NameInvalid(f"invalid registry {value!r}: {exc}") from None
    if not host:
        raise NameInvalid(f"invalid registry {value!r}: empty host")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if "%" in host:
        raise NameInvalid(f"invalid registry {value!r}: IPv6 zone identifiers are not allowed")
    if ip is not None and ip.version == 6:
        if not value.startswith("["):
            raise NameInvalid(f"invalid registry {value!r}: IPv6 literals need brackets")
        host_text = f"[{ip.compressed}]"
    elif ip is not None:
        host_text = str(ip)
    else:
        labels = host.split(".")
        if len(host) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
            raise NameInvalid(f"invalid registry {value!r}: not a DNS name or IP address")
        host_text = host.lower()
    canonical = host_text if port is None else f"{host_text}:{port}"
    return DOCKER_HUB if canonical in _HUB_ALIASES else canonical


def api_host(registry: str) -> str:
    """The host[:port] that serves the registry API (Docker Hub's differs from its name)."""
    return DOCKER_HUB_API if registry == DOCKER_HUB else registry


def upstream_name(registry: str, name: str) -> str:
    """The repository name as upstream knows it: Docker Hub puts official images in library/."""
    if registry == DOCKER_HUB and "/" not in name:
        return f"library/{name}"
    return name


def _endpoint(segments: list[str]) -> tuple[int, str, str]:
    """Split off the endpoint: the keyword is the second-to-last segment, the reference the last."""
    if len(segments) < 3 or segments[-2] not in _KEYWORDS:
        raise NotFoundError("unknown registry endpoint")
    keyword, ref = segments[-2], segments[-1]
    index = len(segments) - 2
    if keyword == "tags":
        if ref != "list":
            raise NotFoundError("unknown registry endpoint")
        return index, TAGS, ref
    if is_digest(ref) or (keyword == "manifests" and is_valid_tag(ref)):
        kind = {"manifests": MANIFEST, "blobs": BLOB, "referrers": REFERRERS}[keyword]
        return index, kind, ref
    if keyword in ("blobs", "referrers") or ":" in ref:
        raise DigestInvalid(f"invalid digest {ref!r}")
    raise TagInvalid(f"invalid tag {ref!r}")


def resolve_repository(
    client_name: str, *, ns: str | None, default_registry: str
) -> tuple[str, str]:
    """The §2 rules for a client-side name: (registry, upstream-side name), in the order
    ?ns=, path-encoded, host-less."""
    segments = client_name.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise NameInvalid("empty, '.' or '..' path segments are not allowed")
    if ns:
        registry = normalize_registry(ns)
        # containerd adds ?ns= even to a path-encoded mirror (override_path = true):
        # a first segment naming that same registry is the path-encoded prefix.
        if len(segments) > 1 and looks_like_host(segments[0]):
            try:
                same = normalize_registry(segments[0]) == registry
            except NameInvalid:
                same = False
            if same:
                segments = segments[1:]
    elif looks_like_host(segments[0]):
        registry = normalize_registry(segments[0])
        segments = segments[1:]
    else:
        registry = default_registry
    name = "/".join(segments)
    if not name or not is_valid_name(name):
        raise NameInvalid(f"invalid repository name {name!r}")
    return registry, upstream_name(registry, name)


def parse_target(path: str, *, ns: str | None, default_registry: str) -> Target:
    """Resolve the path after /v2/ to a Target; names are validated before any I/O."""
    segments = path.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise NameInvalid("empty, '.' or '..' path segments are not allowed")
    index, kind, reference = _endpoint(segments)
    client_name = "/".join(segments[:index])
    registry, name = resolve_repository(client_name, ns=ns, default_registry=default_registry)
    return Target(registry, name, kind, reference, client_name)


def _media_ranges(accept_values: list[str]) -> list[tuple[str, bool]]:
    """(media range, acceptable) pairs; q=0 marks a range the client refuses."""
    ranges = []
    for header in accept_values:
        for item in header.split(","):
            media, _, params = item.partition(";")
            media = media.strip().lower()
            if not media:
                continue
            refused = False
            for param in params.split(";"):
                key, _, value = param.partition("=")
                if key.strip(" \t").lower() == "q":
                    # ASCII qvalue grammar only: float() also takes Unicode zeros, "_", "-0".
                    refused = _Q_ZERO_RE.fullmatch(value.strip(" \t")) is not None
            ranges.append((media, not refused))
    return ranges


def accepts(accept_values: list[str], media_type: str) -> bool:
    """Whether a stored manifest's media type satisfies the request's Accept headers.

    No Accept header means anything; the most specific matching range decides (RFC 9110).
    """
    ranges = _media_ranges(accept_values)
    if not ranges:
        return True
    media_type = media_type.split(";")[0].strip().lower()
    main = media_type.split("/")[0]
    for candidate in (media_type, f"{main}/*", "*/*"):
        verdicts = [ok for media, ok in ranges if media == candidate]
        if verdicts:
            return all(verdicts)
    return False
