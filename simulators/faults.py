"""Fault injection for the simulators: latency, 503s, 429s, hanging customers and broken feeds."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(frozen=True)
class Faults:
    """What one simulator does wrong, per request, reproducibly for a seed.

    Customer sets hold SM customer ids or ShareFile subdomains; the ShareFile simulator matches a
    request on either (so one set can name the same customer for both simulators).
    """

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    # Share of requests answered 503 with the API's error body and a Retry-After header.
    error_rate: float = 0.0
    # Share of requests answered 429 with the API's error body and a Retry-After header.
    throttle_rate: float = 0.0
    retry_after_s: float = 1.0
    # Requests for these customers hang for timeout_s, then get a 504.
    timeout_customers: frozenset[str] = field(default_factory=frozenset)
    timeout_s: float = 30.0
    # ShareFile only: 200 with a body that is not JSON.
    malformed_customers: frozenset[str] = field(default_factory=frozenset)
    # ShareFile only: odata.count declares more items than the feed serves.
    truncated_customers: frozenset[str] = field(default_factory=frozenset)
    # ShareFile only: the employee feed is empty (odata.count 0).
    empty_customers: frozenset[str] = field(default_factory=frozenset)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("error_rate", "throttle_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Faults.{name} must be within [0, 1], got {value}")
        if self.error_rate + self.throttle_rate > 1.0:
            raise ValueError("Faults.error_rate + Faults.throttle_rate must not exceed 1")
        for name in ("latency_ms", "latency_jitter_ms", "retry_after_s", "timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"Faults.{name} must not be negative")
        # Accept any iterable of names from callers, but keep the frozen, hashable type.
        for name in (
            "timeout_customers",
            "malformed_customers",
            "truncated_customers",
            "empty_customers",
        ):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"Faults.{name} must be a set of names, not a string")
            if not isinstance(value, frozenset):
                object.__setattr__(self, name, frozenset(value))


_HANG_SLICE_S = 0.05


class InjectedError(NamedTuple):
    """An answer the fault injector chose instead of the real one."""

    status: int  # 429, 503 or 504
    retry_after: str | None  # the Retry-After header value, if any


def retry_after_header(seconds: float) -> str:
    """Whole seconds as RFC 9110 delta-seconds; a fractional value (fast tests) passes as-is."""
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


class FaultInjector:
    """Applies one Faults to each request, drawing from its own seeded random generator.

    Runs on the server's event loop thread only, so the generator needs no lock.
    """

    def __init__(self, faults: Faults, stopping: threading.Event | None = None) -> None:
        self.faults = faults
        self._random = random.Random(faults.seed)
        self._stopping = stopping or threading.Event()

    def matches(self, names: frozenset[str], keys: Iterable[str]) -> bool:
        return bool(names) and any(key in names for key in keys)

    async def before(self, customer_keys: Iterable[str] = ()) -> InjectedError | None:
        """Wait the injected latency, then say whether this request gets an injected error."""
        faults = self.faults
        delay_ms = faults.latency_ms
        if faults.latency_jitter_ms:
            delay_ms += self._random.uniform(0.0, faults.latency_jitter_ms)
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000.0)
        if self.matches(faults.timeout_customers, customer_keys):
            # Hang like an overloaded upstream, then answer as a gateway that gave up would.
            # Wake up in slices so that stopping the server ends the hang with a clean 503
            # instead of making shutdown cancel the request (a 500 and a logged traceback).
            deadline = asyncio.get_running_loop().time() + faults.timeout_s
            loop = asyncio.get_running_loop()
            while (left := deadline - loop.time()) > 0:
                if self._stopping.is_set():
                    return InjectedError(503, retry_after_header(faults.retry_after_s))
                await asyncio.sleep(min(left, _HANG_SLICE_S))
            return InjectedError(504, None)
        if faults.error_rate or faults.throttle_rate:
            draw = self._random.random()
            if draw < faults.error_rate:
                return InjectedError(503, retry_after_header(faults.retry_after_s))
            if draw < faults.error_rate + faults.throttle_rate:
                return InjectedError(429, retry_after_header(faults.retry_after_s))
        return None
