"""A worker loads what its configuration uses (issue 12): boto3 only for S3, the crypto
stack only once a proxy token is sealed or opened, rich never."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.kdf import hkdf_sha256

ROOT = Path(__file__).resolve().parents[2]


def _loaded_after(code: str, tmp_path: Path, **env: str) -> set[str]:
    """Top-level packages in sys.modules after importing the WSGI app and running code."""
    script = (
        "import sys\n"
        "import app.wsgi\n"
        f"{code}\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PROXY_MODE": "transparent",
        "STORAGE_BACKEND": "fs",
        "FS_ROOT": str(tmp_path / "cache"),
        "SPOOL_DIR": str(tmp_path / "spool"),
        "TOKEN_SECRET": "s" * 32,
        **env,
    }
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,  # no .env of the checkout
        env={**environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(out.stdout.split())


def test_a_filesystem_worker_loads_neither_boto3_nor_crypto_nor_rich(tmp_path: Path) -> None:
    loaded = _loaded_after("", tmp_path)
    assert "flask" in loaded, "the probe imported the app"
    assert not loaded & {"boto3", "botocore", "s3transfer", "cryptography", "rich"}


def test_the_crypto_stack_loads_with_the_first_token(tmp_path: Path) -> None:
    code = (
        "from app.auth.tokens import Sealer\n"
        "s = Sealer(b'k' * 32)\n"
        "assert s.open(s.encode(s.seal({}, 60))) is not None\n"
        "assert s.open('opt1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA') is None\n"
    )
    assert "cryptography" in _loaded_after(code, tmp_path)


@pytest.mark.parametrize(
    ("secret", "info", "length"),
    [(b"", b"", 32), (b"k" * 32, b"oci-pull-through proxy token v1", 32), (b"\xff" * 99, b"x", 77)],
)
def test_stdlib_hkdf_matches_the_crypto_library(secret: bytes, info: bytes, length: int) -> None:
    """Keys derived before this change (cryptography's HKDF) still open tokens and peer
    requests of replicas running the older version."""
    reference = HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info)
    assert hkdf_sha256(secret, info, length) == reference.derive(secret)
