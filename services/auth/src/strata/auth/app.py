"""``create_app(settings)``: the auth service's FastAPI app."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from strata.common.app import Runtime, create_service_app
from strata.common.observability import Metrics

from .config import Settings
from .models import Outbox, ProcessedEvent

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = Runtime(
        settings,
        metrics=Metrics(settings.service_name),
        migrations=MIGRATIONS,
        outbox_model=Outbox,
        processed_model=ProcessedEvent,
    )
    return create_service_app(
        settings,
        runtime=runtime,
        title="Strata auth",
        description="Users, roles, OAuth2 password flow, rotating refresh tokens and the JWKS that signs them.",
    )
