"""The auth API, under ``/api/v1/auth``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.security import OAuth2PasswordRequestForm

from strata.common.auth import MissingToken
from strata.common.contracts.auth import Identity, Role
from strata.common.contracts.realtime import ACCESS_COOKIE, WS_PATH
from strata.common.deps import AdminUser, CurrentUser, RuntimeDep, SessionDep

from . import service
from .config import Settings
from .models import ApiKey, User
from .schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    MeUpdate,
    Page,
    RefreshRequest,
    RotatedKey,
    TokenResponse,
    UserCreate,
    UserOut,
    UserUpdate,
)

PREFIX = "/api/v1/auth"
router = APIRouter(prefix=PREFIX, tags=["auth"])


def get_settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def _user_out(user: User) -> UserOut:
    return UserOut.model_validate(user, from_attributes=True)


def _key_out(row: ApiKey) -> dict[str, Any]:
    return {**{c: getattr(row, c) for c in ApiKeyOut.model_fields if c != "prefix"}, "prefix": f"strata_{row.id}_"}


def _token_response(tokens: service.Tokens, response: Response, settings: Settings, cookie: bool) -> TokenResponse:
    body = TokenResponse(
        access_token=tokens.access_token,
        expires_in=tokens.expires_in,
        refresh_token=tokens.refresh_token,
        refresh_expires_in=tokens.refresh_expires_in,
    )
    if cookie:
        response.set_cookie(
            settings.refresh_cookie_name,
            tokens.refresh_token,
            max_age=tokens.refresh_expires_in,
            path=PREFIX,
            httponly=True,
            secure=settings.refresh_cookie_secure,
            samesite="strict",
        )
        # The WebSocket signs a browser in with this one: browsers cannot set headers on a WebSocket handshake.
        response.set_cookie(
            ACCESS_COOKIE,
            tokens.access_token,
            max_age=tokens.expires_in,
            path=WS_PATH,
            httponly=True,
            secure=settings.refresh_cookie_secure,
            samesite="strict",
        )
        body.refresh_token = None
    response.headers["Cache-Control"] = "no-store"
    return body


@router.post("/token", summary="Sign in (OAuth2 password flow)")
async def token(
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    refresh_cookie: Annotated[
        bool,
        Query(
            description=(
                f"Set the refresh token as an HttpOnly cookie (path {PREFIX}, not in the body) and the access token "
                f"as the HttpOnly cookie {ACCESS_COOKIE} (path {WS_PATH}, for the WebSocket); both are renewed by "
                "POST /refresh with the cookie and cleared by POST /logout"
            )
        ),
    ] = False,
) -> TokenResponse:
    tokens = await service.login(session=session, settings=settings, email=form.username, password=form.password)
    return _token_response(tokens, response, settings, refresh_cookie)


def _refresh_cookie(request: Request, settings: Settings) -> str | None:
    return request.cookies.get(settings.refresh_cookie_name)


@router.post("/refresh", summary="Trade a refresh token for new tokens (rotation; a reused token ends the session)")
async def refresh(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    runtime: RuntimeDep,
    response: Response,
    body: RefreshRequest | None = None,
) -> TokenResponse:
    cookie = _refresh_cookie(request, settings)
    supplied = (body.refresh_token if body else None) or cookie
    if not supplied:
        raise service.InvalidRefreshToken("Send the refresh token in the body or the refresh cookie.")
    tokens = await service.refresh(session=session, settings=settings, stage=runtime.stage, token=supplied)
    return _token_response(tokens, response, settings, cookie=cookie is not None and not (body and body.refresh_token))


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT, summary="End the session (refresh token family)")
async def logout(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    runtime: RuntimeDep,
    body: RefreshRequest | None = None,
) -> Response:
    identity: Identity | None = None
    if request.headers.get("authorization"):
        try:
            identity = await runtime.verifier.verify_header(request.headers["authorization"])
        except MissingToken:
            identity = None
    token = (body.refresh_token if body else None) or _refresh_cookie(request, settings)
    await service.logout(session=session, stage=runtime.stage, token=token, identity=identity)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    response.delete_cookie(
        settings.refresh_cookie_name,
        path=PREFIX,
        httponly=True,
        secure=settings.refresh_cookie_secure,
        samesite="strict",
    )
    response.delete_cookie(
        ACCESS_COOKIE,
        path=WS_PATH,
        httponly=True,
        secure=settings.refresh_cookie_secure,
        samesite="strict",
    )
    return response


@router.get("/me")
async def me(identity: CurrentUser, session: SessionDep) -> UserOut:
    return _user_out(await service.get_user(session=session, user_id=identity.user_id))


@router.patch("/me", summary="Change your display name or password")
async def update_me(
    spec: MeUpdate, identity: CurrentUser, session: SessionDep, settings: SettingsDep, runtime: RuntimeDep
) -> UserOut:
    user = await service.update_me(session=session, settings=settings, stage=runtime.stage, me=identity, spec=spec)
    return _user_out(user)


@router.get("/users", summary="Users (admins)")
async def list_users(
    _: AdminUser,
    session: SessionDep,
    role: Role | None = None,
    active: bool | None = None,
    q: Annotated[str | None, Query(max_length=100, description="Search email and display name")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> Page[UserOut]:
    rows, next_cursor = await service.list_users(
        session=session, role=role, active=active, q=q, limit=limit, cursor=cursor
    )
    return Page[UserOut](data=[_user_out(u) for u in rows], meta={"next_cursor": next_cursor, "limit": limit})


@router.post("/users", status_code=status.HTTP_201_CREATED, summary="Create a user (admins)")
async def create_user(
    spec: UserCreate, _: AdminUser, session: SessionDep, settings: SettingsDep, runtime: RuntimeDep
) -> UserOut:
    return _user_out(await service.create_user(session=session, settings=settings, stage=runtime.stage, spec=spec))


@router.get("/users/{user_id}", summary="A user (admins)")
async def get_user(user_id: str, _: AdminUser, session: SessionDep) -> UserOut:
    return _user_out(await service.get_user(session=session, user_id=user_id))


@router.patch("/users/{user_id}", summary="Change a user: name, role, active, password (admins)")
async def update_user(
    user_id: str, spec: UserUpdate, admin: AdminUser, session: SessionDep, settings: SettingsDep, runtime: RuntimeDep
) -> UserOut:
    user = await service.update_user(
        session=session, settings=settings, stage=runtime.stage, actor=admin, user_id=user_id, spec=spec
    )
    return _user_out(user)


@router.delete("/users/{user_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a user (admins)")
async def delete_user(user_id: str, admin: AdminUser, session: SessionDep, runtime: RuntimeDep) -> None:
    await service.delete_user(session=session, stage=runtime.stage, actor=admin, user_id=user_id)


@router.post("/api-keys", status_code=status.HTTP_201_CREATED, summary="Create an API key (shown once)")
async def create_api_key(
    spec: ApiKeyCreate, identity: CurrentUser, session: SessionDep, settings: SettingsDep
) -> ApiKeyCreated:
    row, key = await service.create_api_key(session=session, settings=settings, owner=identity, spec=spec)
    return ApiKeyCreated(**_key_out(row), key=key)


@router.get("/api-keys", summary="Your API keys (admins: everyone's with all=true)")
async def list_api_keys(
    identity: CurrentUser,
    session: SessionDep,
    all: bool = False,
) -> Page[ApiKeyOut]:
    rows = await service.list_api_keys(session=session, owner=identity, all_users=all)
    return Page[ApiKeyOut](
        data=[ApiKeyOut(**_key_out(r)) for r in rows], meta={"next_cursor": None, "limit": len(rows)}
    )


@router.delete("/api-keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Revoke an API key")
async def revoke_api_key(key_id: str, identity: CurrentUser, session: SessionDep, runtime: RuntimeDep) -> None:
    await service.revoke_api_key(session=session, stage=runtime.stage, actor=identity, key_id=key_id)


@router.get("/.well-known/jwks.json", summary="Public keys that verify access tokens")
async def jwks(session: SessionDep, response: Response) -> dict[str, Any]:
    response.headers["Cache-Control"] = "public, max-age=300"
    return await service.jwks(session)


@router.post("/keys/rotate", summary="Rotate the signing key now (admins)")
async def rotate(_: AdminUser, session: SessionDep, settings: SettingsDep, runtime: RuntimeDep) -> RotatedKey:
    previous = await service.current_signing_key(session)
    key = await service.rotate_signing_key(session=session, settings=settings, stage=runtime.stage)
    runtime.verifier.forget_keys()
    return RotatedKey(kid=key.kid, previous_kid=previous.kid if previous else None)
