"""A seekable, lazily ranged read of one S3 object, for hits the proxy streams itself."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from app.storage import StoreError
from app.storage.s3bucket import translated


class S3ObjectReader(io.RawIOBase):
    """A seekable object stream; each read after a seek issues one lazy ranged GetObject.

    Reads begin at start and stop at end, so a span is fetched with a Range of only itself.
    It has no fileno, so servers iterate it instead of using sendfile.
    """

    def __init__(
        self, client: Any, bucket: str, key: str, size: int, start: int = 0, end: int | None = None
    ) -> None:
        super().__init__()
        self.client = client
        self.bucket = bucket
        self.key = key
        self.size = size
        self._pos = start
        self._end = size if end is None else end  # reads stop here: a Range fetches only itself
        self._body: Any = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the position; the open stream (if any) is dropped when it changes."""
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        position = base + offset
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        if position != self._pos:
            self._drop_body()
            self._pos = position
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        """Up to size bytes (all that remain when size < 0), from one ranged GET."""
        if self.closed:
            raise ValueError("read of a closed S3 object")
        remaining = self._end - self._pos
        if remaining <= 0:
            return b""
        want = remaining if size is None or size < 0 else min(size, remaining)
        if self._body is None:
            with translated(f"reading {self.key}"):
                response = self.client.get_object(
                    Bucket=self.bucket, Key=self.key, Range=f"bytes={self._pos}-{self._end - 1}"
                )
            self._body = response["Body"]
        with translated(f"reading {self.key}"):
            data = self._body.read(want)
        if not data:
            raise StoreError(f"reading {self.key}: object ended at {self._pos} of {self.size}")
        self._pos += len(data)
        return bytes(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _drop_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            with contextlib.suppress(Exception):
                body.close()

    def close(self) -> None:
        """Release the HTTP connection."""
        self._drop_body()
        super().close()
