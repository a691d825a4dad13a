"""The error tree and the one place that renders errors.

Every error a client can see is a :class:`StrataError` subclass carrying its HTTP status and a stable code. Handlers
render them, request validation errors and unexpected exceptions as one envelope::

    {"error": {"code": "DATASET_NOT_FOUND", "message": "...", "details": [...], "request_id": "..."}}

Unexpected exceptions are handled by :class:`strata.common.observability.RequestContextMiddleware`, which logs them
once with the traceback and answers a 500 that reveals nothing of them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from .context import request_id_var

log = logging.getLogger(__name__)


class StrataError(Exception):
    """Base of every error a client may see. Subclasses set ``status`` and ``code``."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "INTERNAL_ERROR"
    default_message: ClassVar[str] = "Internal error."
    #: Commit the request's database session even though this error is raised (see ``Database.session``).
    commit_session: ClassVar[bool] = False

    def __init__(
        self,
        message: str | None = None,
        *,
        details: Sequence[Mapping[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.details = [dict(d) for d in details or ()]
        self.headers = dict(headers or {})
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class BadRequest(StrataError):
    status, code, default_message = 400, "BAD_REQUEST", "The request is not valid."


class Unauthorized(StrataError):
    status, code, default_message = 401, "UNAUTHORIZED", "Authentication is required."

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("WWW-Authenticate", "Bearer")


class Forbidden(StrataError):
    status, code, default_message = 403, "FORBIDDEN", "You may not do this."


class NotFound(StrataError):
    status, code, default_message = 404, "NOT_FOUND", "Not found."


class MethodNotAllowed(StrataError):
    status, code, default_message = 405, "METHOD_NOT_ALLOWED", "Method not allowed."


class Conflict(StrataError):
    status, code, default_message = 409, "CONFLICT", "The request conflicts with the current state."


class PayloadTooLarge(StrataError):
    status, code, default_message = 413, "PAYLOAD_TOO_LARGE", "The request body is too large."


class UnsupportedMediaType(StrataError):
    status, code, default_message = 415, "UNSUPPORTED_MEDIA_TYPE", "Unsupported media type."


class Unprocessable(StrataError):
    status, code, default_message = 422, "VALIDATION_ERROR", "The request is not valid."


class RateLimited(StrataError):
    status, code, default_message = 429, "RATE_LIMITED", "Too many requests."


class BadGateway(StrataError):
    status, code, default_message = 502, "BAD_GATEWAY", "The upstream service could not be reached."


class ServiceUnavailable(StrataError):
    status, code, default_message = 503, "SERVICE_UNAVAILABLE", "The service is not available."


class GatewayTimeout(StrataError):
    status, code, default_message = 504, "UPSTREAM_TIMEOUT", "The upstream service did not answer in time."


class RemoteError(StrataError):
    """An error answered by another service (over RPC), re-raised here with its status and code intact."""

    def __init__(self, *, status: int, code: str, message: str, details: Sequence[Mapping[str, Any]] = ()) -> None:
        super().__init__(message, details=details)
        self.status = status  # type: ignore[misc]
        self.code = code  # type: ignore[misc]


_STATUS_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    406: "NOT_ACCEPTABLE",
    409: "CONFLICT",
    411: "LENGTH_REQUIRED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "VALIDATION_ERROR",
    429: "RATE_LIMITED",
    502: "BAD_GATEWAY",
    503: "SERVICE_UNAVAILABLE",
    504: "UPSTREAM_TIMEOUT",
}


def code_for_status(status: int) -> str:
    if status in _STATUS_CODES:
        return _STATUS_CODES[status]
    try:
        return HTTPStatus(status).name
    except ValueError:
        return "ERROR"


def envelope(
    code: str, message: str, details: Sequence[Mapping[str, Any]] = (), request_id: str | None = None
) -> dict[str, Any]:
    rid = request_id if request_id is not None else request_id_var.get()
    return {"error": {"code": code, "message": message, "details": list(details), "request_id": rid}}


def error_response(
    status: int,
    code: str,
    message: str,
    details: Sequence[Mapping[str, Any]] = (),
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(envelope(code, message, details), status_code=status, headers=dict(headers or {}))


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    # The offending input is left out on purpose: it may be a password or a token.
    return [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in exc.errors()
    ]


async def _strata_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StrataError)
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def _validation_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "VALIDATION_ERROR", "The request is not valid.", _validation_details(exc))


async def _http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code < 400:
        return Response(status_code=exc.status_code, headers=exc.headers)
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return error_response(exc.status_code, code_for_status(exc.status_code), message, headers=exc.headers)


async def _database_busy_handler(request: Request, exc: Exception) -> Response:
    """An operational database error (SQLite's ``database is locked`` after its busy timeout, a PostgreSQL server at
    its connection limit or gone): the request may succeed if retried, so a 503 with ``Retry-After``, not a 500."""
    log.warning("database unavailable for %s %s: %s", request.method, request.url.path, str(exc).splitlines()[0])
    return error_response(
        503,
        "DATABASE_BUSY",
        "The service's database is busy or unreachable; retry in a moment.",
        headers={"Retry-After": "1"},
    )


def install_error_handlers(app: FastAPI) -> None:
    from sqlalchemy.exc import OperationalError

    app.add_exception_handler(OperationalError, _database_busy_handler)
    app.add_exception_handler(StrataError, _strata_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
