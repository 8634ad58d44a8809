"""app/config.py: Config.from_env reads a mapping, applies defaults and rejects bad values."""

from __future__ import annotations

import pathlib

import pytest

from app.config import Config, ConfigError

BASE = {"PROXY_MODE": "transparent"}


def load(**env: str) -> Config:
    return Config.from_env({**BASE, **env})


def rejects(variable: str, value: str, **extra: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Config.from_env({**BASE, **extra, variable: value})
    message = str(info.value)
    assert "\n" not in message
    assert variable in message
    assert value in message
    return info.value


# -- PROXY_MODE ---------------------------------------------------------------------------------


def test_proxy_mode_is_required() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({})
    message = str(info.value)
    assert "PROXY_MODE" in message
    assert "transparent" in message
    assert "authenticated" in message
    assert "\n" not in message


def test_blank_proxy_mode_counts_as_unset() -> None:
    with pytest.raises(ConfigError, match="PROXY_MODE"):
        Config.from_env({"PROXY_MODE": "  "})


def test_invalid_proxy_mode_names_variable_value_and_allowed_values() -> None:
    error = rejects("PROXY_MODE", "open")
    assert "transparent" in str(error)
    assert "authenticated" in str(error)


@pytest.mark.parametrize("value", ["transparent", "authenticated", "Authenticated"])
def test_valid_proxy_modes(value: str) -> None:
    assert Config.from_env({"PROXY_MODE": value}).proxy_mode == value.lower()


def test_from_env_does_not_fall_back_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_MODE", "transparent")
    with pytest.raises(ConfigError):
        Config.from_env({})


def test_from_env_without_argument_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_MODE", "authenticated")
    monkeypatch.setenv("STORAGE_BACKEND", "fs")
    config = Config.from_env()
    assert (config.proxy_mode, config.storage_backend) == ("authenticated", "fs")


# -- defaults --------------------------------------------------------------------------------------


def test_defaults() -> None:
    config = load()
    assert config.storage_backend == "s3"
    assert config.listen_addr == ":8080"
    assert config.generate_self_signed_tls is False
    assert config.log_level == "info"
    assert config.cache_tag_manifests is True
    assert config.cache_latest_tag is False
    assert config.upstream_registry == "docker.io"
    assert config.insecure_registries == frozenset()
    assert config.allowed_registries == ("*",)
    assert config.fs_root == "/data/oci-cache"
    assert config.s3_bucket == "oci-cache"
    assert config.s3_prefix == ""
    assert config.s3_force_path_style is True
    assert config.s3_lifecycle_days == 28


def test_tls_changes_default_listen_addr() -> None:
    config = load(GENERATE_SELF_SIGNED_TLS="true")
    assert config.generate_self_signed_tls is True
    assert config.listen_addr == ":8443"


def test_explicit_listen_addr_wins_over_tls_default() -> None:
    assert load(GENERATE_SELF_SIGNED_TLS="true", LISTEN_ADDR=":9000").listen_addr == ":9000"


@pytest.mark.parametrize("value", [":8080", "0.0.0.0:80", "127.0.0.1:65535", "[::]:8080"])
def test_valid_listen_addrs(value: str) -> None:
    assert load(LISTEN_ADDR=value).listen_addr == value


def test_explicit_values() -> None:
    config = load(
        STORAGE_BACKEND="fs",
        FS_ROOT="/srv/cache",
        LOG_LEVEL="debug",
        S3_BUCKET="b",
        S3_PREFIX="/team/cache/",
        S3_LIFECYCLE_DAYS="0",
    )
    assert config.storage_backend == "fs"
    assert config.fs_root == "/srv/cache"
    assert config.log_level == "debug"
    assert config.s3_bucket == "b"
    assert config.s3_prefix == "team/cache"
    assert config.s3_lifecycle_days == 0


def test_log_level_warning_is_warn() -> None:
    assert load(LOG_LEVEL="WARNING").log_level == "warn"


# -- booleans --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes", "on", " true "])
def test_true_values(value: str) -> None:
    config = load(CACHE_LATEST_TAG=value, CACHE_TAG_MANIFESTS=value, S3_FORCE_PATH_STYLE=value)
    assert config.cache_latest_tag is True
    assert config.cache_tag_manifests is True
    assert config.s3_force_path_style is True


@pytest.mark.parametrize("value", ["false", "False", "0", "no", "off"])
def test_false_values(value: str) -> None:
    config = load(CACHE_LATEST_TAG=value, CACHE_TAG_MANIFESTS=value, S3_FORCE_PATH_STYLE=value)
    assert config.cache_latest_tag is False
    assert config.cache_tag_manifests is False
    assert config.s3_force_path_style is False


def test_empty_boolean_uses_default() -> None:
    assert load(CACHE_TAG_MANIFESTS="").cache_tag_manifests is True


# -- invalid values: one line naming the variable and the value ------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STORAGE_BACKEND", "gcs"),
        ("LOG_LEVEL", "verbose"),
        ("LOG_FORMAT", "xml"),
        ("GENERATE_SELF_SIGNED_TLS", "maybe"),
        ("CACHE_TAG_MANIFESTS", "yep"),
        ("CACHE_LATEST_TAG", "2"),
        ("S3_FORCE_PATH_STYLE", "sometimes"),
        ("S3_LIFECYCLE_DAYS", "-1"),
        ("S3_LIFECYCLE_DAYS", "ten"),
        ("LISTEN_ADDR", "0.0.0.0:"),
        ("LISTEN_ADDR", ":http"),
        ("LISTEN_ADDR", ":-1"),
        ("LISTEN_ADDR", ":70000"),
        ("LISTEN_ADDR", "[::1:8080"),
        ("UPSTREAM_REGISTRY", "https://registry.test"),
        ("UPSTREAM_REGISTRY", "user@registry.test"),
        ("UPSTREAM_REGISTRY", "registry.test/path"),
        ("INSECURE_REGISTRIES", "ok.test,bad/path"),
        ("INSECURE_REGISTRIES", "ok.test:notaport"),
        ("ALLOWED_REGISTRIES", "registry.test/path"),
        ("ALLOWED_REGISTRIES", "*.test,user@x.test"),
        ("ALLOWED_REGISTRIES", ","),  # a list with no entry must not mean "every registry"
        ("ALLOWED_REGISTRIES", ", ,"),
        ("CREDENTIAL_REGISTRIES", "registry.test/path"),
        ("CREDENTIAL_REGISTRIES", "https://ghcr.io"),
        ("CREDENTIAL_REGISTRIES", ",,"),
        ("UPSTREAM_CONNECT_TIMEOUT", "0"),
        ("UPSTREAM_CONNECT_TIMEOUT", "soon"),
        ("UPSTREAM_READ_TIMEOUT", "-5"),
    ],
)
def test_invalid_values_raise_one_line_naming_variable_and_value(variable: str, value: str) -> None:
    error = rejects(variable, value)
    assert error.name == variable


def test_invalid_value_message_names_allowed_values() -> None:
    error = rejects("STORAGE_BACKEND", "gcs")
    assert "s3" in str(error)
    assert "fs" in str(error)


# -- registries ------------------------------------------------------------------------------------


def test_upstream_registry_is_normalised() -> None:
    assert load(UPSTREAM_REGISTRY="index.docker.io").upstream_registry == "docker.io"
    assert load(UPSTREAM_REGISTRY="Registry.Test:5000").upstream_registry == "registry.test:5000"


def test_insecure_registries_list() -> None:
    config = load(INSECURE_REGISTRIES=" registry.test:5000 , Other.Test,, [::1]:5000 ")
    assert config.insecure_registries == frozenset(
        {"registry.test:5000", "other.test", "[::1]:5000"}
    )


def test_timeouts_accept_seconds_suffix() -> None:
    config = load(UPSTREAM_CONNECT_TIMEOUT="2.5", UPSTREAM_READ_TIMEOUT="30s")
    assert (config.upstream_connect_timeout, config.upstream_read_timeout) == (2.5, 30.0)


# -- ALLOWED_REGISTRIES ----------------------------------------------------------------------------


def test_allowed_registries_default_is_everything() -> None:
    assert load().allowed_registries == ("*",)
    assert load(ALLOWED_REGISTRIES=" ").allowed_registries == ("*",)


def test_allowed_registries_patterns() -> None:
    config = load(ALLOWED_REGISTRIES="*.example.com, GHCR.IO ,registry.test:5000,index.docker.io")
    assert config.allowed_registries == (
        "*.example.com",
        "ghcr.io",
        "registry.test:5000",
        "docker.io",
    )


def test_allowed_registries_wildcard_with_port() -> None:
    assert load(ALLOWED_REGISTRIES="*.test:5000").allowed_registries == ("*.test:5000",)


# -- CREDENTIAL_REGISTRIES (§15) ---------------------------------------------------------------


def test_credential_registries_default_is_upstream_plus_explicit_allowed_entries() -> None:
    assert load().credential_registries is None
    assert load().credential_patterns == ("docker.io",)
    config = load(
        UPSTREAM_REGISTRY="registry.test:5000",
        ALLOWED_REGISTRIES="*.example.com, ghcr.io, registry.test:5000, index.docker.io",
    )
    assert config.credential_patterns == ("registry.test:5000", "ghcr.io", "docker.io")


def test_credential_registries_explicit_patterns_are_normalised() -> None:
    config = load(CREDENTIAL_REGISTRIES=" GHCR.IO, registry-1.docker.io ,*.corp.test:5000")
    assert config.credential_patterns == ("ghcr.io", "docker.io", "*.corp.test:5000")
    assert load(CREDENTIAL_REGISTRIES="*").credential_patterns == ("*",)
    assert load(CREDENTIAL_REGISTRIES=" ").credential_registries is None, "blank is unset"


def test_credential_registries_match_like_target_registries() -> None:
    """Docker Hub is `docker.io` in a Target, whichever alias a setting used."""
    from app.netguard import matches_allowlist
    from app.oci import parse_target

    config = load(UPSTREAM_REGISTRY="index.docker.io")
    target = parse_target("alpine/manifests/3", ns=None, default_registry=config.upstream_registry)
    assert matches_allowlist(target.registry, config.credential_patterns)
    target = parse_target(
        "registry-1.docker.io/library/alpine/manifests/3", ns=None, default_registry="x.test"
    )
    assert matches_allowlist(target.registry, config.credential_patterns)
    assert not matches_allowlist("evil.test", config.credential_patterns)


def test_credential_registries_default_follows_a_replaced_config() -> None:
    """The default is derived, not frozen: a Config built in code gets it too."""
    assert Config(proxy_mode="transparent", upstream_registry="a.test").credential_patterns == (
        "a.test",
    )


def test_listen_addr_port_zero_means_any_free_port() -> None:
    """Port 0 asks the kernel for a free port (tests and one-off runs use it)."""
    assert Config.from_env(
        {"PROXY_MODE": "transparent", "LISTEN_ADDR": "127.0.0.1:0"}
    ).listen_addr == ("127.0.0.1:0")


# -- issue 14: dual-stack listening and the upstream egress settings ----------------------------


def test_empty_listen_host_binds_ipv6_and_ipv4(monkeypatch: pytest.MonkeyPatch) -> None:
    """`:PORT` -> `[::]:PORT` (IPV6_V6ONLY off: both families); a host is kept as given.

    The e2e test listens on [::1] only: a test never listens on every interface.
    """
    from app import config as config_module

    assert config_module.bind_addresses("127.0.0.1:8080") == ["127.0.0.1:8080"]
    assert config_module.bind_addresses("[::1]:8080") == ["[::1]:8080"]
    monkeypatch.setattr(config_module, "_has_ipv6", lambda: True)
    assert config_module.bind_addresses(":8080")[0] == "[::]:8080"
    monkeypatch.setattr(config_module, "_has_ipv6", lambda: False)
    assert config_module.bind_addresses(":8080") == ["0.0.0.0:8080"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HTTPS_PROXY", "ftp://proxy:21"),
        ("HTTP_PROXY", "http://proxy:99999"),
        ("NO_PROXY", "a b"),
        ("UPSTREAM_AUTH_FILE", "/nonexistent/config.json"),
        ("UPSTREAM_CA_BUNDLE", "/etc/hostname"),
        ("RATE_LIMIT_RESERVE", "101"),
        ("TLS_SKIP_VERIFY_REGISTRIES", "not a host"),
    ],
)
def test_upstream_egress_settings_are_validated(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^invalid configuration: {name}="):
        Config.from_env({"PROXY_MODE": "transparent", name: value})


def test_proxy_credentials_never_reach_the_error_line() -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"PROXY_MODE": "transparent", "HTTPS_PROXY": "ftp://u:secret@p"})
    assert "secret" not in str(caught.value)


def test_upstream_egress_settings(tmp_path: pathlib.Path) -> None:
    auth = tmp_path / "config.json"
    auth.write_text('{"auths": {"docker.io": {"auth": "dTpw"}}}')
    config = Config.from_env(
        {
            "PROXY_MODE": "transparent",
            "https_proxy": "http://proxy.corp:3128",
            "NO_PROXY": "localhost,.corp",
            "UPSTREAM_AUTH_FILE": str(auth),
            "RATE_LIMIT_RESERVE": "5%",
            "TLS_SKIP_VERIFY_REGISTRIES": "old.corp:5000",
        }
    )
    assert config.https_proxy == "http://proxy.corp:3128" and config.http_proxy is None
    assert config.no_proxy == ("localhost", ".corp")
    assert config.upstream_auth_file == str(auth)
    assert config.rate_limit_reserve == 0.05
    assert config.tls_skip_verify_registries == frozenset({"old.corp:5000"})
