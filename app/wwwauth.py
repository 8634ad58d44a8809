"""WWW-Authenticate parsing (RFC 9110 §11.6.1): every header, every challenge in each one.

requests folds repeated headers into one string joined by ", ", and a registry may also offer
several challenges in one header (`Bearer realm="…", Basic realm="…"`): a regex that looks
for `realm=` anywhere takes the wrong one. This tokenizer keeps each challenge apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import requests

Challenge = tuple[str, dict[str, str]]  # (scheme in lower case, parameters by lower-case name)

_TOKEN = re.compile(r"\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)")
_EQUALS = re.compile(r"\s*=\s*")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_TOKEN68 = re.compile(r"\s*([A-Za-z0-9._~+/-]+=*)\s*(?:,|$)")
_UNESCAPE = re.compile(r"\\(.)")


def parse_header(value: str) -> list[Challenge]:
    """The challenges of one WWW-Authenticate value; junk ends the parse, never raises."""
    challenges: list[Challenge] = []
    pos, size = 0, len(value)
    while pos < size:
        while pos < size and value[pos] in " \t,":
            pos += 1
        scheme = _TOKEN.match(value, pos)
        if scheme is None:
            break
        params: dict[str, str] = {}
        challenges.append((scheme.group(1).lower(), params))
        pos = scheme.end()
        token68 = _TOKEN68.match(value, pos)
        if token68 is not None and not _EQUALS.match(value, token68.start(1)):
            pos = token68.end()  # `Negotiate abc==`: a token68, no parameters
            continue
        while pos < size:
            while pos < size and value[pos] in " \t,":
                pos += 1
            name = _TOKEN.match(value, pos)
            if name is None:
                return challenges
            equals = _EQUALS.match(value, name.end())
            if equals is None:
                break  # a token without "=": the next challenge's scheme
            quoted = _QUOTED.match(value, equals.end())
            if quoted is not None:
                params[name.group(1).lower()] = _UNESCAPE.sub(r"\1", quoted.group(1))
                pos = quoted.end()
                continue
            bare = _TOKEN.match(value, equals.end())
            if bare is None:
                return challenges
            params[name.group(1).lower()] = bare.group(1)
            pos = bare.end()
    return challenges


def parse_all(values: Iterable[str]) -> list[Challenge]:
    """The challenges of several WWW-Authenticate headers, in order."""
    return [challenge for value in values for challenge in parse_header(value)]


def header_values(response: requests.Response) -> list[str]:
    """Each WWW-Authenticate header as sent, not requests' comma-joined fold of them."""
    raw = getattr(response.raw, "headers", None)
    getlist = getattr(raw, "getlist", None)
    if getlist is not None:
        values = [str(v) for v in getlist("WWW-Authenticate")]
        if values:
            return values
    folded = response.headers.get("WWW-Authenticate")
    return [folded] if folded else []


def bearer(challenges: list[Challenge]) -> dict[str, str] | None:
    """The first Bearer challenge that names a realm, or None."""
    for scheme, params in challenges:
        if scheme == "bearer" and params.get("realm"):
            return params
    return None


def offers_basic(challenges: list[Challenge]) -> bool:
    """Whether any challenge is Basic."""
    return any(scheme == "basic" for scheme, _ in challenges)
