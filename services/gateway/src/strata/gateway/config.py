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

    # -- the WebSocket (docs/realtime.md) ----------------------------------------------------------------------------
    ws_auth_timeout_s: float = Field(default=5.0, gt=0, description="Time for the first message to authenticate")
    ws_token_expiring_s: float = Field(default=30.0, ge=0, description="Warn this long before the token expires")
    ws_max_connections_per_user: int = Field(default=20, ge=1, description="Per replica")
    ws_max_subscriptions: int = Field(default=100, ge=1, description="Channels per socket")
    ws_max_queue: int = Field(default=1000, ge=10, description="Frames queued for one socket before it is closed")
    ws_max_replay: int = Field(default=100_000, ge=1, description="Events replayed for one subscribe")
    ws_access_cache_s: float = Field(default=10.0, ge=0, description="How long a channel authorization is trusted")
    #: How far back the revocation watch reads auth events: the longest access-token lifetime.
    ws_revocation_window_s: float = Field(default=24 * 3600.0, gt=0)
    ws_ping_interval_s: float = Field(default=20.0, gt=0)
    ws_ping_timeout_s: float = Field(default=20.0, gt=0)
    ws_max_message_bytes: int = Field(default=64 * 1024, ge=1024)
    #: Compressing each frame for each socket costs more CPU than it saves on small JSON events.
    ws_per_message_deflate: bool = False
    #: Subscribing spends a token of this bucket (per user), on top of the HTTP limits.
    rate_limit_ws_subscribe: str = "20/s;burst=200"

    @field_validator("rate_limit_user", "rate_limit_anonymous", "rate_limit_signin", "rate_limit_ws_subscribe")
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

    def uvicorn_options(self) -> dict[str, object]:
        return {
            "ws": "websockets-sansio",
            "ws_max_size": self.ws_max_message_bytes,
            "ws_ping_interval": self.ws_ping_interval_s,
            "ws_ping_timeout": self.ws_ping_timeout_s,
            "ws_per_message_deflate": self.ws_per_message_deflate,
        }

    def upstream_urls(self) -> dict[str, str]:
        return {name: getattr(self, f"{name}_url").rstrip("/") for name in UPSTREAMS}
