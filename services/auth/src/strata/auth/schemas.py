"""Request and response models of the auth API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from strata.common.contracts.auth import Role

T = TypeVar("T")


def _email(value: str) -> str:
    value = value.strip().lower()
    local, _, domain = value.partition("@")
    if not local or "." not in domain or " " in value or domain.startswith(".") or domain.endswith("."):
        raise ValueError("not an email address")
    return value


Email = Annotated[str, StringConstraints(min_length=3, max_length=320), AfterValidator(_email)]
Password = Annotated[str, StringConstraints(min_length=1, max_length=256)]
DisplayName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 (the OAuth2 token type)
    expires_in: int
    refresh_token: str | None = Field(default=None, description="Absent when it was set as an HttpOnly cookie")
    refresh_expires_in: int


class RefreshRequest(Strict):
    refresh_token: str | None = Field(default=None, max_length=200, description="Or send the refresh cookie")


class UserOut(BaseModel):
    id: str
    email: str
    display_name: str
    role: Role
    is_active: bool
    created_at: datetime
    updated_at: datetime


class UserCreate(Strict):
    email: Email
    password: Password
    display_name: DisplayName
    role: Role = Role.viewer


class UserUpdate(Strict):
    display_name: DisplayName | None = None
    role: Role | None = None
    is_active: bool | None = None
    password: Password | None = None


class MeUpdate(Strict):
    display_name: DisplayName | None = None
    password: Password | None = None
    current_password: Password | None = Field(default=None, description="Required to change the password")


class Page(BaseModel, Generic[T]):
    data: list[T]
    meta: dict[str, object]


class ApiKeyCreate(Strict):
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
    role: Role | None = Field(default=None, description="Your role or a lower one; defaults to yours")
    expires_in_days: int | None = Field(default=90, ge=1, description="None: never (if settings allow)")


class ApiKeyOut(BaseModel):
    id: str
    name: str
    role: Role
    user_id: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="Shown once: store it now")


class RotatedKey(BaseModel):
    kid: str
    previous_kid: str | None
