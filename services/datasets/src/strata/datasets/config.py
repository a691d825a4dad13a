"""Settings of the datasets service: ``STRATA_DATASETS_*`` first, then the shared ``STRATA_*``."""

from __future__ import annotations

from typing import ClassVar

from pydantic_settings import SettingsConfigDict

from strata.common.settings import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="STRATA_DATASETS_", extra="ignore")
    service_name: ClassVar[str] = "datasets"
    port: int = 8002
