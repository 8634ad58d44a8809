"""Air-gap slices end to end (issue 14, item 6): pull through the proxy, export, read the
slice with skopeo, import it into a fresh cache, and pull with the upstream stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from tests.harness import BuiltImage, Registry, skopeo_pull, verify_pulled
from tests.harness.images import run_skopeo
from tests.harness.proxyproc import REPO_ROOT, ProxyServer

pytestmark = pytest.mark.e2e


def _cli(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The oci-pull-through command, configured like the proxy it serves."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=REPO_ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _inventory(env: Mapping[str, str]) -> dict:  # type: ignore[type-arg]
    proc = _cli(env, "ls", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_export_skopeo_reads_it_import_seeds_a_cache_with_no_upstream(
    make_proxy: Callable[..., ProxyServer],
    image: BuiltImage,
    tmp_path: Path,
    backend: dict[str, str],
) -> None:
    with Registry(tmp_path / "registry") as registry:
        image.push(f"docker://{registry.host}/e2e/app:v1")
        upstream = {"UPSTREAM_REGISTRY": registry.host, "INSECURE_REGISTRIES": registry.host}
        proxy = make_proxy({**upstream, **backend})
        pulled = skopeo_pull(f"docker://{proxy.host}/e2e/app:v1", tmp_path / "cold")
        assert pulled.returncode == 0, pulled.stderr
        assert proxy.wait_cached(image.blobs()) == []

        ref = f"{registry.host}/e2e/app:v1"
        missing = _cli(proxy.env, "export", ref, f"{registry.host}/e2e/app:v9", "-o", "/dev/null")
        assert missing.returncode == 1
        assert f"not cached: {registry.host}/e2e/app:v9" in missing.stderr
        slice_tar = tmp_path / "slice.tar"
        exported = _cli(proxy.env, "export", ref, "-o", str(slice_tar))
        assert exported.returncode == 0, exported.stderr

        # skopeo reads the slice as an OCI archive: every platform, every digest
        out = tmp_path / "from-slice"
        copy = run_skopeo(
            ["copy", "--all", "--preserve-digests", f"oci-archive:{slice_tar}:{ref}", f"dir:{out}"]
        )
        assert copy.returncode == 0, copy.stderr
        verify_pulled(out, image)

        # a fresh cache: a corrupted slice is refused whole, the good one is loaded
        fresh = {**proxy.env, **backend}
        if backend["STORAGE_BACKEND"] == "fs":
            fresh["FS_ROOT"] = str(tmp_path / "fresh-cache")
        else:
            fresh["S3_PREFIX"] = backend["S3_PREFIX"] + "-fresh"
        layer = image.platform("linux/amd64").layers[-1].data
        raw = bytearray(slice_tar.read_bytes())
        at = raw.find(layer)
        assert at > 0
        raw[at + len(layer) // 2] ^= 0xFF
        bad = tmp_path / "corrupted.tar"
        bad.write_bytes(bytes(raw))
        refused = _cli(fresh, "import", str(bad))
        assert refused.returncode == 1
        assert "does not match its digest" in refused.stderr
        empty = _inventory(fresh)
        assert empty["repositories"] == [] and empty["blobs"]["count"] == 0, "nothing visible"

        imported = _cli(fresh, "import", str(slice_tar))
        assert imported.returncode == 0, imported.stderr
        assert f"tags: {ref}" in imported.stdout
        registry.stop()

    # the upstream is gone: the seeded cache answers the whole pull
    seeded = make_proxy(
        {**upstream, **{k: v for k, v in fresh.items() if k in backend or k == "FS_ROOT"}}
    )
    seeded_pull = skopeo_pull(f"docker://{seeded.host}/e2e/app:v1", tmp_path / "seeded")
    assert seeded_pull.returncode == 0, seeded_pull.stderr
    verify_pulled(tmp_path / "seeded", image)


def test_export_of_one_platform(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, image: BuiltImage, tmp_path: Path
) -> None:
    proxy = make_proxy({"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host})
    pulled = skopeo_pull(
        f"docker://{proxy.host}/e2e/app:v1",
        tmp_path / "cold",
        all_platforms=False,
        platform="linux/arm64",
    )
    assert pulled.returncode == 0, pulled.stderr
    arm = image.platform("linux/arm64")
    assert proxy.wait_cached({b.digest: b for b in arm.blobs()}) == []
    ref = f"{upstream.host}/e2e/app:v1"
    everything = _cli(proxy.env, "export", ref, "-o", str(tmp_path / "all.tar"))
    assert everything.returncode == 1, "amd64 was never pulled"
    assert "not cached" in everything.stderr and "manifest" in everything.stderr
    slice_tar = tmp_path / "arm64.tar"
    one = _cli(proxy.env, "export", ref, "--platform", "linux/arm64", "-o", str(slice_tar))
    assert one.returncode == 0, one.stderr
    out = tmp_path / "from-slice"
    copy = run_skopeo(
        [
            "--override-os",
            "linux",
            "--override-arch",
            "arm64",
            "copy",
            "--preserve-digests",
            f"oci-archive:{slice_tar}:{ref}",
            f"dir:{out}",
        ]
    )
    assert copy.returncode == 0, copy.stderr
    verify_pulled(out, image, platforms=["linux/arm64"])
