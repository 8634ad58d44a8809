"""LOG_FORMAT=json records and stack traces only at LOG_LEVEL=debug (app/logfmt.py)."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from app.logfmt import FIELDS, JsonFormatter, TextFormatter, make_formatter
from app.reqlog import RequestRecord


def _record(exc: bool = False, **extra: object) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise RuntimeError("disk on fire")
        except RuntimeError:
            info = sys.exc_info()
    record = logging.LogRecord(
        "oci_pull_through.x", logging.WARNING, __file__, 1, "a %s", ("b",), info
    )
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_record_is_one_object_per_line() -> None:
    line = JsonFormatter(tracebacks=False).format(_record())
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["level"] == "warn" and doc["logger"] == "oci_pull_through.x"
    assert doc["message"] == "a b" and doc["time"].endswith("Z")


def test_json_errors_carry_a_stack_only_at_debug() -> None:
    quiet = json.loads(JsonFormatter(tracebacks=False).format(_record(exc=True)))
    assert quiet["error"] == "RuntimeError: disk on fire" and "stack" not in quiet
    loud = json.loads(JsonFormatter(tracebacks=True).format(_record(exc=True)))
    assert "Traceback" in loud["stack"] and "disk on fire" in loud["stack"]


def test_text_errors_carry_a_stack_only_at_debug() -> None:
    quiet = TextFormatter(tracebacks=False).format(_record(exc=True))
    assert "Traceback" not in quiet and quiet.endswith("a b: RuntimeError: disk on fire")
    assert "Traceback" in TextFormatter(tracebacks=True).format(_record(exc=True))


def test_make_formatter_follows_the_configuration() -> None:
    assert isinstance(make_formatter("json", "info"), JsonFormatter)
    assert make_formatter("text", "debug").tracebacks is True  # type: ignore[attr-defined]


def test_request_line_has_the_same_fields_in_json(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="oci_pull_through.access"):
        for json_format in (False, True):
            record = RequestRecord(method="GET", json_format=json_format)
            record.repository, record.kind = "r.test/a", "blob"
            record.reference = "sha256:" + "a" * 64
            record.status, record.outcome, record.bytes_sent = 200, "hit", 42
            record.finish()
    records = [r for r in caplog.records if r.name == "oci_pull_through.access"]
    text, structured = records
    doc = json.loads(JsonFormatter(tracebacks=False).format(structured))
    assert structured.getMessage() == text.getMessage()
    assert text.getMessage().startswith("GET r.test/a blob sha256:aaaaaaaaaaaa 200 hit 42B ")
    assert {
        k: doc[k] for k in ("method", "repository", "kind", "reference", "status", "cache", "bytes")
    } == {
        "method": "GET",
        "repository": "r.test/a",
        "kind": "blob",
        "reference": "sha256:aaaaaaaaaaaa",
        "status": 200,
        "cache": "hit",
        "bytes": 42,
    }
    assert isinstance(doc["duration_ms"], float)
    assert getattr(structured, FIELDS)["cache"] == "hit"
