"""Settings of the auth service: ``STRATA_AUTH_*`` first, then the shared ``STRATA_*``."""

from __future__ import annotations

from typing import ClassVar

from pydantic_settings import SettingsConfigDict

from strata.common.settings import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="STRATA_AUTH_", extra="ignore")
    service_name: ClassVar[str] = "auth"
    port: int = 8001
