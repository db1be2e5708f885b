"""One error hierarchy for the service: what failed, for which customer, whether to retry."""

from __future__ import annotations


class SfsyncError(Exception):
    """Base of every error sfsync raises on purpose.

    `call` names the operation (e.g. ``GET sharefile Accounts/Employees``), `customer_id` the
    customer it was for, and `detail` what the other side said. None of them may carry a secret.
    """

    def __init__(
        self,
        detail: str,
        *,
        customer_id: str | None = None,
        call: str | None = None,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        self.detail = detail
        self.customer_id = customer_id
        self.call = call
        self.status = status
        self.code = code
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.customer_id:
            parts.append(f"customer {self.customer_id}")
        if self.call:
            parts.append(self.call)
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        if self.code:
            parts.append(self.code)
        where = ", ".join(parts)
        return f"{where}: {self.detail}" if where else self.detail


class TransientError(SfsyncError):
    """Worth trying again later: timeouts, 5xx, 429, a broker that went away."""


class PermanentError(SfsyncError):
    """Trying again cannot help: bad input, 400/403/404/409, a customer that does not exist."""


class InvalidMessage(PermanentError):
    """A message body that is not JSON, has an unknown type or version, or fails its schema."""


class ConfigError(SfsyncError):
    """Settings or files that sfsync cannot start with."""
