"""Typed request-reply over core NATS: ``rpc.<service>.<verb>``, queue group = the service, so replicas share load.

Replies are ``{"ok": true, "data": {...}}`` or ``{"ok": false, "error": {"status", "code", "message", "details"}}``.
A :class:`~strata.common.errors.StrataError` raised by a handler reaches the caller as a
:class:`~strata.common.errors.RemoteError` with the same status and code; a timeout is a ``GatewayTimeout`` (504) and a
missing service a ``ServiceUnavailable`` (503). Trace context and the request id travel in the headers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from opentelemetry import trace
from pydantic import BaseModel, ValidationError

from . import tracing
from .context import request_id_var
from .errors import GatewayTimeout, RemoteError, ServiceUnavailable, StrataError, Unprocessable
from .events import Bus

log = logging.getLogger(__name__)

Req = TypeVar("Req", bound=BaseModel)
Res = TypeVar("Res", bound=BaseModel)


def rpc_subject(service: str, verb: str) -> str:
    return f"rpc.{service}.{verb}"


@dataclass(frozen=True)
class _Route:
    verb: str
    request_model: type[BaseModel]
    handler: Callable[[Any], Awaitable[BaseModel]]


class RpcServer:
    """Answers ``rpc.<service>.<verb>`` requests. Each request runs in its own task (bounded), so one slow request does
    not hold up the subscription."""

    def __init__(self, bus: Bus, *, service: str, max_concurrency: int = 64) -> None:
        self.bus = bus
        self.service = service
        self._routes: dict[str, _Route] = {}
        self._subs: list[Any] = []
        self._sem = asyncio.Semaphore(max_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._tracer = tracing.tracer("strata.rpc")
        self.on_request: Callable[[str, str, float], None] | None = None

    def register(self, verb: str, request_model: type[Req], handler: Callable[[Req], Awaitable[BaseModel]]) -> None:
        self._routes[verb] = _Route(verb, request_model, handler)

    async def start(self) -> None:
        """Subscribe every registered verb. Core subscriptions survive reconnects on their own."""
        for verb in self._routes:
            sub = await self.bus.nc.subscribe(rpc_subject(self.service, verb), queue=self.service, cb=self._dispatch)
            self._subs.append(sub)

    async def stop(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is already gone
                log.debug("rpc unsubscribe failed", exc_info=True)
        self._subs.clear()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    async def _dispatch(self, msg: Any) -> None:
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Any) -> None:
        verb = msg.subject.rsplit(".", 1)[-1]
        route = self._routes.get(verb)
        headers = dict(msg.headers or {})
        token = request_id_var.set(headers.get("X-Request-ID"))
        start = time.perf_counter()
        outcome = "ok"
        try:
            async with self._sem:
                with self._tracer.start_as_current_span(
                    f"rpc {msg.subject}", context=tracing.extract(headers), kind=trace.SpanKind.SERVER
                ):
                    if route is None:
                        raise StrataError(f"unknown verb {verb}")
                    try:
                        request = route.request_model.model_validate_json(msg.data)
                    except ValidationError as exc:
                        raise Unprocessable(
                            "The RPC request is not valid.",
                            details=[{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()],
                        ) from None
                    result = await route.handler(request)
                    body = b'{"ok":true,"data":' + result.model_dump_json().encode() + b"}"
        except StrataError as exc:
            outcome = exc.code
            body = json.dumps({"ok": False, "error": {"status": exc.status, **exc.to_dict()}}).encode()
        except Exception:
            outcome = "INTERNAL_ERROR"
            log.exception("rpc %s failed", msg.subject)
            body = json.dumps(
                {
                    "ok": False,
                    "error": {"status": 500, "code": "INTERNAL_ERROR", "message": "Internal error.", "details": []},
                }
            ).encode()
        finally:
            request_id_var.reset(token)
        if self.on_request is not None:
            self.on_request(verb, outcome, time.perf_counter() - start)
        if msg.reply:
            try:
                await msg.respond(body)
            except Exception:  # the caller's connection went away
                log.debug("rpc reply to %s failed", msg.subject, exc_info=True)


class RpcClient:
    def __init__(self, bus: Bus, *, default_timeout_s: float = 2.0) -> None:
        self.bus = bus
        self.default_timeout_s = default_timeout_s

    async def call(
        self,
        service: str,
        verb: str,
        request: BaseModel,
        response_model: type[Res],
        *,
        timeout_s: float | None = None,
    ) -> Res:
        subject = rpc_subject(service, verb)
        headers: dict[str, str] = {}
        tracing.inject(headers)
        if rid := request_id_var.get():
            headers["X-Request-ID"] = rid
        timeout = timeout_s if timeout_s is not None else self.default_timeout_s
        try:
            reply = await self.bus.nc.request(
                subject, request.model_dump_json().encode(), timeout=timeout, headers=headers
            )
        except NoRespondersError:
            raise ServiceUnavailable(f"The {service} service is not available.") from None
        except (NatsTimeoutError, TimeoutError):
            raise GatewayTimeout(f"The {service} service did not answer in {timeout:g}s.") from None
        try:
            body = json.loads(reply.data)
        except ValueError:
            raise RemoteError(status=502, code="BAD_GATEWAY", message=f"{subject} answered garbage.") from None
        if body.get("ok"):
            return response_model.model_validate(body.get("data"))
        err = body.get("error") or {}
        raise RemoteError(
            status=int(err.get("status", 502)),
            code=str(err.get("code", "BAD_GATEWAY")),
            message=str(err.get("message", "")),
            details=err.get("details") or [],
        )
