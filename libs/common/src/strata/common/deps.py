"""FastAPI dependencies every service uses, as ``Annotated`` aliases so routes read like signatures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy.ext.asyncio import AsyncSession

from .auth import check_role
from .contracts.auth import Identity, Role
from .errors import ServiceUnavailable

if TYPE_CHECKING:
    from .app import Runtime

TOKEN_URL = "/api/v1/auth/token"  # noqa: S105 (a path, not a secret)
# Declares the OAuth2 password flow in every service's OpenAPI (Swagger UI's Authorize button); we read the header
# ourselves so that every failure gets our error envelope.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl=TOKEN_URL, auto_error=False)


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.state.runtime
    return runtime


RuntimeDep = Annotated["Runtime", Depends(get_runtime)]


async def get_session(runtime: RuntimeDep) -> AsyncIterator[AsyncSession]:
    """A session that commits when the route returns and rolls back when it raises: the one place that commits."""
    if runtime.db is None:
        raise ServiceUnavailable(f"{runtime.service} has no database")
    async with runtime.db.session() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


async def current_identity(
    request: Request, runtime: RuntimeDep, _token: Annotated[str | None, Depends(oauth2_scheme)]
) -> Identity:
    """The caller, verified here (a service reached directly is as closed as through the gateway)."""
    return await runtime.verifier.verify_header(request.headers.get("authorization"))


CurrentUser = Annotated[Identity, Depends(current_identity)]


def require_role(minimum: Role) -> Callable[[Identity], Awaitable[Identity]]:
    """A dependency that lets only ``minimum`` and stronger roles through (403 otherwise)."""

    async def dependency(identity: CurrentUser) -> Identity:
        return check_role(identity, minimum)

    dependency.__name__ = f"require_{minimum.value}"
    return dependency


AnalystUser = Annotated[Identity, Depends(require_role(Role.analyst))]
AdminUser = Annotated[Identity, Depends(require_role(Role.admin))]
