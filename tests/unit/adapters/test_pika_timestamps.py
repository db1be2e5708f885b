"""Header timestamps out of datetime's range decode to their seconds instead of raising."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pika.data
import pytest

import adapters.amqp  # noqa: F401  (importing the broker installs the guard)
from adapters import pika_timestamps

MILLISECONDS = 1_772_000_000_000
JAVA_1969 = 2**64 - 14_256_000  # 1969-07-20 as a signed long, read back unsigned


def timestamp(value: int) -> bytes:
    return b"T" + struct.pack(">Q", value)


def table(entries: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(bytes([len(key)]) + key + value for key, value in entries)
    return struct.pack(">I", len(body)) + body


def test_pika_itself_still_fails_on_them_so_the_guard_is_installed() -> None:
    """When this fails, a pika release has the fix: drop adapters/pika_timestamps.py."""
    assert pika_timestamps.pika_fails_on_them()
    with pytest.raises(ValueError):
        pika_timestamps.PIKA_DECODE_VALUE(timestamp(MILLISECONDS), 0)
    assert pika.data.decode_value is pika_timestamps.guarded_decode_value


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        (MILLISECONDS, MILLISECONDS),
        (2**63 - 1, 2**63 - 1),
        (JAVA_1969, -14_256_000),
        (2**64 - 1, -1),
    ],
)
def test_an_out_of_range_timestamp_decodes_to_its_seconds_as_a_signed_number(
    raw: int, seconds: int
) -> None:
    assert pika.data.decode_value(timestamp(raw), 0) == (seconds, 9)


@pytest.mark.parametrize("raw", [MILLISECONDS, JAVA_1969, 2**64 - 1, 1_772_000_000])
def test_a_decoded_timestamp_header_can_be_published_again(raw: int) -> None:
    # The runner copies a message's headers into its retry and parking copies: a value pika
    # cannot encode would fail those publishes (an int of 2**63 or more: struct.error).
    headers, _ = pika.data.decode_table(table([(b"sent", timestamp(raw))]), 0)
    pieces: list[bytes] = []
    pika.data.encode_table(pieces, headers)
    again, _ = pika.data.decode_table(b"".join(pieces), 0)
    assert again == headers


def test_a_timestamp_in_range_is_still_a_datetime() -> None:
    value, offset = pika.data.decode_value(timestamp(1_772_000_000), 0)
    assert value == datetime(2026, 2, 25, 6, 13, 20, tzinfo=UTC)
    assert offset == 9


def test_nested_tables_and_arrays_are_guarded_and_other_values_decode_as_before() -> None:
    inner = table([(b"time", timestamp(MILLISECONDS)), (b"count", b"l" + struct.pack(">q", 3))])
    array_body = timestamp(JAVA_1969) + b"S" + struct.pack(">I", 2) + b"ok"
    headers = table(
        [
            (b"x-death", b"A" + struct.pack(">I", len(b"F" + inner)) + b"F" + inner),
            (b"list", b"A" + struct.pack(">I", len(array_body)) + array_body),
            (b"sent", timestamp(1_772_000_000)),
        ]
    )
    decoded, offset = pika.data.decode_table(headers, 0)
    assert offset == len(headers)
    assert decoded["x-death"] == [{"time": MILLISECONDS, "count": 3}]
    assert decoded["list"] == [-14_256_000, "ok"]
    assert decoded["sent"] == datetime.fromtimestamp(1_772_000_000, UTC)


def test_installing_twice_guards_once() -> None:
    guarded = pika.data.decode_value
    pika_timestamps.install()
    assert pika.data.decode_value is guarded
