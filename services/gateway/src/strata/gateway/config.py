"""Settings of the gateway: ``STRATA_GATEWAY_*`` first, then the shared ``STRATA_*``."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from strata.common.settings import ServiceSettings

from .edge import EdgeLimits
from .ratelimit import Limit

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
    openapi_cache_ttl_s: float = Field(default=30.0, gt=0)
    #: Upstream read timeouts by path prefix (longest prefix wins); others use upstream_timeout_s.
    route_timeouts_s: dict[str, float] = Field(default_factory=lambda: {"/api/v1/datasets": 900.0})

    #: Browser origins allowed to call the API with credentials (the frontend's dev servers by default).
    cors_origins: list[str] = Field(
        default_factory=lambda: [
            "http://localhost:3000",
            "http://127.0.0.1:3000",
            "http://localhost:5173",
            "http://127.0.0.1:5173",
        ]
    )

    #: Token buckets: per signed-in user, per IP when anonymous, and per IP on sign-in.
    rate_limit_user: str = "50/s;burst=200"
    rate_limit_anonymous: str = "10/s;burst=40"
    rate_limit_signin: str = "10/min;burst=5"
    #: Share the buckets between gateway replicas through Redis; in memory (per replica) when empty.
    rate_limit_redis_url: str = ""

    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    max_upload_bytes: int = Field(default=2 * 1024**3, ge=1024)
    #: Requests whose path matches one of these (method POST/PUT) may carry up to max_upload_bytes.
    upload_routes: list[str] = Field(
        default_factory=lambda: [
            r"^/api/v1/datasets$",
            r"^/api/v1/datasets/[^/]+/versions$",
            r"^/api/v1/schemas/.+/ingest$",
        ]
    )

    @field_validator("rate_limit_user", "rate_limit_anonymous", "rate_limit_signin")
    @classmethod
    def _valid_limit(cls, value: str) -> str:
        Limit.parse(value)
        return value

    def limits(self) -> EdgeLimits:
        return EdgeLimits(
            user=Limit.parse(self.rate_limit_user),
            anonymous=Limit.parse(self.rate_limit_anonymous),
            token=Limit.parse(self.rate_limit_signin),
        )

    def upstream_urls(self) -> dict[str, str]:
        return {name: getattr(self, f"{name}_url").rstrip("/") for name in UPSTREAMS}
