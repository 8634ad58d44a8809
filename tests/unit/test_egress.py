"""app/egress.py, app/ratelimit.py, app/upstreamauth.py: retries, NO_PROXY, rate limits, auth."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from collections.abc import Iterator

import pytest

from app import ratelimit
from app.config import TRANSPARENT, Config
from app.egress import Egress, bypasses
from app.errors import UpstreamUnavailable
from app.upstream import ClientHeaders, Upstream
from app.upstreamauth import parse, registry_key


class Scripted(http.server.BaseHTTPRequestHandler):
    """Answers from a list of (status, headers, body), one per request; the last repeats."""

    protocol_version = "HTTP/1.1"
    script: list[tuple[int, dict[str, str], bytes]] = []
    seen: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        Scripted.seen.append(self.path)
        status, headers, body = self.script[min(len(self.seen) - 1, len(self.script) - 1)]
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Transfer-Encoding" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if "Transfer-Encoding" in headers:
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        else:
            self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[str]:
    Scripted.seen = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def get(registry: str, method: str = "GET") -> int:
    config = Config(
        proxy_mode=TRANSPARENT, insecure_registries=frozenset({registry}), upstream_read_timeout=5
    )
    response = Upstream(config).send(method, registry, "/v2/x/manifests/v1", ClientHeaders())
    with response:
        return response.status_code


OK = (200, {}, b"{}")


@pytest.mark.parametrize(
    "first",
    [
        (503, {}, b"busy"),
        (502, {}, b""),
        (504, {}, b""),
        (429, {"Retry-After": "1"}, b"slow down"),
    ],
)
def test_retried_once_then_success(server: str, first: tuple[int, dict[str, str], bytes]) -> None:
    Scripted.script = [first, OK]
    started = time.monotonic()
    assert get(server) == 200
    assert len(Scripted.seen) == 2
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    "answer",
    [
        (429, {}, b""),  # no Retry-After
        (429, {"Retry-After": "3600"}, b""),  # longer than the cap: passed on at once
        (503, {"Retry-After": "3600"}, b""),
        (503, {"Transfer-Encoding": "chunked"}, b"x"),  # no length: never drained
        (500, {}, b""),
        (404, {}, b""),
    ],
)
def test_not_retried(server: str, answer: tuple[int, dict[str, str], bytes]) -> None:
    Scripted.script = [answer, OK]
    assert get(server) == answer[0]
    assert len(Scripted.seen) == 1


def test_retries_are_bounded(server: str) -> None:
    Scripted.script = [(503, {}, b"")]
    started = time.monotonic()
    assert get(server) == 503
    assert len(Scripted.seen) == 3
    assert time.monotonic() - started < 5


def test_connect_error_is_retried_then_502() -> None:
    with pytest.raises(UpstreamUnavailable):
        get("127.0.0.1:9")  # discard: nothing listens


def test_no_proxy_rules() -> None:
    rules = ("localhost", ".corp.example", "10.0.0.0/8", "reg.test:5000", "[::1]")
    assert bypasses("localhost", 443, rules)
    assert bypasses("a.corp.example", 443, rules) and bypasses("corp.example", 443, rules)
    assert not bypasses("corp.example.evil", 443, rules)
    assert bypasses("10.1.2.3", 80, rules) and not bypasses("11.1.2.3", 80, rules)
    assert bypasses("reg.test", 5000, rules) and not bypasses("reg.test", 443, rules)
    assert bypasses("[::1]", 443, rules)
    assert bypasses("anything", 1, ("*",))
    egress = Egress("http://p:3128", "http://p:3129", ("no.test",))
    assert egress.proxy_for("https://x.test/v2/") == "http://p:3129"
    assert egress.proxy_for("http://x.test/v2/") == "http://p:3128"
    assert egress.proxy_for("https://no.test/v2/") is None


def test_rate_limit_reserve() -> None:
    ratelimit.reset()
    ratelimit.configure(0.10)
    ratelimit.observe(
        "hub.test", {"RateLimit-Limit": "100;w=21600", "RateLimit-Remaining": "10;w=21600"}
    )
    assert not ratelimit.reserve_reached("hub.test")  # 10 is not below 10 % of 100
    ratelimit.observe(
        "hub.test", {"RateLimit-Limit": "100;w=21600", "RateLimit-Remaining": "9;w=21600"}
    )
    assert ratelimit.reserve_reached("hub.test")
    assert not ratelimit.reserve_reached("other.test")
    ratelimit.observe("hub.test", {"RateLimit-Limit": "100;w=0", "RateLimit-Remaining": "1;w=0"})
    assert not ratelimit.reserve_reached("hub.test")  # the window has reset
    ratelimit.observe("hub.test", {"RateLimit-Limit": "junk", "RateLimit-Remaining": "1"})
    assert not ratelimit.reserve_reached("hub.test")
    ratelimit.configure(0.0)
    ratelimit.observe("hub.test", {"RateLimit-Limit": "100", "RateLimit-Remaining": "0"})
    assert not ratelimit.reserve_reached("hub.test")
    ratelimit.configure(0.10)
    ratelimit.reset()


def test_rate_limit_state_is_bounded() -> None:
    ratelimit.reset()
    for i in range(ratelimit.MAX_REGISTRIES + 50):
        ratelimit.observe(f"r{i}.test", {"RateLimit-Limit": "100", "RateLimit-Remaining": "1"})
    assert len(ratelimit._budgets) == ratelimit.MAX_REGISTRIES
    ratelimit.reset()


def test_auth_file_formats_and_docker_hub_keys() -> None:
    auth = base64.b64encode(b"u:p:with:colons").decode()
    document = {
        "auths": {
            "https://index.docker.io/v1/": {"auth": auth},
            "ghcr.io": {"username": "g", "password": "q"},
            "quay.io:443": {"identitytoken": "refresh"},
        }
    }
    found = parse(json.dumps(document).encode())
    assert found["docker.io"].username == "u" and found["docker.io"].password == "p:with:colons"
    assert found["ghcr.io"].basic() == base64.b64encode(b"g:q").decode()
    assert found["quay.io:443"].identity_token == "refresh"
    for key in (
        "docker.io",
        "index.docker.io",
        "registry-1.docker.io",
        "https://index.docker.io/v1/",
    ):
        assert registry_key(key) == "docker.io"


@pytest.mark.parametrize(
    "text",
    [b"nope", b"{}", b'{"auths": {"x.test": {"auth": "!!"}}}', b'{"auths": {"x.test": {}}}'],
)
def test_bad_auth_files_are_refused(text: bytes) -> None:
    with pytest.raises(ValueError):
        parse(text)
