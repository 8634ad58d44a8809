"""`warm` through a running proxy, then skopeo pulls hit; `ls` lists what was pulled (§13)."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import BuiltImage, Registry, skopeo_pull, verify_pulled
from tests.harness.proxyproc import REPO_ROOT, ProxyServer

pytestmark = pytest.mark.e2e


def _cli(proxy: ProxyServer, *args: str) -> subprocess.CompletedProcess[str]:
    """The console script as an operator runs it, with the proxy's environment; stdout a pipe."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=REPO_ROOT,
        env=proxy.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_warm_then_pull_makes_no_upstream_blob_request_and_ls_lists_it(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, image: BuiltImage, tmp_path: Path
) -> None:
    proxy = make_proxy({"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host})
    ref = f"{upstream.host}/e2e/app:v1"  # warm names the registry; skopeo uses the default
    warmed = _cli(proxy, "warm", ref, "--proxy", proxy.url)
    assert warmed.returncode == 0, warmed.stderr
    assert warmed.stdout == "", "quiet when stdout is not a terminal"
    assert proxy.wait_cached(image.blobs()) == [], "every platform's blobs are cached"

    mark = upstream.mark()
    pulled = skopeo_pull(f"docker://{proxy.host}/e2e/app:v1", tmp_path / "pull")
    assert pulled.returncode == 0, pulled.stderr
    verify_pulled(tmp_path / "pull", image)
    assert upstream.blob_gets(since=mark) == []

    listed = _cli(proxy, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    repos = {r["repository"]: r for r in doc["repositories"]}
    assert list(repos) == [f"{upstream.host}/e2e/app"]
    (tag,) = repos[f"{upstream.host}/e2e/app"]["tags"]
    assert (tag["tag"], tag["digest"]) == ("v1", image.ref_digest)
    assert set(tag["blobs"]) == set(image.blobs())
    assert set(tag["manifests"]) == set(image.manifests())
    assert tag["size"] == sum(b.size for b in image.all_blobs().values())
    assert doc["blobs"] == {
        "count": len(image.blobs()),
        "size": sum(b.size for b in image.blobs().values()),
    }
    table = _cli(proxy, "ls").stdout.splitlines()
    assert table[1].split()[:3] == [f"{upstream.host}/e2e/app", "v1", image.ref_digest[:19]]


def test_warm_one_platform_and_name_what_failed(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, image: BuiltImage, tmp_path: Path
) -> None:
    proxy = make_proxy({"INSECURE_REGISTRIES": upstream.host})
    images = tmp_path / "images.txt"
    images.write_text(f"# the fleet's images\n{upstream.host}/e2e/app:v1\n\n")
    missing = f"{upstream.host}/e2e/nothing:v9"
    result = _cli(
        proxy,
        "warm",
        missing,
        "--from-file",
        str(images),
        "--platform",
        "linux/arm64",
        "--proxy",
        proxy.url,
    )
    assert result.returncode == 1
    assert f"failed: {missing}: manifest v9: HTTP 404" in result.stderr
    assert "e2e/app:v1" not in result.stderr
    arm = {b.digest for b in image.platform("linux/arm64").blobs()}
    amd = {b.digest for b in image.platform("linux/amd64").blobs()} - arm
    assert proxy.wait_cached(arm) == []
    assert not any(proxy.is_cached(d) for d in amd), "only --platform's blobs"


def test_warm_shows_progress_per_image_and_layer_on_a_terminal(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, image: BuiltImage
) -> None:
    proxy = make_proxy({"INSECURE_REGISTRIES": upstream.host})
    ref = f"{upstream.host}/e2e/app:v1"
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "app.cli", "warm", ref, "--proxy", proxy.url],
            cwd=REPO_ROOT,
            env={**proxy.env, "COLUMNS": "160", "TERM": "xterm"},
            stdout=terminal,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
        os.close(terminal)
        output = b""
        with contextlib.suppress(OSError):  # EIO once everything written has been read
            while chunk := os.read(controller, 65536):
                output += chunk
    finally:
        os.close(controller)
    assert proc.returncode == 0, proc.stderr
    text = output.decode(errors="replace")
    assert ref in text
    for digest in image.blobs():
        assert digest[7:19] in text, f"a progress line for layer {digest[7:19]}"


def test_warm_json_and_renovate_pins(
    make_proxy: Callable[..., ProxyServer], upstream: Registry, image: BuiltImage
) -> None:
    """name:tag@digest pulls the digest (the tag is only shown); --json reports every image."""
    proxy = make_proxy({"INSECURE_REGISTRIES": upstream.host})
    # No tag "pinned" upstream: warming succeeds only because the digest wins.
    pinned = f"{upstream.host}/e2e/app:pinned@{image.ref_digest}"
    missing = f"{upstream.host}/e2e/nothing:v9"
    result = _cli(proxy, "warm", pinned, missing, "--json", "--proxy", proxy.url)
    assert result.returncode == 1
    assert f"failed: {missing}: manifest v9: HTTP 404" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["failed"] == 1
    ok, bad = doc["images"]
    assert ok == {
        "image": pinned,
        "ok": True,
        "registry": upstream.host,
        "repository": "e2e/app",
        "tag": "pinned",
        "digest": image.ref_digest,
        "blobs": len(image.blobs()),
        "bytes": sum(b.size for b in image.blobs().values()),
        "error": None,
    }
    assert (bad["image"], bad["ok"], bad["error"]) == (missing, False, "manifest v9: HTTP 404")
    assert proxy.wait_cached(image.blobs()) == []
