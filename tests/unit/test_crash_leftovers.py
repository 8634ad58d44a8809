"""SPEC §15 "Crash leftovers": a dead process's files go at start and by `gc`, never live ones.

A real process is killed with SIGKILL mid-flight (app/flight.py spool files) and mid-write
(a FilesystemWriter's temp file); while it lives, nothing it holds may be removed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.eviction import ORPHAN_AGE, sweep
from app.flight import Flights, sweep_leftovers
from app.storage.fs import FilesystemStorage

ROOT = str(Path(__file__).resolve().parents[2])

FETCHER = """
import sys, gevent
from app.flight import Flights, Head
ticket = Flights(sys.argv[1]).join("blobs/sha256/" + "ab" * 32)
assert ticket.leader
def fetch(writer):
    writer.publish(Head(200, [("Content-Type", "application/octet-stream")], 10))
    writer.write(b"12345")
    print("ready", flush=True)
    gevent.sleep(3600)
ticket.start(fetch)
gevent.sleep(3600)
"""

WRITER = """
import sys, time
from app.storage import keys
from app.storage.fs import FilesystemStorage
writer = FilesystemStorage(sys.argv[1]).writer(keys.blob("sha256:" + "ab" * 32))
writer.write(b"half a blob")
print(writer._temp, flush=True)
time.sleep(3600)
"""


def _start(script: str, arg: str) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, arg], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, "the child did not get going"
    return proc, line


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    cache, spool = tmp_path / "cache", tmp_path / "spool"
    FilesystemStorage(str(cache))
    spool.mkdir()
    yield cache, spool


def _gc(cache: Path, spool: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "PROXY_MODE": "transparent",
        "STORAGE_BACKEND": "fs",
        "FS_ROOT": str(cache),
        "SPOOL_DIR": str(spool),
    }
    env.pop("FS_MAX_BYTES", None)
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "gc", "--max-bytes", "1Gi"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )


def _flight_files(spool: Path) -> list[str]:
    """The suffixes of the flight's files (<h>.lock ...); eviction's own files left out."""
    return sorted(p.name.split(".", 1)[1] for p in spool.iterdir() if len(p.name) > 41)


@pytest.mark.parametrize("sweeper", ["worker start", "gc"])
def test_spool_of_a_killed_fetcher_is_removed_a_live_ones_kept(
    dirs: tuple[Path, Path], sweeper: str
) -> None:
    cache, spool = dirs
    proc, _ = _start(FETCHER, str(spool))
    try:
        files = _flight_files(spool)
        assert {"lock", "readers", "state"} <= set(files) and len(files) == 4, files
        # While the fetcher lives, neither a starting worker nor gc touches its flight.
        Flights(str(spool))
        assert sweep_leftovers(str(spool)) == 0
        live = _gc(cache, spool)
        assert live.returncode == 0, live.stderr
        assert "removed 0 files left by dead processes" in live.stdout
        assert _flight_files(spool) == files
    finally:
        _kill(proc)
    (spool / "evict.json").write_bytes(b"{}")  # not a flight's: never touched
    if sweeper == "gc":
        result = _gc(cache, spool)
        assert result.returncode == 0, result.stderr
        assert "removed 4 files left by dead processes" in result.stdout
    else:
        Flights(str(spool))  # what every worker does as it starts
    assert _flight_files(spool) == []
    assert (spool / "evict.json").read_bytes() == b"{}"


def test_a_flight_a_live_reader_holds_is_kept(dirs: tuple[Path, Path]) -> None:
    """The fetcher died but a reader still follows: its files stay until the reader lets go."""
    import fcntl

    _, spool = dirs
    proc, _ = _start(FETCHER, str(spool))
    base = next(spool.glob("*.lock")).with_suffix("")
    reader = os.open(f"{base}.readers", os.O_RDWR)
    fcntl.flock(reader, fcntl.LOCK_SH)
    _kill(proc)
    try:
        assert sweep_leftovers(str(spool)) == 0 and len(list(spool.iterdir())) == 4
    finally:
        os.close(reader)
    assert sweep_leftovers(str(spool)) == 4 and list(spool.iterdir()) == []


@pytest.mark.parametrize("sweeper", ["start", "gc", "eviction"])
def test_temp_file_of_a_killed_writer_is_removed_a_live_ones_kept(
    dirs: tuple[Path, Path], sweeper: str
) -> None:
    cache, spool = dirs
    storage = FilesystemStorage(str(cache))
    proc, temp = _start(WRITER, str(cache))
    try:
        assert os.path.basename(temp).startswith(".tmp-") and os.path.exists(temp)
        old = time.time() - ORPHAN_AGE - 10
        os.utime(temp, (old, old))  # even an old one stays while its writer lives
        assert storage.sweep_temp(0) == 0
        assert sweep(str(cache), None).orphans == 0
        live = _gc(cache, spool)
        assert live.returncode == 0, live.stderr
        assert os.path.exists(temp)
    finally:
        _kill(proc)
    if sweeper == "gc":
        result = _gc(cache, spool)
        assert result.returncode == 0, result.stderr
        assert "removed 1 files left by dead processes" in result.stdout
    elif sweeper == "start":
        assert storage.sweep_temp(0) == 1
    else:
        assert sweep(str(cache), None).orphans == 1
    assert not os.path.exists(temp)
