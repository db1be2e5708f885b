"""Logging set-up for every role: one line per event, with the run, customer and message ids."""

from __future__ import annotations

import logging
import sys

CONTEXT_FIELDS = ("correlation_id", "customer_id", "message_id")


class ContextFormatter(logging.Formatter):
    """Appends the context a handler attached with `extra=` (run, customer, message)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(
            f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if hasattr(record, name)
        )
        return f"{line} [{context}]" if context else line


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ContextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pika narrates every frame at INFO; its warnings are enough.
    logging.getLogger("pika").setLevel(logging.WARNING)
    # httpx logs each request URL at INFO; ours are logged where they matter.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
