"""Settings of the auth service: ``STRATA_AUTH_*`` first, then the shared ``STRATA_*``."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from strata.common.settings import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="STRATA_AUTH_", extra="ignore")
    service_name: ClassVar[str] = "auth"
    port: int = 8001

    access_token_ttl_s: int = Field(default=900, ge=30, le=24 * 3600)
    refresh_token_ttl_s: int = Field(default=14 * 24 * 3600, ge=300)
    signing_key_rotate_after_days: float = Field(default=30.0, gt=0)
    #: Encrypts the signing keys' private halves at rest. Required in production.
    key_encryption_secret: SecretStr | None = None

    #: The first admin, created when no admin exists (``STRATA_ADMIN_EMAIL`` / ``STRATA_ADMIN_PASSWORD``).
    admin_email: str = "admin@strata.local"
    admin_password: SecretStr | None = None

    password_min_length: int = Field(default=10, ge=8)
    refresh_cookie_name: str = "strata_refresh"
    refresh_cookie_secure: bool = True
    api_key_max_days: int = Field(default=365, ge=1)

    @model_validator(mode="after")
    def _production_needs_secrets(self) -> Settings:
        if self.environment == "production":
            secret = self.key_encryption_secret.get_secret_value() if self.key_encryption_secret else ""
            if len(secret) < 32 or secret.lower() in {"changeme", "change-me", "secret"} or len(set(secret)) < 8:
                raise ValueError(
                    "STRATA_AUTH_KEY_ENCRYPTION_SECRET must be a real secret (32+ characters) in production"
                )
        return self
