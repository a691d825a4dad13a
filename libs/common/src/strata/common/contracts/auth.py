"""The auth service's contract: identities, RPC payloads and events."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict

from ..events import EventPayload


class Role(StrEnum):
    """Roles, weakest first. ``analyst`` may run queries and blocks; ``viewer`` only reads; ``admin`` does all."""

    viewer = "viewer"
    analyst = "analyst"
    admin = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def at_least(self, other: Role) -> bool:
        return self.rank >= other.rank


_RANK = {Role.viewer: 0, Role.analyst: 1, Role.admin: 2}


class Identity(BaseModel):
    """Who is calling, as verified from an access token or an API key."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    user_id: str
    role: Role
    kind: Literal["user", "api_key"] = "user"
    session_id: str | None = None  # the refresh-token family the access token came from
    token_id: str | None = None  # the access token's jti, or the API key's id
    expires_at: AwareDatetime | None = None


# -- RPC -------------------------------------------------------------------------------------------------------------
class JwksRequest(BaseModel):
    pass


class Jwks(BaseModel):
    keys: list[dict[str, Any]]


class ApiKeyLookup(BaseModel):
    key: str


# -- events ----------------------------------------------------------------------------------------------------------
class UserEvent(EventPayload):
    user_id: str
    email: str
    role: Role
    is_active: bool


class UserCreated(UserEvent):
    event_type: ClassVar[str] = "strata.auth.user.created"


class UserUpdated(UserEvent):
    """Any change; ``changes`` names the fields (``role``, ``is_active``, ``display_name``, ``password``)."""

    event_type: ClassVar[str] = "strata.auth.user.updated"
    changes: list[str]
    previous_role: Role | None = None


class UserDeactivated(UserEvent):
    """The user may no longer sign in; live sessions (WebSockets) must end now."""

    event_type: ClassVar[str] = "strata.auth.user.deactivated"


class UserDemoted(UserEvent):
    """The user's role dropped; live sessions must end so that the new role applies."""

    event_type: ClassVar[str] = "strata.auth.user.demoted"
    previous_role: Role


class UserDeleted(UserEvent):
    event_type: ClassVar[str] = "strata.auth.user.deleted"


class SessionRevoked(EventPayload):
    """A refresh-token family (a sign-in session) ended: logout, reuse detected, or an admin action."""

    event_type: ClassVar[str] = "strata.auth.session.revoked"
    user_id: str
    session_id: str
    reason: Literal["logout", "refresh_token_reused", "user_deactivated", "user_demoted", "password_changed"]


class ApiKeyRevoked(EventPayload):
    event_type: ClassVar[str] = "strata.auth.api_key.revoked"
    api_key_id: str
    user_id: str


class SigningKeyRotated(EventPayload):
    event_type: ClassVar[str] = "strata.auth.signing_key.rotated"
    kid: str
    previous_kid: str | None = None
