"""Log record formats: LOG_FORMAT=text or json; stack traces only at LOG_LEVEL=debug."""

from __future__ import annotations

import datetime
import json
import logging

_TEXT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_LEVEL_NAMES = {"WARNING": "warn", "CRITICAL": "error"}
# Set on a record (extra={"fields": {...}}) to log structured fields, e.g. the request line.
FIELDS = "fields"


def _error_summary(record: logging.LogRecord) -> str | None:
    """The exception of a record as one line: its type and message."""
    if not record.exc_info or record.exc_info[1] is None:
        return None
    exc = record.exc_info[1]
    return f"{type(exc).__name__}: {exc}"


class TextFormatter(logging.Formatter):
    """One line per record; a traceback only when tracebacks are wanted (debug)."""

    def __init__(self, tracebacks: bool) -> None:
        super().__init__(_TEXT)
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        """The classic line, with the error summarised unless at debug."""
        if self.tracebacks or not record.exc_info:
            return super().format(record)
        summary = _error_summary(record)
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            line = super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        return f"{line}: {summary}" if summary else line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, structured fields, error."""

    def __init__(self, tracebacks: bool) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        """Serialise the record; an exception becomes "error", plus "stack" at debug."""
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        level = _LEVEL_NAMES.get(record.levelname, record.levelname.lower())
        doc: dict[str, object] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": level,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            doc.update(fields)
        summary = _error_summary(record)
        if summary:
            doc["error"] = summary
            if self.tracebacks:
                doc["stack"] = self.formatException(record.exc_info)  # type: ignore[arg-type]
        if self.tracebacks and record.stack_info:
            doc["stack"] = record.stack_info
        return json.dumps(doc, default=str)


def make_formatter(log_format: str, level: str) -> logging.Formatter:
    """The formatter for LOG_FORMAT at LOG_LEVEL."""
    tracebacks = level == "debug"
    return JsonFormatter(tracebacks) if log_format == "json" else TextFormatter(tracebacks)
