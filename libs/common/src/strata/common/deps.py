"""FastAPI dependencies every service uses, as ``Annotated`` aliases so routes read like signatures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from .app import Runtime
from .errors import ServiceUnavailable


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_session(runtime: RuntimeDep) -> AsyncIterator[AsyncSession]:
    """A session that commits when the route returns and rolls back when it raises: the one place that commits."""
    if runtime.db is None:
        raise ServiceUnavailable(f"{runtime.service} has no database")
    async with runtime.db.session() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]
