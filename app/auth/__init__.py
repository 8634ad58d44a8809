"""Authentication in one place: the token proxy of §12 and what it is built from.

No Flask here. `scopes` parses token requests (pure), `challenge` learns what each upstream
asks for, `realm` is the proxy's own side (public URL, token realm, the challenges it sends),
`tokens` seals grants into proxy tokens, and `proxy.TokenProxy` issues and redeems them;
tokens themselves come from `Upstream.fetch_token`, the one upstream token fetch.
"""

from __future__ import annotations

from enum import StrEnum


class Scheme(StrEnum):
    """An auth scheme: what an upstream's /v2/ asks for, and what a grant carries."""

    BEARER = "bearer"
    BASIC = "basic"
    NONE = "none"
