"""A deliberately misbehaving registry, for faults a real one will not produce on demand."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Behaviour:
    """How to answer one path: a body, and what to do wrong with it."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    truncate_at: int | None = None  # close the connection after this many body bytes
    stall_before_headers: float = 0.0
    stall_after: int | None = None  # bytes sent before stalling
    stall_for: float = 0.0
    chunk: int = 65536
    delay_per_chunk: float = 0.0
    # A body generated lazily (after `body`), so a huge answer costs the fake no memory;
    # stream_length is the Content-Length to announce (None: close-delimited, no length).
    stream: Callable[[], Iterator[bytes]] | None = None
    stream_length: int | None = None


def filler(size: int, block: int = 1024 * 1024, byte: bytes = b"a") -> Iterator[bytes]:
    """size bytes of one repeated byte, a block at a time (for huge bodies)."""
    piece = byte * block
    left = size
    while left > 0:
        yield piece[: min(block, left)]
        left -= block


class FakeUpstream:
    """A threaded HTTP server on 127.0.0.1 whose answers the test scripts per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Behaviour] = {}
        self.requests: list[tuple[str, str]] = []
        self.on_request: Callable[[str, str], None] | None = None
        # (method, path with query, request headers) of every request, for assertions
        self.received: list[tuple[str, str, dict[str, str]]] = []
        # consulted before routes: (method, path, headers) -> a Behaviour, or None for routes
        self.responder: Callable[[str, str, dict[str, str]], Behaviour | None] | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                self._answer(head=False)

            def _answer(self, head: bool) -> None:
                path = self.path.split("?", 1)[0]
                fake.requests.append((self.command, self.path))
                fake.received.append((self.command, self.path, dict(self.headers.items())))
                scripted = fake.responder and fake.responder(
                    self.command, path, dict(self.headers.items())
                )
                b = (
                    scripted
                    or fake.routes.get(path)
                    or (
                        Behaviour(status=200, body=b"{}")
                        if path == "/v2/"
                        else Behaviour(status=404)
                    )
                )
                if b.stream is not None:
                    self._stream(b, head)
                    return
                time.sleep(b.stall_before_headers)
                self.send_response(b.status)
                headers = {"Content-Length": str(len(b.body)), **b.headers}
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if head:
                    return
                limit = len(b.body) if b.truncate_at is None else b.truncate_at
                sent = 0
                try:
                    while sent < limit:
                        if b.stall_after is not None and sent >= b.stall_after:
                            time.sleep(b.stall_for)
                            b_stall, b.stall_after = b.stall_after, None
                            del b_stall
                        piece = b.body[sent : min(limit, sent + b.chunk)]
                        self.wfile.write(piece)
                        self.wfile.flush()
                        sent += len(piece)
                        if b.delay_per_chunk:
                            time.sleep(b.delay_per_chunk)
                except OSError:
                    return
                if b.truncate_at is not None:
                    self.close_connection = True

            def _stream(self, b: Behaviour, head: bool) -> None:
                assert b.stream is not None
                self.send_response(b.status)
                headers = dict(b.headers)
                if b.stream_length is not None:
                    headers["Content-Length"] = str(len(b.body) + b.stream_length)
                else:
                    headers["Connection"] = "close"
                    self.close_connection = True
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if head:
                    return
                try:
                    if b.body:
                        self.wfile.write(b.body)
                    for piece in b.stream():
                        self.wfile.write(piece)
                    self.wfile.flush()
                except OSError:
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FakeUpstream:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def blob(self, repo: str, size: int, **behaviour: object) -> tuple[str, bytes]:
        """Serve size random bytes as a blob of repo; returns its digest and the bytes."""
        data = os.urandom(size)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.routes[f"/v2/{repo}/blobs/{digest}"] = Behaviour(body=data, **behaviour)  # type: ignore[arg-type]
        return digest, data

    def count(self, method: str, fragment: str) -> int:
        """How many requests with this method touched a path containing fragment."""
        return sum(1 for m, p in self.requests if m == method and fragment in p)

    def manifest(self, repo: str, tag: str, label: str, **behaviour: object) -> tuple[str, bytes]:
        """Serve a small OCI image manifest (distinct per label) under repo:tag; its digest."""
        data = (
            '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
            f'"config":{{}},"layers":[],"annotations":{{"label":"{label}"}}}}'
        ).encode()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        headers = {
            "Content-Type": "application/vnd.oci.image.manifest.v1+json",
            "Docker-Content-Digest": digest,
        }
        self.routes[f"/v2/{repo}/manifests/{tag}"] = Behaviour(
            body=data,
            headers=headers,
            **behaviour,  # type: ignore[arg-type]
        )
        return digest, data


def in_turn(
    path: str, *answers: Behaviour
) -> Callable[[str, str, dict[str, str]], Behaviour | None]:
    """A FakeUpstream.responder answering path with each behaviour in turn (the last repeats)."""
    served = [0]

    def respond(method: str, requested: str, headers: dict[str, str]) -> Behaviour | None:
        if requested != path:
            return None
        answer = answers[min(served[0], len(answers) - 1)]
        served[0] += 1
        return answer

    return respond


def bearer_only(path: str, token: str) -> Callable[[str, str, dict[str, str]], Behaviour | None]:
    """A FakeUpstream.responder for a private object: path answers 401 to any request that
    does not carry `Authorization: Bearer <token>` (the other paths go to the routes)."""
    denied = Behaviour(status=401, body=b'{"errors":[{"code":"UNAUTHORIZED"}]}')

    def respond(method: str, requested: str, headers: dict[str, str]) -> Behaviour | None:
        if requested == path and headers.get("Authorization") != f"Bearer {token}":
            return denied
        return None

    return respond
