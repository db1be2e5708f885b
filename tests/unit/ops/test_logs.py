"""Structured logs: JSON lines off a terminal, text on one, context ids kept, secrets redacted."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import SecretStr

from sfsync.logs import build_handler, configure_logging, forget_secrets, register_secret

TOKEN = "sm-T0KEN-5e1f0a77"


@pytest.fixture(autouse=True)
def no_registered_secrets() -> Iterator[None]:
    forget_secrets()
    yield
    forget_secrets()


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class Capture:
    """A logger whose records go only to one handler over a StringIO."""

    def __init__(self, *, json_lines: bool | None) -> None:
        self.stream = io.StringIO()
        self.logger = logging.getLogger(f"sfsync.test.{id(self)}")
        self.logger.handlers[:] = [build_handler(self.stream, json=json_lines)]
        self.logger.propagate = False
        self.logger.setLevel(logging.DEBUG)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines()]


def test_json_line_has_time_level_logger_message_and_context() -> None:
    capture = Capture(json_lines=True)
    capture.logger.info(
        "planned %d actions",
        3,
        extra={"correlation_id": "run-1", "customer_id": "cust-7", "message_id": "m-1"},
    )
    [record] = capture.records()
    assert record["level"] == "INFO"
    assert record["logger"] == capture.logger.name
    assert record["message"] == "planned 3 actions"
    assert (record["correlation_id"], record["customer_id"], record["message_id"]) == (
        "run-1",
        "cust-7",
        "m-1",
    )
    logged_at = datetime.fromisoformat(record["time"])
    assert logged_at.utcoffset() == UTC.utcoffset(None)
    assert abs((datetime.now(UTC) - logged_at).total_seconds()) < 60


def test_json_line_leaves_out_context_that_is_absent() -> None:
    capture = Capture(json_lines=True)
    capture.logger.warning("no context here", extra={"customer_id": "cust-7"})
    [record] = capture.records()
    assert record["customer_id"] == "cust-7"
    assert "correlation_id" not in record and "message_id" not in record
    assert "exc_info" not in record


def test_each_record_is_exactly_one_line_even_with_newlines_and_a_traceback() -> None:
    capture = Capture(json_lines=True)
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        capture.logger.exception("handler crashed\nbadly")
    capture.logger.info("after")
    first, second = capture.records()
    assert first["message"] == "handler crashed\nbadly"
    assert first["level"] == "ERROR"
    assert isinstance(first["exc_info"], str)
    assert "Traceback" in first["exc_info"] and "ValueError: bad" in first["exc_info"]
    assert second["message"] == "after"


def test_text_format_keeps_the_readable_style_with_context_in_brackets() -> None:
    capture = Capture(json_lines=False)
    capture.logger.info("hello", extra={"correlation_id": "run-1", "customer_id": "cust-7"})
    line = capture.text.strip()
    assert " INFO    " in line
    assert line.endswith("hello [correlation_id=run-1 customer_id=cust-7]")


def test_registered_secrets_are_redacted_in_message_arguments_context_and_traceback() -> None:
    register_secret(TOKEN)
    capture = Capture(json_lines=True)
    try:
        raise RuntimeError(f"401 for token {TOKEN}")
    except RuntimeError:
        capture.logger.exception(
            "calling with Bearer %s failed", TOKEN, extra={"customer_id": f"x{TOKEN}"}
        )
    assert TOKEN not in capture.text
    [record] = capture.records()
    assert record["message"] == "calling with Bearer *** failed"
    assert record["customer_id"] == "x***"
    assert "401 for token ***" in record["exc_info"]


def test_secrets_are_redacted_in_text_logs_and_accepted_as_secret_str() -> None:
    register_secret(SecretStr("p4ssw0rd-42"))
    capture = Capture(json_lines=False)
    capture.logger.warning("amqp://user:p4ssw0rd-42@rabbit/ refused")
    assert "p4ssw0rd-42" not in capture.text
    assert "amqp://user:***@rabbit/ refused" in capture.text


def test_the_longest_secret_is_replaced_whole() -> None:
    register_secret("abcd")
    register_secret("abcd-efgh-ijkl")
    capture = Capture(json_lines=True)
    capture.logger.info("abcd-efgh-ijkl and abcd")
    assert capture.records()[0]["message"] == "*** and ***"


def test_empty_and_tiny_values_are_not_treated_as_secrets() -> None:
    register_secret(None)
    register_secret("")
    register_secret("on")
    capture = Capture(json_lines=True)
    capture.logger.info("logging stays on")
    assert capture.records()[0]["message"] == "logging stays on"


def test_configure_logging_writes_json_when_the_stream_is_not_a_terminal(
    restore_root_logger: None,
) -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    logging.getLogger("sfsync.any").debug("to json", extra={"message_id": "m-9"})
    record = json.loads(stream.getvalue())
    assert record["message"] == "to json" and record["message_id"] == "m-9"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_configure_logging_writes_text_on_a_terminal_unless_json_is_forced(
    restore_root_logger: None,
) -> None:
    terminal = FakeTerminal()
    configure_logging("INFO", stream=terminal)
    logging.getLogger("sfsync.any").info("for people")
    assert terminal.getvalue().rstrip().endswith("sfsync.any: for people")

    forced = FakeTerminal()
    configure_logging("INFO", json=True, stream=forced)
    logging.getLogger("sfsync.any").info("for machines")
    assert json.loads(forced.getvalue())["message"] == "for machines"


def test_configure_logging_redacts_records_of_every_logger(restore_root_logger: None) -> None:
    register_secret(TOKEN)
    stream = io.StringIO()
    configure_logging("INFO", json=True, stream=stream)
    logging.getLogger("adapters.services_manager").warning("token %s rejected", TOKEN)
    assert TOKEN not in stream.getvalue()
    assert json.loads(stream.getvalue())["message"] == "token *** rejected"
