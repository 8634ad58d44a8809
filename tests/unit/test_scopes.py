"""app/auth/scopes.py: scopes written with client-side names resolve like /v2/ paths (SPEC §2)."""

from __future__ import annotations

import pytest

from app.auth.scopes import (
    RepositoryScope,
    by_registry,
    parse_scopes,
    resolve_scope_name,
    split_scope,
)
from app.errors import NameInvalid, TooManyScopes


def test_split_scope_keeps_host_port_in_the_name() -> None:
    assert split_scope("repository:127.0.0.1:5000/org/app:pull,push") == (
        "repository",
        "127.0.0.1:5000/org/app",
        ["pull", "push"],
    )
    assert split_scope("repository:org/app:pull") == ("repository", "org/app", ["pull"])
    assert split_scope("garbage") is None
    assert split_scope("repository::pull") is None


@pytest.mark.parametrize(
    ("client_name", "ns", "registry", "name"),
    [
        ("ghcr.io/org/app", None, "ghcr.io", "org/app"),
        ("upstream.test/public/app", None, "upstream.test", "public/app"),
        ("localhost/app", None, "localhost", "app"),
        ("127.0.0.1:5000/org/sub/app", None, "127.0.0.1:5000", "org/sub/app"),
        ("docker.io/alpine", None, "docker.io", "library/alpine"),
        ("index.docker.io/library/alpine", None, "docker.io", "library/alpine"),
        ("alpine", None, "docker.io", "library/alpine"),
        ("org/app", None, "docker.io", "org/app"),
        ("public/app", "upstream.test", "upstream.test", "public/app"),
        ("ghcr.io/org/app", "quay.io", "quay.io", "ghcr.io/org/app"),
        ("alpine", "registry-1.docker.io", "docker.io", "library/alpine"),
    ],
)
def test_resolution_follows_the_addressing_rules(
    client_name: str, ns: str | None, registry: str, name: str
) -> None:
    resolved = resolve_scope_name(client_name, ns=ns, default_registry="docker.io")
    assert resolved == RepositoryScope(registry, name, client_name)
    assert resolved.upstream_scope == f"repository:{name}:pull"


def test_host_less_names_go_to_the_default_registry() -> None:
    resolved = resolve_scope_name("team/app", ns=None, default_registry="registry.internal:5000")
    assert (resolved.registry, resolved.name) == ("registry.internal:5000", "team/app")


@pytest.mark.parametrize(
    "client_name", ["Upper/app", "ghcr.io", "a//b", "../etc", "ghcr.io/../x", "bad host/x"]
)
def test_invalid_names_are_refused(client_name: str) -> None:
    with pytest.raises(NameInvalid):
        resolve_scope_name(client_name, ns=None, default_registry="docker.io")


def test_parse_scopes_handles_several_params_space_separated_and_other_types() -> None:
    scopes = parse_scopes(
        [
            "repository:upstream.test/public/app:pull",
            "repository:alpine:pull registry:catalog:* repository:ghcr.io/org/app:pull,push",
            "repository:upstream.test/public/app:pull",
        ],
        ns=None,
        default_registry="docker.io",
    )
    assert [(s.registry, s.name) for s in scopes] == [
        ("upstream.test", "public/app"),
        ("docker.io", "library/alpine"),
        ("ghcr.io", "org/app"),
    ]
    groups = by_registry(
        [
            *scopes,
            resolve_scope_name("upstream.test/private/app", ns=None, default_registry="docker.io"),
        ]
    )
    assert [s.name for s in groups["upstream.test"]] == ["public/app", "private/app"]


def test_ns_applies_to_every_scope() -> None:
    scopes = parse_scopes(
        ["repository:public/app:pull", "repository:private/app:pull"],
        ns="upstream.test",
        default_registry="docker.io",
    )
    assert {s.registry for s in scopes} == {"upstream.test"}


# -- §15 bounded work ------------------------------------------------------------------------------


def test_at_most_ten_scopes_counted_as_sent() -> None:
    ten = [f"repository:org/app{i}:pull" for i in range(10)]
    assert len(parse_scopes(ten, ns=None, default_registry="docker.io")) == 10
    with pytest.raises(TooManyScopes) as info:
        parse_scopes([*ten, "registry:catalog:*"], ns=None, default_registry="docker.io")
    assert info.value.status == 400 and "10 scopes" in info.value.message
    with pytest.raises(TooManyScopes):
        parse_scopes([" ".join([*ten, ten[0]])], ns=None, default_registry="docker.io")


def test_at_most_five_registries() -> None:
    five = [f"repository:r{i}.test/org/app:pull" for i in range(5)]
    scopes = parse_scopes(
        [*five, "repository:r0.test/org/other:pull"], ns=None, default_registry="x"
    )
    assert len(by_registry(scopes)) == 5
    with pytest.raises(TooManyScopes) as info:
        parse_scopes([*five, "repository:org/app:pull"], ns=None, default_registry="r5.test")
    assert info.value.code == "DENIED" and "5 registries" in info.value.message
