"""Keep pika's connection alive through a header timestamp that `datetime` cannot hold.

AMQP's field-table timestamp ('T') is any unsigned 64-bit number of seconds, and RabbitMQ passes
it on unchecked. pika 1.4.4 (the newest release) decodes it with an unguarded
`datetime.fromtimestamp`, so a millisecond epoch, or a time before 1970 as the RabbitMQ Java
client writes it (a signed long), raises inside pika's frame decoder. pika reports that as a lost
connection: every message in flight on it comes back, the one with the header first, and the
consumer dies again on it until the queue's delivery limit parks it. One header written by another
system on the shared exchange would stall a worker this way.

pika fixed this upstream (pika/pika#1698, pull request #1699: the raw number of seconds is
decoded instead) after 1.4.4. Until a release carries it, `install()` puts the same guard in
front of pika's decoder; it checks pika's own decoder first and does nothing once pika no longer
fails, so upgrading pika retires it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pika.data

_TIMESTAMP = b"T"
_OUT_OF_RANGE = 2**63  # year ~292 billion: no datetime holds it, nor pika's signed 64-bit int
# pika's own decoder, as imported (before install() guards it).
PIKA_DECODE_VALUE: Callable[[bytes, int], tuple[Any, int]] = pika.data.decode_value


def decode_timestamp(encoded: bytes, offset: int) -> tuple[datetime | int, int]:
    """The 'T' value at `offset` (just after its type byte): a datetime, or its raw seconds.

    Raw seconds from 2**63 up are read as the signed number a Java client meant (a time before
    1970): pika writes an int back as a signed 64-bit value, and cannot write a larger one, so a
    retry or parking copy of the message would fail to publish.
    """
    (seconds,) = struct.unpack_from(">Q", encoded, offset)
    if seconds >= _OUT_OF_RANGE:
        return seconds - 2**64, offset + 8
    try:
        return datetime.fromtimestamp(seconds, UTC), offset + 8
    except (ValueError, OverflowError, OSError):
        return seconds, offset + 8


def guarded_decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
    """pika's `decode_value`, with timestamps decoded by `decode_timestamp`."""
    if encoded[offset : offset + 1] == _TIMESTAMP:
        return decode_timestamp(encoded, offset + 1)
    return PIKA_DECODE_VALUE(encoded, offset)


def pika_fails_on_them() -> bool:
    """Whether pika's own decoder raises on an out-of-range header timestamp."""
    try:
        PIKA_DECODE_VALUE(_TIMESTAMP + struct.pack(">Q", _OUT_OF_RANGE), 0)
    except (ValueError, OverflowError, OSError):
        return True
    return False


def install() -> None:
    """Guard pika's decoder, once per process, if it still fails on such timestamps.

    pika's table and array decoders look `decode_value` up in their module each time, so nested
    tables (x-death, for one) are guarded too.
    """
    if pika_fails_on_them():
        pika.data.decode_value = guarded_decode_value
