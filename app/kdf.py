"""HKDF-SHA256 (RFC 5869) on the standard library, so deriving a key loads no crypto stack."""

from __future__ import annotations

import hashlib
import hmac

_HASH_LEN = 32


def hkdf_sha256(secret: bytes, info: bytes, length: int = 32) -> bytes:
    """A key bound to one use (info) from a shared secret, without a salt (RFC 5869 §2.2:
    a zero-filled one), equal to cryptography's HKDF(SHA256(), length, None, info)."""
    if not 0 < length <= 255 * _HASH_LEN:
        raise ValueError(f"cannot derive {length} bytes")
    prk = hmac.new(b"\0" * _HASH_LEN, secret, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]
