"""The submitter dies (or loses its broker) after Services Manager took a request, before the ack:
the redelivered request reuses its request_id, SM answers with the stored result, nothing
changes twice."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.amqp import AmqpBroker
from adapters.broker import Delivery, Outgoing
from adapters.topology import QueueSpec
from consumers.runner import Outcome
from domain.errors import TransientError
from sfsync.bootstrap import build_topology
from simulators import SimulatorServers, generate_fleet
from tests.e2e.conftest import settings_env, settings_for
from tests.reliability.conftest import (
    assert_exact_end_state,
    cycle,
    enabled_ids,
    eventually,
    wait_consuming,
)

pytestmark = [
    pytest.mark.broker,
    pytest.mark.slow,
    pytest.mark.usefixtures("earlier_leaks_collected"),
]

HOLD_LIMIT_S = 60.0


class HoldFirstAnswer:
    """An ASGI wrapper in front of the SM simulator: SM takes the first bulk POST (the state
    changes and the request is recorded), but its answer is held back until `release` — the
    reply a crash or a network cut would lose."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.recorded = threading.Event()
        self.release = threading.Event()
        self._taken = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or self._taken:
            await self.app(scope, receive, send)
            return
        self._taken = True
        answer: list[Message] = []

        async def keep(message: Message) -> None:
            answer.append(message)

        await self.app(scope, receive, keep)
        self.recorded.set()
        deadline = asyncio.get_running_loop().time() + HOLD_LIMIT_S
        while not self.release.is_set() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for message in answer:
            await send(message)


def hold_first_answer(sims: SimulatorServers) -> HoldFirstAnswer:
    # Wrap the app before the server starts: the servers are built from it in start().
    hold = HoldFirstAnswer(sims._sm_app.app)
    sims._sm_app.app = hold  # type: ignore[assignment]
    return hold


def posts_of(sims: SimulatorServers, request_id: str) -> list[bool]:
    """The `replayed` flag of every POST of one request_id, in arrival order."""
    return [s["replayed"] for s in sims.submissions() if s["request_id"] == request_id]


def test_a_submitter_killed_after_sm_took_its_request_is_answered_from_the_stored_result(
    start_sims, tmp_path, amqp_url, topology, amqp_env, processes
) -> None:
    fleet = generate_fleet(8, median_users=8, max_users=40, drift=0.2, seed=5)
    holds: list[HoldFirstAnswer] = []
    sims = start_sims(fleet, before_start=lambda s: holds.append(hold_first_answer(s)))
    [hold] = holds
    before = sims.sm_states()
    processes.env.update(settings_env(sims, tmp_path, SFSYNC_CONCURRENCY="1", **amqp_env))
    victim = processes.start("submitter")
    wait_consuming(amqp_url, topology.provisioning_queue, 1)
    settings = settings_for(sims, tmp_path, **amqp_env)

    with cycle(settings, worker=True) as run:
        run.start()
        assert hold.recorded.wait(60), "no provisioning request reached SM"
        [first] = sims.submissions()
        request_id = first["request_id"]
        customer = first["customer_id"]
        # SM has acted: the users of that request left their old state.
        assert sims.sm_states()[customer] != before[customer]
        # The submitter waits for the answer, so it cannot have acked: kill it now.
        victim.kill()
        hold.release.set()
        processes.start("submitter")
        assert run.tracker.wait(120), run.tracker.progress()
        result = run.tracker.result

    assert set(result.reports) == enabled_ids(fleet)
    assert not result.failed and not result.failed_requests
    assert posts_of(sims, request_id) == [False, True]
    assert result.answers[request_id].replayed is True
    assert_exact_end_state(sims, fleet)


class LosesFirstAnswer:
    """A RabbitMQ broker whose connection seems to drop when the submitter first publishes
    SM's answer: the POST is done, the outcome is not confirmed, the runner must requeue."""

    def __init__(self, inner: AmqpBroker) -> None:
        self.inner = inner
        self.lost: list[str] = []

    def start(self) -> None:
        self.inner.start()

    def publish(self, messages: Sequence[Outgoing]) -> None:
        self.inner.publish(messages)

    def publish_async(self, messages: Sequence[Outgoing]) -> Future[None]:
        if not self.lost and any(m.type == "provisioning.completed" for m in messages):
            self.lost.append(messages[0].correlation_id)
            lost: Future[None] = Future()
            lost.set_exception(TransientError("connection to RabbitMQ lost", call="publish"))
            return lost
        return self.inner.publish_async(messages)

    def consume(
        self, queue: QueueSpec, on_delivery: Callable[[Delivery], None], prefetch: int
    ) -> None:
        self.inner.consume(queue, on_delivery, prefetch)

    def cancel(self, queue: str) -> None:
        self.inner.cancel(queue)

    def close(self) -> None:
        self.inner.close()


def test_a_lost_confirm_after_the_post_requeues_and_the_retry_is_a_replay(
    start_sims, tmp_path, amqp_url, amqp_env
) -> None:
    fleet = generate_fleet(8, median_users=8, max_users=40, drift=0.2, seed=5)
    sims = start_sims(fleet)
    settings = settings_for(sims, tmp_path, **amqp_env)
    broker = LosesFirstAnswer(AmqpBroker([amqp_url], build_topology(settings), name="flaky"))
    broker.start()
    try:
        with cycle(settings, worker=True, submitter=True, overrides={"broker": broker}) as run:
            run.start()
            assert run.tracker.wait(120), run.tracker.progress()
            submitter = run.roles.consumers[-1]
            eventually(lambda: submitter.runner.counts[Outcome.ACKED] >= 1)
            counts: dict[Any, int] = dict(submitter.runner.counts)
            result = run.tracker.result
    finally:
        broker.close()

    assert broker.lost, "the submitter never published an answer"
    assert counts.get(Outcome.REQUEUED) == 1
    [replayed] = [a for a in result.answers.values() if a.replayed]
    assert posts_of(sims, replayed.request_id) == [False, True]
    assert set(result.reports) == enabled_ids(fleet)
    assert not result.failed and not result.failed_requests
    assert_exact_end_state(sims, fleet)
