"""Settings of the schemas service: ``STRATA_SCHEMAS_*`` first, then the shared ``STRATA_*``."""

from __future__ import annotations

from typing import ClassVar

from pydantic_settings import SettingsConfigDict

from strata.common.settings import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="STRATA_SCHEMAS_", extra="ignore")
    service_name: ClassVar[str] = "schemas"
    port: int = 8004
