"""The submitter's handler: post one bulk request, report what Services Manager answered."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from domain.errors import InvalidMessage, SfsyncError
from domain.messages import (
    Envelope,
    ProvisioningCompleted,
    ProvisioningFailed,
    ProvisioningRequested,
    Stamper,
)
from domain.ports import ServicesManagerPort

log = logging.getLogger("sfsync.submitter")


def _request_of(message: Envelope[Any]) -> ProvisioningRequested:
    if not isinstance(message.payload, ProvisioningRequested):
        raise InvalidMessage(f"the provisioning queue does not take {message.type} messages")
    return message.payload


@dataclass
class SubmitHandler:
    sm: ServicesManagerPort
    stamp: Stamper

    def handle(self, message: Envelope[Any]) -> Sequence[Envelope[Any]]:
        request = _request_of(message)
        # The request_id is derived from the content: a redelivered message posts the same id
        # and Services Manager answers with the stored result instead of acting twice.
        result = self.sm.submit(request.customer_id, request.request_id, request.items)
        rejected = sum(1 for item in result.items if item.status == "rejected")
        log.info(
            "request %s: %d accepted, %d rejected%s",
            request.request_id,
            len(result.items) - rejected,
            rejected,
            " (replayed)" if result.replayed else "",
            extra={"correlation_id": request.run_id, "customer_id": request.customer_id},
        )
        answer = ProvisioningCompleted(
            customer_id=request.customer_id,
            run_id=request.run_id,
            request_id=request.request_id,
            items=result.items,
            replayed=result.replayed,
        )
        return [self.stamp(answer, correlation_id=request.run_id)]

    def on_give_up(self, message: Envelope[Any], error: SfsyncError) -> Sequence[Envelope[Any]]:
        try:
            request = _request_of(message)
        except InvalidMessage:
            return []
        failed = ProvisioningFailed(
            customer_id=request.customer_id,
            run_id=request.run_id,
            request_id=request.request_id,
            error=str(error),
            items=request.items,
        )
        return [self.stamp(failed, correlation_id=request.run_id)]
