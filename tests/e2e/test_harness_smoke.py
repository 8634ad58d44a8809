"""Smoke tests proving the e2e harness works against real registries, skopeo and tokens."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tests.harness import (
    BuiltImage,
    Registry,
    TokenServer,
    build_image,
    dir_digests,
    ensure_alias,
    parse_access_log,
    push,
    sha256_digest,
    skopeo_pull,
    verify_pulled,
)
from tests.harness.images import EVERY_MANIFEST_TYPE
from tests.harness.tokenserver import b64url_decode, decode_jwt_unverified

pytestmark = pytest.mark.e2e

REQUIRED_BINARIES = ("docker-registry", "skopeo", "htpasswd")
USER, PASSWORD = "alice", "s3cret-pw"
ACCEPT_ALL = ", ".join(EVERY_MANIFEST_TYPE)


@pytest.fixture(scope="module", autouse=True)
def _binaries() -> None:
    """Fail (never skip) when a required binary is missing."""
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    assert not missing, f"e2e harness needs these binaries on PATH: {missing}"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """A two-platform gzip image in an OCI layout."""
    return build_image(tmp_path_factory.mktemp("layout"), "v1", layer_sizes=(2048, 300_000))


@pytest.fixture
def anon_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """An anonymous registry on a free loopback port."""
    with Registry(tmp_path_factory.mktemp("anon-registry")) as reg:
        yield reg


def _fails_unauthorized(proc: subprocess.CompletedProcess[str]) -> None:
    """Assert a skopeo run failed because of authentication."""
    assert proc.returncode != 0, f"expected failure, got success: {proc.stdout}"
    err = proc.stderr.lower()
    assert "unauthorized" in err or "authentication required" in err, err


def _assert_pull_ok(proc: subprocess.CompletedProcess[str]) -> None:
    """Assert a skopeo run succeeded, showing stderr otherwise."""
    assert proc.returncode == 0, proc.stderr


def test_anonymous_push_pull_verifies_every_blob(
    anon_registry: Registry, image: BuiltImage, tmp_path: Path
) -> None:
    """(a) Push the multi-platform image, pull it back, every digest and layer checks out."""
    assert image.index is not None and len(image.images) == 2
    assert set(image.manifest_digests) == {"linux/amd64", "linux/arm64"}
    push(image.layout_dir, image.tag, f"docker://{anon_registry.host}/e2e/app:v1")

    with requests.get(
        f"{anon_registry.url}/v2/e2e/app/manifests/v1",
        headers={"Accept": ACCEPT_ALL},
        timeout=10,
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["Docker-Content-Digest"] == image.index_digest
        assert resp.content == image.index.data

    dest = tmp_path / "pulled"
    _assert_pull_ok(skopeo_pull(f"docker://{anon_registry.host}/e2e/app:v1", dest))
    pulled = verify_pulled(dest, image)
    assert set(pulled) == set(image.all_blobs())
    on_disk = dir_digests(dest)
    assert (dest / "version").read_text().startswith("Directory Transport Version")
    del on_disk["version"]
    assert set(on_disk.values()) == set(image.all_blobs())  # nothing missing, nothing extra
    assert all(d == f"sha256:{name}" for name, d in on_disk.items() if len(name) == 64)

    # Layers are real tar(.gz) files whose uncompressed digests are the config's diff_ids.
    for img in image.images:
        config = json.loads(img.config.data)
        assert config["architecture"] == img.architecture and config["os"] == "linux"
        assert config["rootfs"]["diff_ids"] == list(img.diff_ids)
        for n, layer in enumerate(img.layers):
            raw = gzip.decompress((dest / layer.hex).read_bytes())
            assert sha256_digest(raw) == img.diff_ids[n]
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                names = tar.getnames()
            assert f"e2e/layer{n}.bin" in names

    # A single-platform pull gets just that platform.
    one = tmp_path / "arm64"
    _assert_pull_ok(
        skopeo_pull(
            f"{anon_registry.host}/e2e/app:v1", one, all_platforms=False, platform="linux/arm64"
        )
    )
    verify_pulled(one, image, platforms=["linux/arm64"])
    assert (
        sha256_digest((one / "manifest.json").read_bytes()) == image.manifest_digests["linux/arm64"]
    )

    # Corruption is detected (the verifier is not a rubber stamp).
    victim = dest / image.images[0].layers[0].hex
    victim.write_bytes(victim.read_bytes() + b"x")
    with pytest.raises(AssertionError, match="corrupt"):
        verify_pulled(dest, image)


def test_htpasswd_registry_requires_credentials(
    tmp_path_factory: pytest.TempPathFactory, image: BuiltImage, tmp_path: Path
) -> None:
    """(b) htpasswd: push with creds; anonymous and wrong-password pulls fail; creds work."""
    workdir = tmp_path_factory.mktemp("htpasswd-registry")
    with Registry(workdir, auth="htpasswd", users={USER: PASSWORD}) as reg:
        assert (workdir / "htpasswd").read_text().startswith(f"{USER}:$2y$")
        assert reg.ping() == 401
        ref = f"docker://{reg.host}/secret/app:v1"
        push(image.layout_dir, image.tag, ref, creds=f"{USER}:{PASSWORD}")

        _fails_unauthorized(skopeo_pull(ref, tmp_path / "anon"))
        _fails_unauthorized(skopeo_pull(ref, tmp_path / "wrong", creds=f"{USER}:nope"))

        dest = tmp_path / "ok"
        _assert_pull_ok(skopeo_pull(ref, dest, creds=f"{USER}:{PASSWORD}"))
        verify_pulled(dest, image)


@pytest.fixture
def token_setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TokenServer, Registry]]:
    """A token server (public/* anonymous pull, alice everything) and a registry using it."""
    workdir = tmp_path_factory.mktemp("token")
    with (
        TokenServer(
            workdir / "tokens",
            users={USER: PASSWORD},
            acl={USER: {"public/*": ["pull", "push"], "private/*": ["pull", "push"]}},
            anonymous_pull=["public/*"],
        ) as ts,
        Registry(workdir / "registry", auth="token", token_server=ts) as reg,
    ):
        yield ts, reg


def test_token_registry_public_and_private(
    token_setup: tuple[TokenServer, Registry], image: BuiltImage, tmp_path: Path
) -> None:
    """(c) Token auth: anonymous pull of public works, of private fails; creds pull private."""
    ts, reg = token_setup
    with requests.get(f"{reg.url}/v2/", timeout=10) as resp:
        assert resp.status_code == 401
        challenge = resp.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'realm="{ts.realm}"' in challenge and f'service="{ts.service}"' in challenge

    public, private = f"{reg.host}/public/app:v1", f"{reg.host}/private/app:v1"
    push(image.layout_dir, image.tag, public, creds=f"{USER}:{PASSWORD}")
    push(image.layout_dir, image.tag, private, creds=f"{USER}:{PASSWORD}")
    pushes = [r for r in ts.recorded() if r.status == 200 and r.user == USER]
    assert any("repository:private/app:pull,push" in r.scopes for r in pushes), pushes

    ts.clear_requests()
    dest = tmp_path / "public"
    _assert_pull_ok(skopeo_pull(public, dest))
    verify_pulled(dest, image)
    anon = [r for r in ts.recorded() if r.user is None]
    assert anon and all(r.status == 200 for r in anon)
    assert any(
        g == {"type": "repository", "name": "public/app", "actions": ["pull"]}
        for r in anon
        for g in r.granted
    ), anon

    ts.clear_requests()
    _fails_unauthorized(skopeo_pull(private, tmp_path / "private-anon"))
    denied = [g for r in ts.recorded() for g in r.granted if g["name"] == "private/app"]
    assert denied and all(g["actions"] == [] for g in denied), denied

    ts.clear_requests()
    _fails_unauthorized(skopeo_pull(private, tmp_path / "private-bad", creds=f"{USER}:nope"))
    assert [r.status for r in ts.recorded()] and all(r.status == 401 for r in ts.recorded())

    dest = tmp_path / "private"
    _assert_pull_ok(skopeo_pull(private, dest, creds=f"{USER}:{PASSWORD}"))
    verify_pulled(dest, image)


def test_token_server_issues_verifiable_es256_jwts(
    token_setup: tuple[TokenServer, Registry],
) -> None:
    """(c) The JWT has x5c, a string aud, raw r||s ES256 signature and the scoped access."""
    ts, _reg = token_setup
    params = [
        ("service", ts.service),
        ("scope", "repository:private/app:pull,push"),
        ("scope", "repository:public/app:pull,push repository:other/x:pull"),
        ("account", USER),
    ]
    with requests.get(ts.realm, params=params, auth=(USER, PASSWORD), timeout=10) as resp:
        assert resp.status_code == 200
        body = resp.json()
    assert set(body) == {"token", "access_token", "expires_in", "issued_at"}
    assert body["token"] == body["access_token"]
    header, claims = decode_jwt_unverified(body["token"])
    assert header["alg"] == "ES256" and len(header["x5c"]) == 1
    assert isinstance(claims["aud"], str) and claims["aud"] == ts.service
    assert claims["iss"] == ts.issuer and claims["sub"] == USER
    assert claims["nbf"] <= claims["iat"] < claims["exp"] and claims["jti"]
    assert claims["access"] == [
        {"type": "repository", "name": "private/app", "actions": ["pull", "push"]},
        {"type": "repository", "name": "public/app", "actions": ["pull", "push"]},
        {"type": "repository", "name": "other/x", "actions": []},
    ]
    signing_input, _, sig = body["token"].rpartition(".")
    raw = b64url_decode(sig)
    assert len(raw) == 64  # raw r||s, not DER
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    ts.public_key.verify(der, signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        ts.public_key.verify(der, signing_input.encode() + b"x", ec.ECDSA(hashes.SHA256()))

    with requests.get(ts.realm, params=params, auth=(USER, "wrong"), timeout=10) as resp:
        assert resp.status_code == 401
    with requests.get(ts.realm, params=params, auth=("mallory", PASSWORD), timeout=10) as resp:
        assert resp.status_code == 401
    last = ts.recorded()[-1]
    assert last.status == 401 and last.user == "mallory" and last.query["account"] == [USER]


def test_portless_alias_registry(
    tmp_path_factory: pytest.TempPathFactory, image: BuiltImage, tmp_path: Path
) -> None:
    """(d) upstream.test -> 127.0.0.2:80 answers /v2/ by name and skopeo pulls port-less refs."""
    ensure_alias("upstream.test", "127.0.0.2")
    ensure_alias("upstream.test", "127.0.0.2")  # idempotent
    hosts = Path("/etc/hosts").read_text().split("\n")
    assert sum(1 for line in hosts if line.split()[1:2] == ["upstream.test"]) == 1

    workdir = tmp_path_factory.mktemp("alias-registry")
    with Registry(workdir, host="127.0.0.2", port=80, hostname="upstream.test") as reg:
        assert reg.host == "upstream.test" and reg.url == "http://upstream.test"
        with requests.get("http://upstream.test/v2/", timeout=10) as resp:
            assert resp.status_code == 200
            assert resp.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
        push(image.layout_dir, image.tag, "docker://upstream.test/library/app:v1")
        dest = tmp_path / "pulled"
        _assert_pull_ok(skopeo_pull("docker://upstream.test/library/app:v1", dest))
        verify_pulled(dest, image)
        assert any(
            e.method == "GET" and e.path == "/v2/library/app/manifests/v1" and e.status == 200
            for e in reg.requests_log()
        )


def test_access_log_sees_blob_gets(
    anon_registry: Registry, image: BuiltImage, tmp_path: Path
) -> None:
    """(e) The access-log parser sees each blob GET of a pull, and markers/clear/restart work."""
    ref = f"{anon_registry.host}/logs/app:v1"
    push(image.layout_dir, image.tag, ref)
    assert any(e.method == "PUT" and "/manifests/" in e.path for e in anon_registry.requests_log())

    expected = set(image.blobs())
    mark = anon_registry.mark()
    _assert_pull_ok(skopeo_pull(ref, tmp_path / "first"))
    entries = anon_registry.wait_for_requests(
        lambda es: {e.blob_digest for e in es if e.method == "GET"} >= expected, since=mark
    )
    gets = [e for e in entries if e.method == "GET" and e.blob_digest]
    assert sorted(e.blob_digest or "" for e in gets) == sorted(expected)
    assert all(e.status == 200 and e.path.startswith("/v2/logs/app/blobs/") for e in gets)
    assert anon_registry.blob_gets(since=mark) == gets

    # clear_log() hides history; a single-platform pull then fetches only its own blobs.
    anon_registry.clear_log()
    assert anon_registry.requests_log() == []
    anon_registry.restart()
    _assert_pull_ok(
        skopeo_pull(ref, tmp_path / "second", all_platforms=False, platform="linux/amd64")
    )
    amd64 = {b.digest for b in image.platform("linux/amd64").blobs()}
    anon_registry.wait_for_requests(
        lambda es: {e.blob_digest for e in es if e.method == "GET"} >= amd64
    )
    assert {e.blob_digest for e in anon_registry.blob_gets()} == amd64


def test_parse_access_log_ignores_logrus_lines() -> None:
    """Only combined-format access lines are parsed; logrus lines are skipped."""
    text = (
        'time="2026-11-28T20:03:08Z" level=info msg="response completed" '
        "http.request.method=GET http.request.uri=/v2/ http.response.status=200\n"
        '127.0.0.1 - - [28/Nov/2026:20:03:08 +0000] "HEAD /v2/a/b/blobs/sha256:'
        + "0" * 64
        + ' HTTP/1.1" 404 157 "" "skopeo"\n'
    )
    (entry,) = parse_access_log(text)
    assert entry == ("HEAD", "/v2/a/b/blobs/sha256:" + "0" * 64, 404)
    assert entry.blob_digest == "sha256:" + "0" * 64
