"""Settings of the execution service: ``STRATA_EXECUTION_*`` first, then the shared ``STRATA_*``."""

from __future__ import annotations

from typing import ClassVar

from pydantic_settings import SettingsConfigDict

from strata.common.settings import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="STRATA_EXECUTION_", extra="ignore")
    service_name: ClassVar[str] = "execution"
    port: int = 8003
