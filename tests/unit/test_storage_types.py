"""mypy proves every Storage satisfies the protocol: both backends and the tracking wrapper.

Each of app/storage/fs.py, app/storage/s3.py and app/evictor.py ends in a never-called
_conforms() that returns its classes as (Storage, BlobWriter); a backend that drifts from
the protocol (a method renamed, a parameter retyped) fails this check. mypy comes with
the dev extra ([tool.mypy] in pyproject.toml).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKED = [
    "app/storage",
    "app/tee.py",
    "app/evictor.py",
    "app/eviction.py",
    "app/inventory.py",
    "app/serve.py",
    "app/commands/gc.py",
    "app/commands/ls.py",
]


def test_the_storage_contract_and_its_callers_type_check(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy"), *CHECKED],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
