"""app/oci.py: addressing forms, normalisation, grammar validation, Accept negotiation."""

from __future__ import annotations

import pytest

from app.errors import DigestInvalid, NameInvalid, RegistryError, TagInvalid
from app.oci import BLOB, MANIFEST, REFERRERS, TAGS, Target, accepts, parse_target

DIGEST = "sha256:" + "ab" * 32
DIGEST512 = "sha512:" + "cd" * 64


def parse(path: str, ns: str | None = None, default: str = "docker.io") -> Target:
    return parse_target(path, ns=ns, default_registry=default)


# -- the three addressing forms ---------------------------------------------------------------


def test_ns_parameter_wins_and_keeps_the_whole_path_as_name() -> None:
    target = parse("ghcr.io/org/app/manifests/v1", ns="quay.io")
    assert target.registry == "quay.io"
    assert target.name == "ghcr.io/org/app"
    assert (target.kind, target.reference) == (MANIFEST, "v1")


def test_ns_parameter_with_plain_name() -> None:
    target = parse("org/app/blobs/" + DIGEST, ns="ghcr.io")
    assert (target.registry, target.name, target.kind) == ("ghcr.io", "org/app", BLOB)


def test_path_encoded_form_with_dot() -> None:
    target = parse("ghcr.io/org/app/manifests/v1.2.3")
    assert (target.registry, target.name, target.reference) == ("ghcr.io", "org/app", "v1.2.3")
    assert target.client_name == "ghcr.io/org/app"


def test_path_encoded_form_with_port() -> None:
    target = parse("myreg:5000/team/app/manifests/latest")
    assert (target.registry, target.name) == ("myreg:5000", "team/app")


def test_path_encoded_form_localhost() -> None:
    target = parse("localhost/app/manifests/v1")
    assert (target.registry, target.name) == ("localhost", "app")


def test_host_less_form_goes_to_default_registry() -> None:
    target = parse("team/app/manifests/v1", default="registry.test:5000")
    assert (target.registry, target.name) == ("registry.test:5000", "team/app")


def test_first_segment_without_dot_or_colon_is_a_namespace() -> None:
    target = parse("myorg/app/manifests/v1", default="registry.test")
    assert (target.registry, target.name) == ("registry.test", "myorg/app")


# -- Docker Hub normalisation ----------------------------------------------------------------


@pytest.mark.parametrize("alias", ["docker.io", "index.docker.io", "registry-1.docker.io"])
def test_docker_hub_aliases_fold_to_docker_io(alias: str) -> None:
    target = parse(f"{alias}/alpine/manifests/3")
    assert (target.registry, target.name) == ("docker.io", "library/alpine")


def test_docker_hub_alias_via_ns() -> None:
    target = parse("alpine/manifests/3", ns="index.docker.io")
    assert (target.registry, target.name) == ("docker.io", "library/alpine")


def test_host_less_one_segment_name_gets_library_prefix() -> None:
    target = parse("alpine/manifests/3")
    assert (target.registry, target.name) == ("docker.io", "library/alpine")


def test_docker_hub_two_segment_name_is_unchanged() -> None:
    assert parse("docker.io/bitnami/redis/manifests/7").name == "bitnami/redis"


def test_library_prefix_only_for_docker_hub() -> None:
    assert parse("quay.io/alpine/manifests/3").name == "alpine"
    assert parse("alpine/manifests/3", default="registry.test").name == "alpine"


def test_all_forms_of_one_image_give_the_same_target() -> None:
    forms = [
        parse("alpine/manifests/3"),
        parse("library/alpine/manifests/3"),
        parse("docker.io/alpine/manifests/3"),
        parse("index.docker.io/library/alpine/manifests/3"),
        parse("registry-1.docker.io/alpine/manifests/3"),
        parse("alpine/manifests/3", ns="docker.io"),
        parse("library/alpine/manifests/3", ns="registry-1.docker.io"),
    ]
    keys = {(t.registry, t.name, t.kind, t.reference) for t in forms}
    assert keys == {("docker.io", "library/alpine", MANIFEST, "3")}


def test_registry_host_is_lower_cased() -> None:
    assert parse("GHCR.IO/org/app/manifests/v1").registry == "ghcr.io"


# -- names and endpoints -----------------------------------------------------------------------


def test_multi_segment_name() -> None:
    target = parse("ghcr.io/org/sub/image/manifests/latest")
    assert (target.registry, target.name, target.reference) == (
        "ghcr.io",
        "org/sub/image",
        "latest",
    )


def test_keyword_inside_name_uses_the_last_keyword() -> None:
    target = parse("ghcr.io/org/manifests/blobs/manifests/v1")
    assert (target.name, target.kind, target.reference) == ("org/manifests/blobs", MANIFEST, "v1")


def test_blob_by_digest() -> None:
    target = parse("ghcr.io/org/app/blobs/" + DIGEST)
    assert (target.kind, target.reference, target.is_digest) == (BLOB, DIGEST, True)


def test_manifest_by_sha512_digest() -> None:
    target = parse("ghcr.io/org/app/manifests/" + DIGEST512)
    assert target.is_digest
    assert target.reference == DIGEST512


def test_tag_is_not_a_digest() -> None:
    assert not parse("ghcr.io/org/app/manifests/v1").is_digest


def test_tags_list() -> None:
    target = parse("ghcr.io/org/app/tags/list")
    assert (target.registry, target.name, target.kind, target.reference) == (
        "ghcr.io",
        "org/app",
        TAGS,
        "list",
    )


def test_referrers() -> None:
    target = parse("ghcr.io/org/app/referrers/" + DIGEST)
    assert (target.kind, target.reference) == (REFERRERS, DIGEST)


def test_unknown_endpoint_is_a_registry_error() -> None:
    with pytest.raises(RegistryError):
        parse("ghcr.io/org/app/unknown/v1")


# -- grammar errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "ghcr.io/Org/app/manifests/v1",  # upper case
        "ghcr.io/org//app/manifests/v1",  # empty component
        "ghcr.io/org/app-/manifests/v1",  # trailing separator
        "ghcr.io/-org/app/manifests/v1",  # leading separator
        "ghcr.io/org/a..b/manifests/v1",  # double dot separator
        "ghcr.io/manifests/v1",  # no name after the registry
        "ghcr.io/org/ap p/manifests/v1",
        "ghcr.io/" + "a" * 256 + "/manifests/v1",
    ],
)
def test_invalid_names(path: str) -> None:
    with pytest.raises(NameInvalid) as info:
        parse(path)
    assert info.value.status == 400
    assert info.value.code == "NAME_INVALID"


@pytest.mark.parametrize("name", ["a__b", "a_b", "a.b", "a---b", "a-b/c0.d_e"])
def test_valid_name_separators(name: str) -> None:
    assert parse(f"registry.test/{name}/manifests/v1").name == name


@pytest.mark.parametrize("tag", [".v1", "-v1", "v" * 129, "v1+build", "v1!"])
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(TagInvalid) as info:
        parse(f"ghcr.io/org/app/manifests/{tag}")
    assert info.value.status == 400
    assert info.value.code == "TAG_INVALID"


@pytest.mark.parametrize("tag", ["_v1", "V1.2.3-rc_1", "a" * 128, "latest"])
def test_valid_tags(tag: str) -> None:
    assert parse(f"ghcr.io/org/app/manifests/{tag}").reference == tag


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:" + "ab" * 31,  # too short
        "sha256:" + "AB" * 32,  # upper case hex
        "sha256:" + "zz" * 32,
        "md5:" + "ab" * 16,
        "sha512:" + "ab" * 32,  # sha512 needs 128 hex digits
        "notadigest",
    ],
)
def test_invalid_blob_digests(digest: str) -> None:
    with pytest.raises(DigestInvalid) as info:
        parse(f"ghcr.io/org/app/blobs/{digest}")
    assert info.value.status == 400
    assert info.value.code == "DIGEST_INVALID"


def test_invalid_manifest_digest_is_digest_invalid() -> None:
    with pytest.raises(DigestInvalid):
        parse("ghcr.io/org/app/manifests/sha256:abc")


def test_invalid_referrers_digest() -> None:
    with pytest.raises(DigestInvalid):
        parse("ghcr.io/org/app/referrers/v1")


# -- registries -----------------------------------------------------------------------------------


def test_registry_with_port_via_ns() -> None:
    assert parse("app/manifests/v1", ns="registry.test:5000").registry == "registry.test:5000"


def test_ipv4_registry_with_port() -> None:
    target = parse("10.1.2.3:5000/app/manifests/v1")
    assert (target.registry, target.name) == ("10.1.2.3:5000", "app")


def test_bracketed_ipv6_registry() -> None:
    target = parse("[::1]:5000/app/manifests/v1")
    assert (target.registry, target.name) == ("[::1]:5000", "app")


def test_bracketed_ipv6_is_canonicalised() -> None:
    target = parse("app/manifests/v1", ns="[2001:DB8:0:0::1]")
    assert target.registry == "[2001:db8::1]"


@pytest.mark.parametrize(
    "ns",
    [
        "user:pw@registry.test",
        "user@registry.test",
        "registry.test/path",
        "registry.test:0",
        "registry.test:65536",
        "registry.test:port",
        "::1",  # IPv6 needs brackets
        "[::1",
        "[::1]x",
        "..",
        "reg..test",
        "-reg.test",
        "",
    ],
)
def test_invalid_registries_via_ns(ns: str) -> None:
    if ns == "":
        # An empty ns is "no ns": the host-less form applies.
        assert parse("app/manifests/v1", ns=ns, default="registry.test").registry == (
            "registry.test"
        )
        return
    with pytest.raises(NameInvalid):
        parse("app/manifests/v1", ns=ns)


@pytest.mark.parametrize(
    "path",
    [
        "user@registry.test/app/manifests/v1",
        "user:pw@registry.test/app/manifests/v1",
        "registry.test:99999/app/manifests/v1",
    ],
)
def test_invalid_path_encoded_registries(path: str) -> None:
    with pytest.raises(NameInvalid):
        parse(path)


ZONE_IDS = [
    "[fe80::1%eth0]",
    "[fe80::1%eth0]:5000",
    "[fe80::1%25eth0]",  # percent-encoded once more: still a zone id
    "[fe80::1%a@evil.test]",  # '@' inside a zone id passed validation
    "[fe80::1%a b]",  # and so did spaces
    "[fe80::1%]",
    "[::1%lo]:5000",
    "[fd00::5%1]",
]


@pytest.mark.parametrize("ns", ZONE_IDS)
def test_ipv6_zone_ids_are_refused_via_ns(ns: str) -> None:
    """Attack: a zone id picks an interface (link-local reach) and smuggles '@' or spaces."""
    with pytest.raises(NameInvalid):
        parse("app/manifests/v1", ns=ns)


@pytest.mark.parametrize("registry", ZONE_IDS)
def test_ipv6_zone_ids_are_refused_path_encoded(registry: str) -> None:
    with pytest.raises(NameInvalid):
        parse(f"{registry}/app/manifests/v1")


def test_ipv6_zone_id_in_ns_matching_the_path_prefix_is_refused() -> None:
    with pytest.raises(NameInvalid):
        parse("[fe80::1%eth0]/app/manifests/v1", ns="[fe80::1%eth0]")


@pytest.mark.parametrize(
    "ns",
    [
        "registry.test:５０００",  # fullwidth digits: int() accepts them
        "registry.test:٥٠٠٠",  # Arabic-Indic digits
        "registry.test:²",
        "[::1]:٥٠٠٠",
        "registry.test:+80",
        "registry.test: 80",
        "registry.test:1_000",
    ],
)
def test_registry_ports_are_ascii_digits_only(ns: str) -> None:
    """A port written in Unicode digits used to be accepted and canonicalised to ASCII."""
    with pytest.raises(NameInvalid):
        parse("app/manifests/v1", ns=ns)


# -- traversal (the parser sees the already percent-decoded path) ----------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "../../etc/manifests/v1",
        "ghcr.io/../../etc/manifests/v1",
        "ghcr.io/org/../../etc/manifests/v1",
        "org/../app/manifests/v1",
        "./app/manifests/v1",
        "ghcr.io/..%2f..%2fetc/manifests/v1",
        "ghcr.io/org/app/manifests/..",
        "ghcr.io/org/app/blobs/..",
        "ghcr.io/org/app/manifests/../../../x",
        "/etc/passwd/manifests/v1",
        "ghcr.io/org\\..\\x/manifests/v1",
    ],
)
def test_traversal_attempts_are_rejected(path: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse(path)
    assert info.value.status in (400, 404)


def test_dotdot_as_ns_registry_is_rejected() -> None:
    with pytest.raises(NameInvalid):
        parse("app/manifests/v1", ns="../../etc")


def test_dotdot_reference_is_a_400() -> None:
    with pytest.raises(RegistryError) as info:
        parse("ghcr.io/org/app/manifests/..")
    assert info.value.status == 400


# -- Accept negotiation ----------------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"


def test_empty_accept_means_anything() -> None:
    assert accepts([], OCI_MANIFEST)
    assert accepts([""], OCI_MANIFEST)


def test_exact_match() -> None:
    assert accepts([OCI_MANIFEST], OCI_MANIFEST)
    assert not accepts([OCI_INDEX], OCI_MANIFEST)


def test_multiple_headers_are_merged() -> None:
    assert accepts([OCI_INDEX, DOCKER_V2, OCI_MANIFEST], OCI_MANIFEST)
    assert not accepts([OCI_INDEX, DOCKER_V2], OCI_MANIFEST)


def test_comma_separated_values() -> None:
    assert accepts([f"{OCI_INDEX}, {OCI_MANIFEST}"], OCI_MANIFEST)
    assert accepts([f"{OCI_INDEX},{DOCKER_V2}", OCI_MANIFEST], OCI_MANIFEST)


def test_parameters_are_ignored_for_matching() -> None:
    assert accepts([f"{OCI_MANIFEST}; q=0.5"], OCI_MANIFEST)
    assert accepts([f"{OCI_MANIFEST};charset=utf-8"], OCI_MANIFEST)


def test_q_zero_excludes_alongside_other_types() -> None:
    assert not accepts([f"{OCI_MANIFEST}; q=0.0", OCI_INDEX], OCI_MANIFEST)
    assert accepts([f"{OCI_INDEX};q=0", OCI_MANIFEST], OCI_MANIFEST)


def test_q_zero_as_the_only_entry_still_excludes() -> None:
    # "not this type" is not the same as "no Accept header".
    assert not accepts([f"{OCI_MANIFEST};q=0"], OCI_MANIFEST)


def test_q_zero_on_a_specific_type_overrides_a_wildcard() -> None:
    # RFC 9110 §12.5.1: the most specific media range decides.
    assert not accepts(["*/*", f"{OCI_MANIFEST};q=0"], OCI_MANIFEST)
    assert accepts(["*/*", f"{OCI_MANIFEST};q=0"], OCI_INDEX)


def test_wildcards() -> None:
    assert accepts(["*/*"], OCI_MANIFEST)
    assert accepts(["application/*"], OCI_MANIFEST)
    assert not accepts(["text/*"], OCI_MANIFEST)


def test_matching_is_case_insensitive_and_ignores_stored_parameters() -> None:
    assert accepts([OCI_MANIFEST.upper()], OCI_MANIFEST)
    assert accepts([OCI_MANIFEST], f"{OCI_MANIFEST}; charset=utf-8")


@pytest.mark.parametrize("q", ["٠", "０", "0_0", " 0.0000", "-0", "0e0", "0x0"])
def test_q_values_outside_the_ascii_grammar_do_not_refuse(q: str) -> None:
    """float() accepted Unicode zeros, '_', exponents and '-0' as q=0 (RFC 9110 §12.4.2)."""
    assert accepts([f"{OCI_MANIFEST};q={q}"], OCI_MANIFEST)


@pytest.mark.parametrize("q", ["0", "0.", "0.0", "0.000", " 0 ", "\t0.00"])
def test_q_zero_spellings_in_the_grammar_refuse(q: str) -> None:
    assert not accepts([f"{OCI_MANIFEST};q={q}"], OCI_MANIFEST)
