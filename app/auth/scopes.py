"""Token scopes as clients write them, resolved to upstream registries with the §2 rules.

Pure parsing, no I/O: `repository:upstream.test/org/app:pull` names the repository
`org/app` on `upstream.test`, exactly as `/v2/upstream.test/org/app/...` would.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from app.errors import NameInvalid, TooManyScopes
from app.oci import resolve_repository

MAX_SCOPES = 10
MAX_REGISTRIES = 5


@dataclass(frozen=True)
class RepositoryScope:
    """One requested repository: where it lives upstream and how the client named it."""

    registry: str
    name: str  # upstream-side name
    client_name: str

    @property
    def upstream_scope(self) -> str:
        """The scope to ask the upstream's token server for: pull only, ever."""
        return f"repository:{self.name}:pull"


def split_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """`type:name:actions` into its parts (the name may hold a host:port); None if malformed."""
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not name:
        return None
    return kind, name, [a for a in actions.split(",") if a]


def resolve_scope_name(
    client_name: str, *, ns: str | None, default_registry: str
) -> RepositoryScope:
    """The §2 addressing rules (app.oci) applied to the name in a scope."""
    try:
        registry, name = resolve_repository(client_name, ns=ns, default_registry=default_registry)
    except NameInvalid as error:
        raise NameInvalid(f"{error.message} in scope") from None
    return RepositoryScope(registry, name, client_name)


def parse_scopes(
    values: Iterable[str], *, ns: str | None, default_registry: str
) -> list[RepositoryScope]:
    """Every repository scope of a token request; other scope types are ignored.

    Each `scope` parameter may hold several scopes separated by spaces (OAuth2 style).
    Bounded work (§15): more than MAX_SCOPES scopes (of any type, as sent) or
    MAX_REGISTRIES distinct registries is TooManyScopes, before any upstream I/O.
    """
    items = [scope for value in values for scope in value.split()]
    if len(items) > MAX_SCOPES:
        raise TooManyScopes(f"a token request may carry at most {MAX_SCOPES} scopes")
    found: list[RepositoryScope] = []
    for value in values:
        for scope in value.split():
            parts = split_scope(scope)
            if parts is None or parts[0] != "repository":
                continue
            resolved = resolve_scope_name(parts[1], ns=ns, default_registry=default_registry)
            if resolved not in found:
                found.append(resolved)
    if len({scope.registry for scope in found}) > MAX_REGISTRIES:
        raise TooManyScopes(f"a token request may name at most {MAX_REGISTRIES} registries")
    return found


def by_registry(scopes: Iterable[RepositoryScope]) -> dict[str, list[RepositoryScope]]:
    """Scopes grouped by upstream registry, in request order."""
    groups: dict[str, list[RepositoryScope]] = {}
    for scope in scopes:
        groups.setdefault(scope.registry, []).append(scope)
    return groups
