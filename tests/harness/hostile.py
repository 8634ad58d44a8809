"""A registry that sends what no real one would: huge bodies, lying lengths, endless drips.

Bodies are generated as they are sent, so a 300 MiB answer costs the test nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MIB = 1024 * 1024


@dataclass
class Answer:
    """One path's answer: status, headers, and a body of size bytes sent in chunks."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    size: int = 0
    chunked: bool = False  # Transfer-Encoding: chunked (any Content-Length header is a lie)
    chunk: int = MIB
    delay: float = 0.0  # seconds between chunks


class HostileUpstream:
    """A threaded HTTP server on 127.0.0.1 that records when each answer stopped and why."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.requests: list[tuple[str, str]] = []
        self.finished: list[tuple[str, int, bool]] = []  # (path, bytes sent, completed)
        hostile = self

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
                hostile.requests.append((self.command, self.path))
                a = hostile.answers.get(path) or (Answer(200) if path == "/v2/" else Answer(404))
                self.send_response(a.status)
                headers = dict(a.headers)
                if a.chunked:
                    headers["Transfer-Encoding"] = "chunked"
                else:
                    headers.setdefault("Content-Length", str(a.size))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if head:
                    return
                sent = 0
                try:
                    for piece in _pieces(a):
                        if a.chunked:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        else:
                            self.wfile.write(piece)
                        self.wfile.flush()
                        sent += len(piece)
                        if a.delay:
                            time.sleep(a.delay)
                    if a.chunked:
                        self.wfile.write(b"0\r\n\r\n")
                        self.wfile.flush()
                except OSError:
                    hostile.finished.append((path, sent, False))
                    self.close_connection = True
                    return
                hostile.finished.append((path, sent, True))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HostileUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


def _pieces(a: Answer) -> Iterator[bytes]:
    block = b"x" * a.chunk
    left = a.size
    while left > 0:
        piece = block[: min(left, a.chunk)]
        left -= len(piece)
        yield piece


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")
