"""The auth service: sign-in, tokens, rotation, users, API keys, and each attack from the issue."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from sqlalchemy import func, select

from strata.auth import security
from strata.auth.app import create_app
from strata.auth.config import Settings
from strata.auth.models import Outbox, RefreshToken, SigningKey, User
from strata.common.contracts.realtime import ACCESS_COOKIE, WS_PATH
from strata.common.testing import app_client

ADMIN_EMAIL = "root@example.com"
ADMIN_PASSWORD = "correct horse battery staple"


@dataclass
class Auth:
    client: httpx.AsyncClient
    app: FastAPI
    settings: Settings

    async def login(self, email: str = ADMIN_EMAIL, password: str = ADMIN_PASSWORD) -> dict[str, str]:
        resp = await self.client.post("/api/v1/auth/token", data={"username": email, "password": password})
        assert resp.status_code == 200, resp.text
        body: dict[str, str] = resp.json()
        return body

    async def headers(self, email: str = ADMIN_EMAIL, password: str = ADMIN_PASSWORD) -> dict[str, str]:
        return {"Authorization": f"Bearer {(await self.login(email, password))['access_token']}"}

    async def create_user(self, email: str, role: str, password: str = "a long password 1") -> dict[str, str]:
        resp = await self.client.post(
            "/api/v1/auth/users",
            json={"email": email, "password": password, "display_name": email.split("@")[0], "role": role},
            headers=await self.headers(),
        )
        assert resp.status_code == 201, resp.text
        body: dict[str, str] = resp.json()
        return body


def make_settings(tmp_path: Path, nats_url: str, database_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path,
        nats_url=nats_url,
        database_url=database_url,
        admin_email=ADMIN_EMAIL,
        admin_password=ADMIN_PASSWORD,
        api_key_cache_ttl_s=0,
        access_token_ttl_s=60,
    )


@pytest.fixture
async def auth(tmp_path: Path, nats_url: str, database_url: str) -> AsyncIterator[Auth]:
    settings = make_settings(tmp_path, nats_url, database_url)
    app = create_app(settings)
    async with app_client(app) as client:
        yield Auth(client, app, settings)


@pytest.fixture
async def auth_sqlite(tmp_path: Path, nats_url: str) -> AsyncIterator[Auth]:
    """For tests whose subject is not the database: SQLite only, faster."""
    settings = make_settings(tmp_path, nats_url, f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}")
    app = create_app(settings)
    async with app_client(app) as client:
        yield Auth(client, app, settings)


async def db_count(auth: Auth, model: Any, *where: Any) -> int:
    from strata.common.db import Database

    db = Database(auth.settings.database_url)
    try:
        async with db.session() as session:
            return int(await session.scalar(select(func.count()).select_from(model).where(*where)) or 0)
    finally:
        await db.dispose()


async def current_key(auth: Auth) -> SigningKey:
    from strata.common.db import Database

    db = Database(auth.settings.database_url)
    try:
        async with db.session() as session:
            key = await session.scalar(select(SigningKey).where(SigningKey.status == "current"))
            assert key is not None
            return key
    finally:
        await db.dispose()


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    result: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return result


def assert_error(resp: Any, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert body["code"] == code, body
    assert body["request_id"] == resp.headers["x-request-id"]


# -- sign-in ---------------------------------------------------------------------------------------------------------
async def test_login_and_me(auth: Auth) -> None:
    tokens = await auth.login()
    assert tokens["token_type"] == "bearer" and tokens["refresh_token"]
    header = jwt.get_unverified_header(tokens["access_token"])
    assert header["alg"] == "EdDSA" and header["kid"] == (await current_key(auth)).kid
    claims = claims_of(tokens["access_token"])
    assert {"iss", "aud", "sub", "role", "exp", "iat", "jti", "sid"} <= set(claims)
    assert claims["role"] == "admin" and claims["iss"] == "strata" and claims["aud"] == "strata-api"
    me = await auth.client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert me.status_code == 200
    assert me.json()["email"] == ADMIN_EMAIL and "password" not in me.text and "hash" not in me.text


async def test_wrong_password_unknown_email_and_disabled_user_look_the_same(auth_sqlite: Auth) -> None:
    auth = auth_sqlite
    user = await auth.create_user("dora@example.com", "viewer")
    await auth.client.patch(f"/api/v1/auth/users/{user['id']}", json={"is_active": False}, headers=await auth.headers())
    tokens_before, users_before = await db_count(auth, RefreshToken), await db_count(auth, User)
    answers = []
    for email, password in [
        (ADMIN_EMAIL, "wrong password!"),
        ("nobody@example.com", ADMIN_PASSWORD),
        ("dora@example.com", "a long password 1"),
    ]:
        started = time.perf_counter()
        resp = await auth.client.post("/api/v1/auth/token", data={"username": email, "password": password})
        answers.append((resp.status_code, resp.json()["error"]["code"], resp.json()["error"]["message"]))
        assert time.perf_counter() - started > 0.005  # argon2 ran even for the unknown email
    assert len(set(answers)) == 1 and answers[0][:2] == (401, "INVALID_CREDENTIALS")
    assert (await db_count(auth, RefreshToken), await db_count(auth, User)) == (tokens_before, users_before)


async def test_login_form_errors(auth_sqlite: Auth) -> None:
    resp = await auth_sqlite.client.post("/api/v1/auth/token", data={"username": ADMIN_EMAIL})
    assert_error(resp, 422, "VALIDATION_ERROR")
    resp = await auth_sqlite.client.post("/api/v1/auth/token", json={"username": ADMIN_EMAIL, "password": "x"})
    assert resp.status_code == 422


# -- forged and broken tokens ----------------------------------------------------------------------------------------
def _forge(claims: dict[str, Any], key: Any, alg: str, kid: str) -> str:
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


async def test_attacks_on_the_access_token(auth_sqlite: Auth) -> None:
    auth = auth_sqlite
    tokens = await auth.login()
    good = tokens["access_token"]
    claims = claims_of(good)
    kid = jwt.get_unverified_header(good)["kid"]
    key = await current_key(auth)
    private = security.load_private_key(key.private_key, None)
    now = datetime.now(UTC)

    def with_claims(**changes: Any) -> dict[str, Any]:
        return {**claims, **changes}

    head, _payload, sig = good.split(".")
    tampered_payload = base64.urlsafe_b64encode(json.dumps(with_claims(role="admin", sub="someone-else")).encode())
    none_token = (
        base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": kid}).encode()).decode().rstrip("=")
        + "."
        + base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        + "."
    )
    public_bytes = base64.urlsafe_b64decode(key.public_jwk["x"] + "==")
    cases = {
        "expired": (
            _forge(with_claims(exp=int((now - timedelta(minutes=5)).timestamp())), private, "EdDSA", kid),
            "TOKEN_EXPIRED",
        ),
        "another key": (_forge(claims, Ed25519PrivateKey.generate(), "EdDSA", kid), "INVALID_TOKEN"),
        "alg none": (none_token, "INVALID_TOKEN"),
        "HS256 with the public key": (_forge(claims, public_bytes, "HS256", kid), "INVALID_TOKEN"),
        "wrong aud": (_forge(with_claims(aud="other-api"), private, "EdDSA", kid), "INVALID_TOKEN"),
        "wrong iss": (_forge(with_claims(iss="evil"), private, "EdDSA", kid), "INVALID_TOKEN"),
        "unknown kid": (_forge(claims, private, "EdDSA", "nope"), "INVALID_TOKEN"),
        "tampered payload": (f"{head}.{tampered_payload.decode().rstrip('=')}.{sig}", "INVALID_TOKEN"),
        "garbage": ("not.a.jwt", "INVALID_TOKEN"),
        "no exp": (_forge({k: v for k, v in claims.items() if k != "exp"}, private, "EdDSA", kid), "INVALID_TOKEN"),
    }
    for name, (token, code) in cases.items():
        resp = await auth.client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 401, name
        assert resp.json()["error"]["code"] == code, name
        assert resp.headers["www-authenticate"] == "Bearer"
    for header in (
        {},
        {"Authorization": ""},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {good} extra"},
    ):
        resp = await auth.client.get("/api/v1/auth/me", headers=header)
        assert resp.status_code == 401 and resp.json()["error"]["code"] in ("UNAUTHORIZED", "INVALID_TOKEN"), header
    assert (await auth.client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {good}"})).status_code == 200


# -- refresh rotation ------------------------------------------------------------------------------------------------
async def test_refresh_rotates_and_reuse_revokes_the_family(auth: Auth) -> None:
    first = await auth.login()
    second = (await auth.client.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})).json()
    assert second["refresh_token"] != first["refresh_token"]
    assert claims_of(second["access_token"])["sid"] == claims_of(first["access_token"])["sid"]

    reused = await auth.client.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert_error(reused, 401, "REFRESH_TOKEN_REUSED")
    # The thief's copy and the victim's latest token are both dead now: the whole family is revoked.
    latest = await auth.client.post("/api/v1/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert_error(latest, 401, "INVALID_REFRESH_TOKEN")
    assert await db_count(auth, Outbox, Outbox.subject == "strata.auth.session.revoked") == 1
    sid = claims_of(first["access_token"])["sid"]
    assert await db_count(auth, RefreshToken, RefreshToken.family_id == sid, RefreshToken.revoked_at.is_(None)) == 0


async def test_refresh_bad_input(auth_sqlite: Auth) -> None:
    client = auth_sqlite.client
    assert_error(
        await client.post("/api/v1/auth/refresh", json={"refresh_token": "made-up"}), 401, "INVALID_REFRESH_TOKEN"
    )
    assert_error(await client.post("/api/v1/auth/refresh"), 401, "INVALID_REFRESH_TOKEN")
    assert_error(
        await client.post("/api/v1/auth/refresh", json={"refresh_token": "x", "extra": 1}), 422, "VALIDATION_ERROR"
    )
    resp = await client.post("/api/v1/auth/refresh", content=b"{bad json", headers={"Content-Type": "application/json"})
    assert_error(resp, 422, "VALIDATION_ERROR")


def set_cookies(resp: httpx.Response) -> dict[str, str]:
    """Each ``Set-Cookie`` of a response by cookie name (the whole header: value and attributes)."""
    return {h.split("=", 1)[0]: h for h in resp.headers.get_list("set-cookie")}


def cookie_value(header: str) -> str:
    return header.split(";")[0].split("=", 1)[1]


async def test_refresh_cookie_flow_and_logout(auth_sqlite: Auth) -> None:
    client = auth_sqlite.client
    resp = await client.post(
        "/api/v1/auth/token?refresh_cookie=true", data={"username": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
    )
    assert resp.status_code == 200 and resp.json()["refresh_token"] is None
    cookies = set_cookies(resp)
    assert set(cookies) == {"strata_refresh", ACCESS_COOKIE}
    cookie = cookies["strata_refresh"]
    assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=strict" in cookie and "Path=/api/v1/auth" in cookie
    token = cookie_value(cookie)
    # As a browser would: the cookie is sent back (the test client is plain HTTP, so set it by hand).
    client.cookies.set("strata_refresh", token)
    again = await client.post("/api/v1/auth/refresh")
    assert again.status_code == 200 and again.json()["refresh_token"] is None
    new_cookie = cookie_value(set_cookies(again)["strata_refresh"])
    client.cookies.set("strata_refresh", new_cookie)
    out = await client.post("/api/v1/auth/logout")
    assert out.status_code == 204 and "strata_refresh=" in out.headers["set-cookie"]
    client.cookies.set("strata_refresh", new_cookie)
    assert_error(await client.post("/api/v1/auth/refresh"), 401, "INVALID_REFRESH_TOKEN")
    client.cookies.clear()
    # Logging out twice, or with nothing, is fine and says nothing.
    assert (await client.post("/api/v1/auth/logout")).status_code == 204


def assert_access_cookie(header: str, access_token: str, expires_in: int) -> None:
    attributes = {a.strip().split("=", 1)[0].lower(): a.strip() for a in header.split(";")[1:]}
    assert cookie_value(header) == access_token
    assert attributes["path"] == f"Path={WS_PATH}" and attributes["max-age"] == f"Max-Age={expires_in}"
    assert {"httponly", "secure"} <= set(attributes) and attributes["samesite"] == "SameSite=strict"


async def test_cookie_sign_in_sets_the_access_cookie_for_the_websocket(auth_sqlite: Auth) -> None:
    client = auth_sqlite.client
    form = {"username": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
    resp = await client.post("/api/v1/auth/token?refresh_cookie=true", data=form)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["expires_in"] == 60
    assert_access_cookie(set_cookies(resp)[ACCESS_COOKIE], body["access_token"], body["expires_in"])
    # The cookie's token is a working access token.
    me = await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status_code == 200 and me.json()["email"] == ADMIN_EMAIL

    # A refresh with the cookie renews both cookies, with the new access token.
    client.cookies.set("strata_refresh", cookie_value(set_cookies(resp)["strata_refresh"]))
    again = await client.post("/api/v1/auth/refresh")
    assert again.status_code == 200, again.text
    renewed = again.json()
    assert renewed["access_token"] != body["access_token"]
    assert_access_cookie(set_cookies(again)[ACCESS_COOKIE], renewed["access_token"], renewed["expires_in"])

    # Logout clears it, at the same path (else the browser keeps it).
    client.cookies.set("strata_refresh", cookie_value(set_cookies(again)["strata_refresh"]))
    out = await client.post("/api/v1/auth/logout")
    assert out.status_code == 204
    cleared = set_cookies(out)[ACCESS_COOKIE]
    assert cookie_value(cleared) in ("", '""') and "Max-Age=0" in cleared and f"Path={WS_PATH}" in cleared


async def test_no_access_cookie_without_cookie_mode(auth_sqlite: Auth) -> None:
    client = auth_sqlite.client
    form = {"username": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
    for query in ("", "?refresh_cookie=false"):
        resp = await client.post(f"/api/v1/auth/token{query}", data=form)
        assert resp.status_code == 200 and resp.json()["refresh_token"]
        assert set_cookies(resp) == {}
    # A refresh with the token in the body stays in body mode, even if a refresh cookie is also sent.
    client.cookies.set("strata_refresh", "stale")
    again = await client.post("/api/v1/auth/refresh", json={"refresh_token": resp.json()["refresh_token"]})
    assert again.status_code == 200 and again.json()["refresh_token"]
    assert set_cookies(again) == {}


# -- users -----------------------------------------------------------------------------------------------------------
async def test_admin_manages_users_and_others_cannot(auth: Auth) -> None:
    admin = await auth.headers()
    analyst = await auth.create_user("ana@example.com", "analyst")
    viewer = await auth.create_user("vic@example.com", "viewer")
    viewer_h = await auth.headers("vic@example.com", "a long password 1")
    listed = (await auth.client.get("/api/v1/auth/users?role=analyst", headers=admin)).json()
    assert [u["email"] for u in listed["data"]] == ["ana@example.com"] and listed["meta"]["next_cursor"] is None

    page1 = (await auth.client.get("/api/v1/auth/users?limit=2", headers=admin)).json()
    page2 = (
        await auth.client.get(f"/api/v1/auth/users?limit=2&cursor={page1['meta']['next_cursor']}", headers=admin)
    ).json()
    assert len(page1["data"]) == 2 and len(page2["data"]) == 1
    assert {u["id"] for u in page1["data"]}.isdisjoint(u["id"] for u in page2["data"])
    assert_error(await auth.client.get("/api/v1/auth/users?cursor=%%%", headers=admin), 400, "BAD_REQUEST")

    for method, path, body in [
        ("GET", "/api/v1/auth/users", None),
        ("GET", f"/api/v1/auth/users/{analyst['id']}", None),
        ("PATCH", f"/api/v1/auth/users/{analyst['id']}", {"role": "viewer"}),
        ("PATCH", f"/api/v1/auth/users/{viewer['id']}", {"role": "admin"}),
        (
            "POST",
            "/api/v1/auth/users",
            {"email": "x@example.com", "password": "a long password 1", "display_name": "x"},
        ),
        ("DELETE", f"/api/v1/auth/users/{analyst['id']}", None),
        ("POST", "/api/v1/auth/keys/rotate", None),
    ]:
        resp = await auth.client.request(method, path, json=body, headers=viewer_h)
        assert_error(resp, 403, "FORBIDDEN")
    assert await db_count(auth, User, User.role == "admin") == 1


async def test_user_input_is_validated_and_nothing_changes(auth_sqlite: Auth) -> None:
    auth = auth_sqlite
    admin = await auth.headers()
    before = await db_count(auth, User)
    bad = [
        ({"email": "not-an-email", "password": "a long password 1", "display_name": "x"}, "VALIDATION_ERROR"),
        ({"email": "a@example.com", "password": "short", "display_name": "x"}, "WEAK_PASSWORD"),
        (
            {"email": "a@example.com", "password": "a long password 1", "display_name": "x", "is_root": True},
            "VALIDATION_ERROR",
        ),
        (
            {"email": "a@example.com", "password": "a long password 1", "display_name": "x", "role": "god"},
            "VALIDATION_ERROR",
        ),
        ({"email": ADMIN_EMAIL.upper(), "password": "a long password 1", "display_name": "x"}, "EMAIL_TAKEN"),
    ]
    for body, code in bad:
        resp = await auth.client.post("/api/v1/auth/users", json=body, headers=admin)
        assert resp.json()["error"]["code"] == code, (body, resp.text)
        assert "a long password 1" not in resp.text
    assert await db_count(auth, User) == before
    assert_error(await auth.client.get("/api/v1/auth/users/nope", headers=admin), 404, "USER_NOT_FOUND")


async def test_deactivation_and_demotion_end_sessions(auth: Auth) -> None:
    admin = await auth.headers()
    user = await auth.create_user("eve@example.com", "analyst")
    tokens = await auth.login("eve@example.com", "a long password 1")
    resp = await auth.client.patch(f"/api/v1/auth/users/{user['id']}", json={"role": "viewer"}, headers=admin)
    assert resp.status_code == 200 and resp.json()["role"] == "viewer"
    assert_error(
        await auth.client.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}),
        401,
        "INVALID_REFRESH_TOKEN",
    )
    tokens = await auth.login("eve@example.com", "a long password 1")
    assert claims_of(tokens["access_token"])["role"] == "viewer"
    await auth.client.patch(f"/api/v1/auth/users/{user['id']}", json={"is_active": False}, headers=admin)
    assert_error(
        await auth.client.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}),
        401,
        "INVALID_REFRESH_TOKEN",
    )
    subjects = {"strata.auth.user.demoted", "strata.auth.user.deactivated", "strata.auth.session.revoked"}
    for subject in subjects:
        assert await db_count(auth, Outbox, Outbox.subject == subject) >= 1, subject


async def test_the_last_admin_stays(auth_sqlite: Auth) -> None:
    auth = auth_sqlite
    admin = await auth.headers()
    me = (await auth.client.get("/api/v1/auth/me", headers=admin)).json()
    for body in ({"role": "viewer"}, {"is_active": False}):
        assert_error(
            await auth.client.patch(f"/api/v1/auth/users/{me['id']}", json=body, headers=admin), 409, "LAST_ADMIN"
        )
    assert_error(await auth.client.delete(f"/api/v1/auth/users/{me['id']}", headers=admin), 409, "LAST_ADMIN")


async def test_change_own_password_needs_the_current_one(auth_sqlite: Auth) -> None:
    auth = auth_sqlite
    await auth.create_user("pat@example.com", "viewer")
    headers = await auth.headers("pat@example.com", "a long password 1")
    resp = await auth.client.patch("/api/v1/auth/me", json={"password": "another long one"}, headers=headers)
    assert_error(resp, 401, "INVALID_CREDENTIALS")
    resp = await auth.client.patch(
        "/api/v1/auth/me",
        json={"password": "another long one", "current_password": "a long password 1"},
        headers=headers,
    )
    assert resp.status_code == 200
    await auth.login("pat@example.com", "another long one")
    resp = await auth.client.patch("/api/v1/auth/me", json={"role": "admin"}, headers=headers)
    assert_error(resp, 422, "VALIDATION_ERROR")


# -- API keys --------------------------------------------------------------------------------------------------------
async def test_api_keys(auth_sqlite: Auth) -> None:
    auth = auth_sqlite
    await auth.create_user("bot@example.com", "analyst")
    owner = await auth.headers("bot@example.com", "a long password 1")
    assert_error(
        await auth.client.post("/api/v1/auth/api-keys", json={"name": "x", "role": "admin"}, headers=owner),
        403,
        "FORBIDDEN",
    )
    created = await auth.client.post("/api/v1/auth/api-keys", json={"name": "ci", "role": "viewer"}, headers=owner)
    assert created.status_code == 201
    key = created.json()["key"]
    assert key.startswith("strata_")
    as_key = {"Authorization": f"Bearer {key}"}
    me = await auth.client.get("/api/v1/auth/me", headers=as_key)
    assert me.status_code == 200 and me.json()["email"] == "bot@example.com"
    listed = (await auth.client.get("/api/v1/auth/api-keys", headers=owner)).json()["data"]
    assert len(listed) == 1 and "key" not in listed[0] and key not in json.dumps(listed)
    # An API key cannot mint more keys, nor reach what its (lower) role may not.
    assert_error(await auth.client.post("/api/v1/auth/api-keys", json={"name": "y"}, headers=as_key), 403, "FORBIDDEN")
    # Another user cannot see or revoke it.
    await auth.create_user("mal@example.com", "analyst")
    other = await auth.headers("mal@example.com", "a long password 1")
    assert_error(
        await auth.client.delete(f"/api/v1/auth/api-keys/{created.json()['id']}", headers=other),
        404,
        "API_KEY_NOT_FOUND",
    )
    assert (await auth.client.delete(f"/api/v1/auth/api-keys/{created.json()['id']}", headers=owner)).status_code == 204
    assert_error(await auth.client.get("/api/v1/auth/me", headers=as_key), 401, "INVALID_TOKEN")
    assert_error(
        await auth.client.get("/api/v1/auth/me", headers={"Authorization": "Bearer strata_made_up"}),
        401,
        "INVALID_TOKEN",
    )


# -- signing keys ----------------------------------------------------------------------------------------------------
async def test_jwks_and_rotation(auth_sqlite: Auth) -> None:
    auth = auth_sqlite
    old = await auth.headers()
    jwks = (await auth.client.get("/api/v1/auth/.well-known/jwks.json")).json()
    assert len(jwks["keys"]) == 1 and "d" not in jwks["keys"][0]  # never the private part
    rotated = (await auth.client.post("/api/v1/auth/keys/rotate", headers=old)).json()
    jwks = (await auth.client.get("/api/v1/auth/.well-known/jwks.json")).json()
    assert [k["kid"] for k in jwks["keys"]] == [rotated["kid"], rotated["previous_kid"]]
    assert (await auth.client.get("/api/v1/auth/me", headers=old)).status_code == 200  # old tokens still verify
    new = await auth.login()
    assert jwt.get_unverified_header(new["access_token"])["kid"] == rotated["kid"]
    await auth.client.post("/api/v1/auth/keys/rotate", headers=old)
    jwks = (await auth.client.get("/api/v1/auth/.well-known/jwks.json")).json()
    assert rotated["previous_kid"] not in [k["kid"] for k in jwks["keys"]]  # two rotations ago: retired
    assert_error(await auth.client.get("/api/v1/auth/me", headers=old), 401, "INVALID_TOKEN")
