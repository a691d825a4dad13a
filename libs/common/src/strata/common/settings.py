"""Settings: one pydantic-settings class per service, read from the environment.

A service's own prefix wins (``STRATA_DATASETS_NATS_URL``); the shared prefix (``STRATA_NATS_URL``) sets a value for
every service at once; then the defaults, which run the whole suite on one machine with nothing else installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

SHARED_PREFIX = "STRATA_"


class ServiceSettings(BaseSettings):
    """What every service reads. Subclasses set ``service_name`` and ``model_config['env_prefix']``."""

    model_config = SettingsConfigDict(env_prefix=SHARED_PREFIX, extra="ignore", validate_default=True)
    service_name: ClassVar[str] = "strata"

    data_dir: Path = Path(".data")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    instance_id: str = ""
    environment: Literal["development", "test", "production"] = "development"

    nats_url: str = "nats://127.0.0.1:4222"
    nats_connect_timeout_s: float = Field(default=2.0, gt=0)
    database_url: str = ""
    database_echo: bool = False
    auto_migrate: bool = True

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    access_log: bool = True
    tracing: Literal["off", "local", "console", "otlp"] = "local"
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"

    request_id_header: str = "X-Request-ID"
    jwt_issuer: str = "strata"
    jwt_audience: str = "strata-api"
    #: How long a resolved API key is trusted before asking the auth service again (a revocation's delay).
    api_key_cache_ttl_s: float = Field(default=30.0, ge=0)
    outbox_poll_interval_s: float = Field(default=1.0, gt=0)
    #: Net new objects before the garbage collector's young-generation pass (CPython's default: 700). See app.py.
    gc_young_threshold: int = Field(default=50_000, ge=100)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        shared = EnvSettingsSource(settings_cls, env_prefix=SHARED_PREFIX)
        return init_settings, env_settings, shared, dotenv_settings, file_secret_settings

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    def model_post_init(self, context: Any, /) -> None:
        if not self.database_url:
            self.database_url = f"sqlite+aiosqlite:///{self.data_dir / self.service_name}.db"
        if not self.instance_id:
            import os
            import socket

            self.instance_id = f"{socket.gethostname()}-{os.getpid()}"

    @property
    def service_dir(self) -> Path:
        """A folder this service may write to (created on demand)."""
        path = self.data_dir / self.service_name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def uvicorn_options(self) -> dict[str, object]:
        """Extra ``uvicorn.Config`` options of this service (the gateway's WebSocket settings)."""
        return {"ws": "none"}

    def describe(self) -> dict[str, Any]:
        """The settings without secrets, for the start-up log line."""
        from .db import redact_url

        values = self.model_dump(mode="json")
        values["database_url"] = redact_url(self.database_url)
        values["nats_url"] = redact_url(self.nats_url)
        return {k: v for k, v in values.items() if "secret" not in k and "password" not in k}
