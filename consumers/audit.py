"""The audit role's handler: store every event it is given; publish nothing."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from domain.errors import SfsyncError
from domain.messages import Envelope

log = logging.getLogger("sfsync.audit")


class AuditSink(Protocol):
    def record(self, message: Envelope[Any]) -> bool:
        """Store one event; False if its message_id is stored already. TransientError when the
        database cannot be reached (the runner retries the message later)."""
        ...


@dataclass
class AuditHandler:
    store: AuditSink

    def handle(self, message: Envelope[Any]) -> Sequence[Envelope[Any]]:
        stored = self.store.record(message)
        if not stored:
            log.debug(
                "%s already in the audit trail",
                message.type,
                extra={
                    "correlation_id": message.correlation_id,
                    "message_id": str(message.message_id),
                },
            )
        return []

    def on_give_up(self, message: Envelope[Any], error: SfsyncError) -> Sequence[Envelope[Any]]:
        # The message is parked in <prefix>.audit.dead, from where an operator can replay it.
        return []
