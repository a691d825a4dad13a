"""``create_app(settings)``: the auth service's FastAPI app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from strata.common.app import Runtime, create_service_app
from strata.common.contracts.auth import ApiKeyLookup, Identity, Jwks, JwksRequest
from strata.common.observability import Metrics

from . import service
from .api import router
from .config import Settings
from .models import Outbox, ProcessedEvent

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = Runtime(
        settings,
        metrics=Metrics(settings.service_name),
        migrations=MIGRATIONS,
        outbox_model=Outbox,
        processed_model=ProcessedEvent,
    )
    assert runtime.db is not None
    db = runtime.db
    tasks: list[asyncio.Task[None]] = []

    async def local_jwks() -> dict[str, Any]:
        async with db.session() as session:
            return await service.jwks(session)

    async def local_api_key(key: str) -> Identity:
        async with db.session() as session:
            return await service.resolve_api_key(session=session, key=key)

    # The auth service verifies its own tokens from its own database, not over the bus.
    runtime.verifier.jwks_source = local_jwks
    runtime.verifier.api_key_source = local_api_key

    async def rpc_jwks(_: JwksRequest) -> Jwks:
        return Jwks.model_validate(await local_jwks())

    async def rpc_resolve_api_key(request: ApiKeyLookup) -> Identity:
        return await local_api_key(request.key)

    runtime.rpc.register("jwks", JwksRequest, rpc_jwks)
    runtime.rpc.register("resolve_api_key", ApiKeyLookup, rpc_resolve_api_key)

    async def keep_keys_fresh() -> None:
        while True:
            await asyncio.sleep(3600)
            try:
                async with db.session() as session:
                    await service.ensure_signing_key(session=session, settings=settings, stage=runtime.stage)
            except Exception:  # a failed check is retried in an hour; signing goes on with the current key
                log.exception("signing key check failed")

    async def on_started(rt: Runtime) -> None:
        async with db.session() as session:
            await service.ensure_signing_key(session=session, settings=settings, stage=rt.stage)
            created = await service.bootstrap_admin(session=session, settings=settings, stage=rt.stage)
        if created is not None:
            user, password = created
            if password:
                log.warning(
                    "FIRST RUN: created the admin %s with password %s (shown once; change it: PATCH /api/v1/auth/me)",
                    user.email,
                    password,
                )
            else:
                log.warning("FIRST RUN: created the admin %s with the password from STRATA_ADMIN_PASSWORD", user.email)
        tasks.append(asyncio.create_task(keep_keys_fresh(), name="signing-key-rotation"))

    async def on_stopping(_: Runtime) -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return create_service_app(
        settings,
        runtime=runtime,
        title="Strata auth",
        description="Users, roles, OAuth2 password flow, rotating refresh tokens and the JWKS that signs them.",
        routers=[router],
        on_started=on_started,
        on_stopping=on_stopping,
    )
