"""Settings of the gateway: ``STRATA_GATEWAY_*`` first, then the shared ``STRATA_*``."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from strata.common.settings import ServiceSettings

# Public path prefix (the first segment after /api/v1) -> the service that owns it.
ROUTES: dict[str, str] = {
    "auth": "auth",
    "datasets": "datasets",
    "queries": "execution",
    "jobs": "execution",
    "blocks": "execution",
    "workflows": "execution",
    "schemas": "schemas",
    "registry": "schemas",
}
UPSTREAMS = ("auth", "datasets", "execution", "schemas")


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="STRATA_GATEWAY_", extra="ignore")
    service_name: ClassVar[str] = "gateway"

    auth_url: str = "http://127.0.0.1:8001"
    datasets_url: str = "http://127.0.0.1:8002"
    execution_url: str = "http://127.0.0.1:8003"
    schemas_url: str = "http://127.0.0.1:8004"

    connect_timeout_s: float = Field(default=2.0, gt=0)
    upstream_timeout_s: float = Field(default=60.0, gt=0, description="Longest wait for an upstream's next bytes")
    readiness_timeout_s: float = Field(default=2.0, gt=0)
    max_connections: int = Field(default=512, ge=1)
    instance_stale_after_s: float = Field(default=30.0, gt=0)

    def upstream_urls(self) -> dict[str, str]:
        return {name: getattr(self, f"{name}_url").rstrip("/") for name in UPSTREAMS}
