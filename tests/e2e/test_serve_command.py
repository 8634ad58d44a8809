"""A pip/pipx-style install serves by itself: the wheel in a fresh venv, `oci-pull-through serve`.

No checkout files are involved: the wheel is built from a copy of the sources, installed
into a new virtualenv (dependencies as pip is configured here), and the console script runs
from an empty directory, so gunicorn's settings and the WSGI entry must come from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pytest
import requests

from tests.harness import BuiltImage, Registry, skopeo_pull, verify_pulled
from tests.harness.proxyproc import REPO_ROOT, ProxyServer

pytestmark = pytest.mark.e2e
SHIPPED = ("app/gunicorn_conf.py", "app/serverhooks.py", "app/wsgi.py", "app/commands/serve.py")


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding the project's wheel and its dependencies, nothing else."""
    work = tmp_path_factory.mktemp("pipx")
    src = work / "src"  # a copy: building in the shared checkout would leave build/ behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, src / name)
    shutil.copytree(REPO_ROOT / "app", src / "app", ignore=shutil.ignore_patterns("__pycache__"))
    pip = Path(sys.executable).parent / "pip"
    _run([str(pip), "wheel", "--no-deps", "--wheel-dir", str(work / "wheels"), str(src)])
    (wheel,) = (work / "wheels").glob("oci_pull_through-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(SHIPPED) <= names, sorted(names)
    target = work / "venv"
    _run([sys.executable, "-m", "venv", str(target)])  # a new venv: no .venv packages
    _run([str(target / "bin" / "pip"), "install", str(wheel)])
    return target


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc


class InstalledProxy(ProxyServer):
    """The proxy as a pipx user starts it: the venv's console script, in an empty directory."""

    def __init__(self, workdir: Path, env: Mapping[str, str], venv: Path) -> None:
        super().__init__(workdir, env)
        self.venv = venv
        self.env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
        self.cwd = self.workdir / "cwd"
        self.cwd.mkdir()

    def command(self) -> list[str]:
        """What the README tells pip and pipx users to run."""
        return [str(self.venv / "bin" / "oci-pull-through"), "serve"]

    def start(self, wait: bool = True) -> InstalledProxy:
        """Start from the empty directory (ProxyServer starts in the checkout)."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.cwd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready(timeout=30)
        return self


def test_version_and_package_come_from_the_fresh_venv(venv: Path, tmp_path: Path) -> None:
    shown = _run([str(venv / "bin" / "oci-pull-through"), "--version"], cwd=tmp_path)
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert shown.stdout == f"oci-pull-through {version}\n"
    where = _run(
        [str(venv / "bin" / "python"), "-c", "import app; print(app.__file__)"], cwd=tmp_path
    )
    assert where.stdout.startswith(str(venv / "lib")), where.stdout


def test_serve_from_an_installed_wheel_answers_and_caches_a_pull(
    venv: Path, upstream: Registry, image: BuiltImage, tmp_path: Path
) -> None:
    """/healthz, then a real skopeo pull: cold from upstream, warm from the cache."""
    proxy = InstalledProxy(
        tmp_path / "proxy",
        {"UPSTREAM_REGISTRY": upstream.host, "INSECURE_REGISTRIES": upstream.host},
        venv,
    )
    proxy.start()
    try:
        assert proxy.proc is not None
        cmdline = Path(f"/proc/{proxy.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[0].decode().startswith(str(venv)), cmdline  # serve exec'd gunicorn
        assert b"python:app.gunicorn_conf" in cmdline and b"app.wsgi:app" in cmdline, cmdline
        r = requests.get(f"{proxy.url}/healthz", timeout=10)
        assert r.status_code == 200 and r.text == "ok"

        cold = upstream.mark()
        pulled = skopeo_pull(f"docker://{proxy.host}/e2e/app:v1", tmp_path / "cold")
        assert pulled.returncode == 0, pulled.stderr
        verify_pulled(tmp_path / "cold", image)
        assert upstream.blob_gets(since=cold), "the cold pull must fetch blobs upstream"
        assert proxy.wait_cached(image.blobs()) == []
        warm = upstream.mark()
        pulled = skopeo_pull(f"docker://{proxy.host}/e2e/app:v1", tmp_path / "warm")
        assert pulled.returncode == 0, pulled.stderr
        verify_pulled(tmp_path / "warm", image)
        assert upstream.blob_gets(since=warm) == []
    finally:
        code = proxy.stop()
    assert code == 0, proxy.log()[-3000:]  # SIGTERM reached gunicorn's master: a clean drain
    assert os.listdir(proxy.cwd) == [], "nothing is written to the working directory"
