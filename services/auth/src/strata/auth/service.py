"""What the auth service does. Functions take what they need, keyword-only; they flush, never commit."""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from strata.common.contracts.auth import (
    ApiKeyRevoked,
    Identity,
    Role,
    SessionRevoked,
    SigningKeyRotated,
    UserCreated,
    UserDeactivated,
    UserDeleted,
    UserDemoted,
    UserUpdated,
)
from strata.common.db import utcnow
from strata.common.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized, Unprocessable
from strata.common.events import CloudEvent, EventPayload, source_of
from strata.common.pagination import decode_cursor, encode_cursor

from . import security
from .config import Settings
from .models import ApiKey, RefreshToken, SigningKey, User
from .schemas import ApiKeyCreate, MeUpdate, UserCreate, UserUpdate

log = logging.getLogger(__name__)
SOURCE = source_of("auth")

Stage = Callable[[AsyncSession, CloudEvent], None]


# -- errors ----------------------------------------------------------------------------------------------------------
class InvalidCredentials(Unauthorized):
    code, default_message = "INVALID_CREDENTIALS", "The email or password is wrong."


class InvalidRefreshToken(Unauthorized):
    code, default_message = "INVALID_REFRESH_TOKEN", "The refresh token is not valid. Sign in again."


class RefreshTokenReused(Unauthorized):
    """A used refresh token came back: someone may hold a stolen copy. The whole session is revoked, and stays so."""

    code, default_message = "REFRESH_TOKEN_REUSED", "This refresh token was already used. The session is ended."
    commit_session = True


class UserNotFound(NotFound):
    code, default_message = "USER_NOT_FOUND", "No such user."


class EmailTaken(Conflict):
    code, default_message = "EMAIL_TAKEN", "A user with this email exists."


class LastAdmin(Conflict):
    code, default_message = "LAST_ADMIN", "This would leave no active admin."


class ApiKeyNotFound(NotFound):
    code, default_message = "API_KEY_NOT_FOUND", "No such API key."


class WeakPassword(Unprocessable):
    code = "WEAK_PASSWORD"


def _event(payload: EventPayload, subject: str | None = None) -> CloudEvent:
    return CloudEvent.of(payload, source=SOURCE, subject=subject)


# -- signing keys ----------------------------------------------------------------------------------------------------
def _secret(settings: Settings) -> str | None:
    return settings.key_encryption_secret.get_secret_value() if settings.key_encryption_secret else None


async def current_signing_key(session: AsyncSession) -> SigningKey | None:
    return await session.scalar(
        select(SigningKey).where(SigningKey.status == "current").order_by(SigningKey.created_at.desc()).limit(1)
    )


async def rotate_signing_key(*, session: AsyncSession, settings: Settings, stage: Stage) -> SigningKey:
    """A new current key; the old current becomes previous (still in the JWKS); older ones retire."""
    now = utcnow()
    await session.execute(
        update(SigningKey).where(SigningKey.status == "previous").values(status="retired", retired_at=now)
    )
    old = await current_signing_key(session)
    await session.execute(update(SigningKey).where(SigningKey.status == "current").values(status="previous"))
    generated = security.generate_signing_key(_secret(settings))
    key = SigningKey(
        kid=generated.kid,
        private_key=generated.private_pem,
        public_jwk=generated.public_jwk,
        status="current",
        created_at=now,
    )
    session.add(key)
    await session.flush()
    stage(session, _event(SigningKeyRotated(kid=key.kid, previous_kid=old.kid if old else None), key.kid))
    log.info("signing key rotated: %s (previous %s)", key.kid, old.kid if old else None)
    return key


async def ensure_signing_key(*, session: AsyncSession, settings: Settings, stage: Stage) -> SigningKey:
    key = await current_signing_key(session)
    max_age = timedelta(days=settings.signing_key_rotate_after_days)
    if key is None or utcnow() - key.created_at > max_age:
        key = await rotate_signing_key(session=session, settings=settings, stage=stage)
    return key


async def jwks(session: AsyncSession) -> dict[str, Any]:
    keys = (
        await session.scalars(
            select(SigningKey)
            .where(SigningKey.status.in_(("current", "previous")))
            .order_by(SigningKey.created_at.desc())
        )
    ).all()
    return {"keys": [k.public_jwk for k in keys]}


# -- users -----------------------------------------------------------------------------------------------------------
def _check_password(password: str, settings: Settings, email: str) -> None:
    problems = []
    if len(password) < settings.password_min_length:
        problems.append(f"at least {settings.password_min_length} characters")
    if password.lower() == email.lower() or password.lower() in email.lower():
        problems.append("not your email")
    if len(set(password)) < 4:
        problems.append("more than three different characters")
    if problems:
        raise WeakPassword(
            "The password is too weak: it needs " + ", ".join(problems) + ".",
            details=[{"loc": ["body", "password"], "msg": p} for p in problems],
        )


def _user_payload(user: User) -> dict[str, Any]:
    return {"user_id": user.id, "email": user.email, "role": Role(user.role), "is_active": user.is_active}


async def get_user(*, session: AsyncSession, user_id: str) -> User:
    user = await session.get(User, user_id)
    if user is None or user.deleted_at is not None:
        raise UserNotFound()
    return user


async def create_user(*, session: AsyncSession, settings: Settings, stage: Stage, spec: UserCreate) -> User:
    _check_password(spec.password, settings, spec.email)
    if await session.scalar(select(User.id).where(func.lower(User.email) == spec.email)):
        raise EmailTaken()
    now = utcnow()
    user = User(
        id=str(uuid.uuid4()),
        email=spec.email,
        display_name=spec.display_name,
        role=spec.role.value,
        is_active=True,
        password_hash=security.hash_password(spec.password),
        created_at=now,
        updated_at=now,
        password_changed_at=now,
    )
    session.add(user)
    await session.flush()
    stage(session, _event(UserCreated(**_user_payload(user)), user.id))
    return user


async def _active_admins(session: AsyncSession) -> int:
    count = await session.scalar(
        select(func.count())
        .select_from(User)
        .where(User.role == Role.admin.value, User.is_active.is_(True), User.deleted_at.is_(None))
    )
    return int(count or 0)


async def revoke_sessions(
    *, session: AsyncSession, stage: Stage, user_id: str, reason: str, family_id: str | None = None
) -> int:
    """Revoke every live refresh-token family of the user (or one), and say so once per family."""
    query = select(RefreshToken.family_id).where(RefreshToken.user_id == user_id, RefreshToken.revoked_at.is_(None))
    if family_id is not None:
        query = query.where(RefreshToken.family_id == family_id)
    families = sorted(set((await session.scalars(query)).all()))
    if not families:
        return 0
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.family_id.in_(families), RefreshToken.revoked_at.is_(None))
        .values(revoked_at=utcnow(), revoked_reason=reason)
    )
    for family in families:
        stage(session, _event(SessionRevoked(user_id=user_id, session_id=family, reason=reason), user_id))
    return len(families)


async def update_user(
    *, session: AsyncSession, settings: Settings, stage: Stage, actor: Identity, user_id: str, spec: UserUpdate
) -> User:
    user = await get_user(session=session, user_id=user_id)
    changes: list[str] = []
    previous_role = Role(user.role)
    losing_admin = (spec.role is not None and spec.role != Role.admin) or spec.is_active is False
    if losing_admin and user.role == Role.admin.value and user.is_active and await _active_admins(session) <= 1:
        raise LastAdmin()
    if spec.display_name is not None and spec.display_name != user.display_name:
        user.display_name = spec.display_name
        changes.append("display_name")
    if spec.role is not None and spec.role.value != user.role:
        user.role = spec.role.value
        changes.append("role")
    if spec.is_active is not None and spec.is_active != user.is_active:
        user.is_active = spec.is_active
        changes.append("is_active")
    if spec.password is not None:
        _check_password(spec.password, settings, user.email)
        user.password_hash = security.hash_password(spec.password)
        user.password_changed_at = utcnow()
        changes.append("password")
    if not changes:
        return user
    user.updated_at = utcnow()
    await session.flush()
    payload = _user_payload(user)
    stage(session, _event(UserUpdated(**payload, changes=changes, previous_role=previous_role), user.id))
    if "is_active" in changes and not user.is_active:
        await revoke_sessions(session=session, stage=stage, user_id=user.id, reason="user_deactivated")
        stage(session, _event(UserDeactivated(**payload), user.id))
    elif "role" in changes and not Role(user.role).at_least(previous_role):
        await revoke_sessions(session=session, stage=stage, user_id=user.id, reason="user_demoted")
        stage(session, _event(UserDemoted(**payload, previous_role=previous_role), user.id))
    elif "password" in changes and actor.user_id != user.id:
        await revoke_sessions(session=session, stage=stage, user_id=user.id, reason="password_changed")
    log.info("user %s updated by %s: %s", user.id, actor.user_id, ", ".join(changes))
    return user


async def update_me(*, session: AsyncSession, settings: Settings, stage: Stage, me: Identity, spec: MeUpdate) -> User:
    user = await get_user(session=session, user_id=me.user_id)
    if spec.password is not None and (
        spec.current_password is None or not security.verify_password(spec.current_password, user.password_hash)[0]
    ):
        raise InvalidCredentials("The current password is wrong.")
    return await update_user(
        session=session,
        settings=settings,
        stage=stage,
        actor=me,
        user_id=me.user_id,
        spec=UserUpdate(display_name=spec.display_name, password=spec.password),
    )


async def delete_user(*, session: AsyncSession, stage: Stage, actor: Identity, user_id: str) -> None:
    """Soft delete: the row stays (other services keep owner ids), the user can never sign in again."""
    user = await get_user(session=session, user_id=user_id)
    if user.role == Role.admin.value and user.is_active and await _active_admins(session) <= 1:
        raise LastAdmin()
    user.is_active = False
    user.deleted_at = utcnow()
    user.email = f"deleted-{user.id}@deleted.invalid"  # frees the address for a new account
    await revoke_sessions(session=session, stage=stage, user_id=user.id, reason="user_deactivated")
    await session.execute(
        update(ApiKey).where(ApiKey.user_id == user.id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    await session.flush()
    stage(session, _event(UserDeleted(**_user_payload(user)), user.id))
    log.info("user %s deleted by %s", user.id, actor.user_id)


async def list_users(
    *, session: AsyncSession, role: Role | None, active: bool | None, q: str | None, limit: int, cursor: str | None
) -> tuple[list[User], str | None]:
    query = select(User).where(User.deleted_at.is_(None))
    if role is not None:
        query = query.where(User.role == role.value)
    if active is not None:
        query = query.where(User.is_active.is_(active))
    if q:
        like = f"%{q.lower().replace('%', '').replace('_', '')}%"
        query = query.where(or_(func.lower(User.email).like(like), func.lower(User.display_name).like(like)))
    if cursor:
        created, uid = decode_cursor(cursor)
        try:
            created_at = datetime.fromisoformat(created)
        except ValueError:
            raise BadRequest("The cursor is not valid.") from None
        query = query.where(or_(User.created_at > created_at, and_(User.created_at == created_at, User.id > uid)))
    rows = list((await session.scalars(query.order_by(User.created_at, User.id).limit(limit + 1))).all())
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor([rows[-1].created_at.isoformat(), rows[-1].id])
    return rows, next_cursor


async def bootstrap_admin(*, session: AsyncSession, settings: Settings, stage: Stage) -> tuple[User, str | None] | None:
    """Create the first admin if there is none. Returns it with the generated password (None if it was given)."""
    if await _active_admins(session) > 0:
        return None
    given = settings.admin_password.get_secret_value() if settings.admin_password else None
    password = given or secrets.token_urlsafe(12)
    email = settings.admin_email.strip().lower()
    existing = await session.scalar(select(User).where(User.email == email))
    if existing is not None:  # an admin account that lost its role or was deactivated: give it back
        existing.role, existing.is_active, existing.deleted_at = Role.admin.value, True, None
        existing.password_hash = security.hash_password(password)
        await session.flush()
        return existing, None if given else password
    user = await create_user(
        session=session,
        settings=settings.model_copy(update={"password_min_length": 8}),
        stage=stage,
        spec=UserCreate(email=email, password=password, display_name="Administrator", role=Role.admin),
    )
    return user, None if given else password


# -- tokens ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tokens:
    access_token: str
    expires_in: int
    refresh_token: str
    refresh_expires_in: int


async def _issue(*, session: AsyncSession, settings: Settings, user: User, family_id: str) -> Tokens:
    key = await current_signing_key(session)
    if key is None:
        raise RuntimeError("no signing key: the service did not finish starting")
    now = utcnow()
    private = security.load_private_key(key.private_key, _secret(settings))
    access, _, _ = security.mint_access_token(
        key=private,
        kid=key.kid,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        user_id=user.id,
        role=user.role,
        session_id=family_id,
        now=now,
        ttl=timedelta(seconds=settings.access_token_ttl_s),
    )
    refresh = security.new_refresh_token()
    session.add(
        RefreshToken(
            id=str(uuid.uuid4()),
            family_id=family_id,
            user_id=user.id,
            token_hash=security.sha256_hex(refresh),
            created_at=now,
            expires_at=now + timedelta(seconds=settings.refresh_token_ttl_s),
        )
    )
    await session.flush()
    return Tokens(access, settings.access_token_ttl_s, refresh, settings.refresh_token_ttl_s)


async def login(*, session: AsyncSession, settings: Settings, email: str, password: str) -> Tokens:
    user = await session.scalar(
        select(User).where(func.lower(User.email) == email.strip().lower(), User.deleted_at.is_(None))
    )
    ok, updated_hash = security.verify_password(password, user.password_hash if user else None)
    # Same answer for an unknown email, a wrong password and a disabled account: no hint which it was.
    if user is None or not ok or not user.is_active:
        raise InvalidCredentials()
    if updated_hash is not None:
        user.password_hash = updated_hash
    return await _issue(session=session, settings=settings, user=user, family_id=str(uuid.uuid4()))


async def refresh(*, session: AsyncSession, settings: Settings, stage: Stage, token: str) -> Tokens:
    query = select(RefreshToken).where(RefreshToken.token_hash == security.sha256_hex(token))
    row = await session.scalar(query.with_for_update())
    if row is None or row.revoked_at is not None or row.expires_at <= utcnow():
        raise InvalidRefreshToken()
    if row.used_at is not None:
        await revoke_sessions(
            session=session, stage=stage, user_id=row.user_id, reason="refresh_token_reused", family_id=row.family_id
        )
        log.warning("refresh token reuse for user %s: session %s revoked", row.user_id, row.family_id)
        raise RefreshTokenReused()
    user = await session.get(User, row.user_id)
    if user is None or not user.is_active or user.deleted_at is not None:
        raise InvalidRefreshToken()
    row.used_at = utcnow()
    return await _issue(session=session, settings=settings, user=user, family_id=row.family_id)


async def logout(*, session: AsyncSession, stage: Stage, token: str | None, identity: Identity | None) -> None:
    """End the session of the refresh token, or of the access token's ``sid``. Unknown tokens: nothing to do."""
    if token:
        row = await session.scalar(select(RefreshToken).where(RefreshToken.token_hash == security.sha256_hex(token)))
        if row is not None:
            await revoke_sessions(
                session=session, stage=stage, user_id=row.user_id, reason="logout", family_id=row.family_id
            )
            return
    if identity is not None and identity.session_id:
        await revoke_sessions(
            session=session, stage=stage, user_id=identity.user_id, reason="logout", family_id=identity.session_id
        )


# -- API keys --------------------------------------------------------------------------------------------------------
async def create_api_key(
    *, session: AsyncSession, settings: Settings, owner: Identity, spec: ApiKeyCreate
) -> tuple[ApiKey, str]:
    if owner.kind != "user":
        raise Forbidden("An API key cannot create API keys.")
    role = spec.role or owner.role
    if not owner.role.at_least(role):
        raise Forbidden(f"An API key can carry your role ({owner.role.value}) or a lower one.")
    days = spec.expires_in_days
    if days is None or days > settings.api_key_max_days:
        raise Unprocessable(
            f"API keys expire within {settings.api_key_max_days} days.",
            details=[{"loc": ["body", "expires_in_days"], "msg": f"1..{settings.api_key_max_days}"}],
        )
    key_id, key = security.new_api_key()
    now = utcnow()
    row = ApiKey(
        id=key_id,
        user_id=owner.user_id,
        name=spec.name,
        role=role.value,
        key_hash=security.sha256_hex(key),
        created_at=now,
        expires_at=now + timedelta(days=days),
    )
    session.add(row)
    await session.flush()
    return row, key


async def list_api_keys(*, session: AsyncSession, owner: Identity, all_users: bool) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at.desc())
    if not (all_users and owner.role == Role.admin):
        query = query.where(ApiKey.user_id == owner.user_id)
    return list((await session.scalars(query)).all())


async def revoke_api_key(*, session: AsyncSession, stage: Stage, actor: Identity, key_id: str) -> ApiKey:
    row = await session.get(ApiKey, key_id)
    if row is None or (row.user_id != actor.user_id and actor.role != Role.admin):
        raise ApiKeyNotFound()  # someone else's key: as if it did not exist
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        await session.flush()
        stage(session, _event(ApiKeyRevoked(api_key_id=row.id, user_id=row.user_id), row.user_id))
    return row


async def resolve_api_key(*, session: AsyncSession, key: str) -> Identity:
    row = await session.scalar(select(ApiKey).where(ApiKey.key_hash == security.sha256_hex(key)))
    now = utcnow()
    if row is None or row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
        raise Unauthorized("The API key is not valid.")
    user = await session.get(User, row.user_id)
    if user is None or not user.is_active or user.deleted_at is not None:
        raise Unauthorized("The API key is not valid.")
    # Never more than the owner has now: a demoted owner's keys are demoted too.
    role = min(Role(row.role), Role(user.role), key=lambda r: r.rank)
    if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=5):
        row.last_used_at = now
    return Identity(user_id=user.id, role=role, kind="api_key", token_id=row.id, expires_at=row.expires_at)
