"""Upstream bodies: read as they arrive, capped when kept in memory (§15 bounded work)."""

from __future__ import annotations

from collections.abc import Iterator

import requests

from app.errors import UpstreamUnavailable

CHUNK_SIZE = 1024 * 1024


def raw_chunks(response: requests.Response, size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Whatever has arrived, up to size bytes at a time: slow upstreams stream without delay."""
    buffered = response._content  # bytes once something has read .content (a kept 401)
    if isinstance(buffered, bytes):
        if buffered:
            yield buffered
        return
    raw = response.raw
    while True:
        chunk = raw.read1(size, decode_content=False)
        if not chunk:
            return
        yield chunk


MAX_ERROR_BODY = 64 * 1024
MAX_TOKEN_BODY = 1024 * 1024


class TooLarge(Exception):
    """An upstream body went past its cap (counted in bytes read, not Content-Length)."""


def read_limited(response: requests.Response, limit: int) -> bytes:
    """The whole body, or TooLarge as soon as more than limit bytes arrive (§15 bounded work)."""
    parts: list[bytes] = []
    size = 0
    for chunk in raw_chunks(response, min(limit + 1, CHUNK_SIZE)):
        size += len(chunk)
        if size > limit:
            response.close()
            raise TooLarge(f"more than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def keep_error_body(response: requests.Response, registry: str) -> None:
    """Read an error answer into memory, capped at MAX_ERROR_BODY: beyond it, a clean 502."""
    try:
        body = read_limited(response, MAX_ERROR_BODY)
    except TooLarge:
        raise UpstreamUnavailable(
            registry, f"{response.status_code} answer larger than {MAX_ERROR_BODY} bytes"
        ) from None
    except Exception as exc:  # reset or timed out mid-body
        response.close()
        raise UpstreamUnavailable(registry, f"body failed: {type(exc).__name__}") from None
    response._content = body
    response._content_consumed = True


def iter_body(response: requests.Response, registry: str) -> Iterator[bytes]:
    """The raw body as upstream sent it, releasing the connection at the end.

    The first chunk is read before returning, so an upstream that fails before any
    body byte becomes a clean 502 instead of a broken response.
    """
    chunks = raw_chunks(response)
    try:
        first = next(chunks, b"")
    except Exception as exc:
        response.close()
        raise UpstreamUnavailable(registry, f"body failed: {type(exc).__name__}") from None

    def body() -> Iterator[bytes]:
        try:
            if first:
                yield first
            yield from chunks
        finally:
            response.close()

    return body()
