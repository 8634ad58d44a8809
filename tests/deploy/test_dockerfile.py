"""deploy/Dockerfile: hadolint, then the image's runtime contents built and run without Docker.

There is no container engine here, so the test follows the Dockerfile itself: it copies the
build context its COPY lines name (filtered by deploy/Dockerfile.dockerignore), runs the
build stage's RUN lines with absolute paths moved under a scratch root, copies the runtime
files, and starts the CMD with the runtime ENV, WORKDIR and USER, then runs the HEALTHCHECK.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"


@dataclass
class Stage:
    """One FROM ... stage: its base, name and instructions in order."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and stages, with line continuations joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def exec_form(arg: str) -> list[str]:
    """CMD/HEALTHCHECK CMD in JSON exec form (shell form is not allowed here)."""
    value = json.loads(arg)
    assert isinstance(value, list), f"expected exec form, got {arg!r}"
    return value


def env_pairs(arg: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(arg))


def ignored(relative: str, patterns: list[str]) -> bool:
    """.dockerignore matching, enough for the patterns this file uses."""
    parts = relative.split("/")
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        if fnmatch.fnmatch(relative, pattern) or any(
            fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts))
        ):
            return True
        if pattern.startswith("**/") and any(fnmatch.fnmatch(p, bare) for p in parts):
            return True
    return False


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


class ImageRoot:
    """A scratch directory standing for the image's filesystem root."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, container_path: str) -> Path:
        return self.path / container_path.lstrip("/")

    def rewrite(self, command: str) -> str:
        """Absolute container paths in a RUN line, moved under the scratch root."""
        return re.sub(r"(?<=[\s=])/(?=[a-z])", f"{self.path}/", " " + command).strip()


def copy_from_context(root: ImageRoot, workdir: str, arg: str, patterns: list[str]) -> list[str]:
    """COPY <src>... <dest> from the build context (the repository root)."""
    *sources, dest = shlex.split(arg)
    target = root(dest if dest.startswith("/") else f"{workdir}/{dest}")
    copied = []
    for source in sources:
        assert not ignored(source, patterns), f"COPY {source} is excluded by .dockerignore"
        src = ROOT / source
        assert src.exists(), f"COPY source {source} is not in the repository"
        if src.is_dir():
            for path in src.rglob("*"):
                rel = path.relative_to(ROOT).as_posix()
                if path.is_file() and not ignored(rel, patterns):
                    out = target / path.relative_to(src)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, out)
        else:
            out = target / src.name if (dest.endswith("/") or len(sources) > 1) else target
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)
        copied.append(source)
    return copied


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_hadolint_is_clean() -> None:
    exe = Path(sys.executable).parent / "hadolint"
    assert exe.exists() or shutil.which("hadolint"), "hadolint missing: install the test extra"
    proc = subprocess.run(
        [str(exe) if exe.exists() else "hadolint", "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_shape() -> None:
    """Multi-stage on a slim Python base, non-root, `serve` CMD, HEALTHCHECK via the CLI."""
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    assert len(stages) >= 2, "multi-stage"
    runtime = stages[-1]
    assert all(re.fullmatch(r"python:3\.\d+-slim(-\w+)?", s.base) for s in stages), stages
    (user,) = runtime.all("USER")
    assert user.split(":")[0] not in ("0", "root")
    assert exec_form(runtime.all("CMD")[-1]) == ["oci-pull-through", "serve"]
    (health,) = runtime.all("HEALTHCHECK")
    assert exec_form(health.split(" CMD ", 1)[1]) == ["oci-pull-through", "-healthcheck"]
    # The wheel carries gunicorn's settings and the WSGI entry: only the venv is copied.
    assert all(arg.startswith("--from=build ") for arg in runtime.all("COPY")), runtime.all("COPY")
    assert "PROXY_MODE" not in " ".join(runtime.all("ENV")), "PROXY_MODE must stay required"


@pytest.fixture
def image_root() -> Iterator[ImageRoot]:
    """World-traversable scratch root, so the Dockerfile's non-root USER can run from it."""
    path = Path(tempfile.mkdtemp(prefix="oci-image-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield ImageRoot(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def build_like_the_dockerfile(root: ImageRoot) -> tuple[Stage, str]:
    """Every stage's COPY and the build stages' RUN lines under root; the runtime stage, WORKDIR."""
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    patterns = dockerignore_patterns()
    shim = root("/.shim")  # the python:3.11 image has `python`; so does this scratch PATH
    shim.mkdir(parents=True)
    # Debian's python3 (3.11, python3-venv): readable by the image's non-root user, unlike
    # an interpreter under /root.
    system_python = Path("/usr/bin/python3")
    assert system_python.exists(), "Debian python3 and python3-venv are needed (see .ci/run)"
    (shim / "python").symlink_to(system_python)
    workdir = "/"
    for stage in stages:
        workdir = "/"
        env = {"PATH": f"{shim}:/usr/local/bin:/usr/bin:/bin", "HOME": str(root("/root"))}
        build_stage = stage is not stages[-1]
        for keyword, arg in stage.instructions:
            if keyword == "WORKDIR":
                workdir = arg
                root(workdir).mkdir(parents=True, exist_ok=True)
            elif keyword == "ENV" and build_stage:
                env.update(env_pairs(arg))
            elif keyword == "COPY" and arg.startswith("--from="):
                # Both stages share the scratch root, and the paths are the same: nothing to do.
                source, dest = shlex.split(arg.split(" ", 1)[1])
                assert source == dest and root(source).exists(), arg
            elif keyword == "COPY":
                copy_from_context(root, workdir, arg, patterns)
            elif keyword == "RUN" and build_stage:
                proc = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", root.rewrite(arg)],
                    cwd=root(workdir),
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                assert proc.returncode == 0, f"RUN {arg}\n{proc.stdout[-3000:]}{proc.stderr}"
            elif keyword == "RUN":
                # Runtime RUN creates the user and the cache directory: do the directory part.
                for directory in re.findall(r"mkdir -p (\S+)", arg):
                    root(directory).mkdir(parents=True, exist_ok=True)
                    if "chown" in arg:
                        os.chown(root(directory), 10001, 10001)
    return stages[-1], workdir


def test_runtime_contents_start_and_pass_the_healthcheck(image_root: ImageRoot) -> None:
    """The wheel in a fresh venv serves by itself (`oci-pull-through serve`), as the image would.

    The working directory is empty: settings and WSGI entry come from the installed package.
    SIGTERM to the CMD's process (what `docker stop` sends PID 1) reaches gunicorn's master.
    """
    runtime, workdir = build_like_the_dockerfile(image_root)
    cwd = image_root(workdir)
    assert list(cwd.iterdir()) == []

    env: dict[str, str] = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    for arg in runtime.all("ENV"):
        for name, value in env_pairs(arg).items():
            value = value.replace("$PATH", env["PATH"])
            env[name] = image_root.rewrite(value) if value.startswith("/") else value
    port = free_port()
    env.update(
        {
            "PROXY_MODE": "transparent",  # required, given at `docker run`
            "LISTEN_ADDR": f"127.0.0.1:{port}",  # the image's :8080, on loopback only
            "HOME": str(cwd),
        }
    )
    fs_root = Path(env["FS_ROOT"])
    assert fs_root.is_dir() and fs_root.stat().st_uid == 10001
    venv_bin = image_root("/opt/oci-pull-through/bin")
    command = exec_form(runtime.all("CMD")[-1])
    exe = shutil.which(command[0], path=env["PATH"])
    assert exe is not None and Path(exe).parent == venv_bin, exe
    uid, gid = (int(x) for x in runtime.all("USER")[-1].split(":"))

    where = subprocess.run(
        [str(venv_bin / "python"), "-c", "import app; print(app.__file__)"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        user=uid,
        group=gid,
    )
    assert where.stdout.startswith(str(image_root("/opt/oci-pull-through/lib"))), where
    shown = subprocess.run(
        [exe, "--version"], cwd=cwd, env=env, capture_output=True, text=True, user=uid, group=gid
    )
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert shown.returncode == 0 and shown.stdout == f"oci-pull-through {project['version']}\n"

    log = (image_root.path / "gunicorn.log").open("wb")
    proc = subprocess.Popen(
        [exe, *command[1:]],
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        user=uid,
        group=gid,
        start_new_session=True,
    )
    (health,) = runtime.all("HEALTHCHECK")
    check = exec_form(health.split(" CMD ", 1)[1])
    check[0] = shutil.which(check[0], path=env["PATH"]) or check[0]
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (image_root.path / "gunicorn.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, (image_root.path / "gunicorn.log").read_text()
                time.sleep(0.2)
        healthy = subprocess.run(
            check, cwd=cwd, env=env, user=uid, group=gid, capture_output=True, timeout=30
        )
        assert healthy.returncode == 0, healthy.stderr
        # `serve` replaced itself with gunicorn's master: same process, no wrapper in between.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"gunicorn" in cmdline[:3] and b"python:app.gunicorn_conf" in cmdline, cmdline
        # The app really routes (validation happens before any upstream I/O).
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/Bad_Name/manifests/v1", timeout=5)
            raise AssertionError("expected 400")
        except urllib.error.HTTPError as error:
            assert error.code == 400
            assert json.loads(error.read())["errors"][0]["code"] == "NAME_INVALID"
            error.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, (image_root.path / "gunicorn.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
    stopped = subprocess.run(
        check, cwd=cwd, env=env, user=uid, group=gid, capture_output=True, timeout=30
    )
    assert stopped.returncode == 1, "the HEALTHCHECK must fail once the server is gone"
