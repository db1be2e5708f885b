"""Logging for every role: JSON lines or readable text, with context ids and secrets redacted."""

from __future__ import annotations

import json as jsonlib
import logging
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

CONTEXT_FIELDS = ("correlation_id", "customer_id", "message_id")
REDACTED = "***"
# Shorter values would redact ordinary words ("on", "1") everywhere; no real secret is so short.
MIN_SECRET_CHARS = 4
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: object) -> None:
    """Redact this value from every log line from now on (tokens, passwords, URLs with them).

    Accepts a str or anything with `get_secret_value()` (pydantic SecretStr); None and values
    shorter than MIN_SECRET_CHARS are ignored.
    """
    if value is None:
        return
    getter = getattr(value, "get_secret_value", None)
    text = getter() if callable(getter) else value
    if isinstance(text, str) and len(text) >= MIN_SECRET_CHARS:
        with _secrets_lock:
            _secrets.add(text)


def forget_secrets() -> None:
    """Drop every registered secret (for tests)."""
    with _secrets_lock:
        _secrets.clear()


def redact(text: str) -> str:
    """The text with every registered secret replaced by ***."""
    with _secrets_lock:
        # Longest first: a secret that contains another one is replaced whole.
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """Renders the message and the traceback once, with registered secrets replaced by ***.

    Attach it to handlers (not loggers): handler filters also see records from child loggers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            # Bad %-arguments: leave the record as it is; the handler reports the mistake.
            return True
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if isinstance(value, str):
                setattr(record, name, redact(value))
        return True


class ContextFormatter(logging.Formatter):
    """Readable text, plus the context a handler attached with `extra=` (run, customer, message)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(
            f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if hasattr(record, name)
        )
        return f"{line} [{context}]" if context else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO-8601 UTC), level, logger, message, context, exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        # ASCII escapes keep a line intact whatever the stream's encoding.
        return jsonlib.dumps(entry, default=str)


def build_handler(stream: TextIO, *, json: bool | None = None) -> logging.Handler:
    """A handler on `stream` with the redacting filter; JSON unless the stream is a terminal."""
    if json is None:
        json = not _is_tty(stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json else ContextFormatter(TEXT_FORMAT))
    handler.addFilter(RedactingFilter())
    return handler


def configure_logging(
    level: str = "INFO", json: bool | None = None, *, stream: TextIO | None = None
) -> logging.Handler:
    """Route every log record to stderr (or `stream`): JSON lines, or text on a terminal.

    `json=None` decides by `isatty()`; True/False force one format (e.g. from a setting).
    Returns the installed handler.
    """
    handler = build_handler(sys.stderr if stream is None else stream, json=json)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pika narrates every frame at INFO; its warnings are enough.
    logging.getLogger("pika").setLevel(logging.WARNING)
    # httpx logs each request URL at INFO; ours are logged where they matter.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    return handler


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False
