"""Context variables that follow a request or a message through the code (and into the logs)."""

from __future__ import annotations

from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("strata_request_id", default=None)
