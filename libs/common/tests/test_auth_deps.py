"""The shared auth dependencies: ``CurrentUser`` and ``require_role`` on a service's own routes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

from fastapi import APIRouter, Depends
from pydantic_settings import SettingsConfigDict

from strata.common.app import Runtime, create_service_app
from strata.common.contracts.auth import Identity, Role
from strata.common.deps import AdminUser, CurrentUser, require_role
from strata.common.observability import Metrics
from strata.common.settings import ServiceSettings
from strata.common.testing import TokenFactory, app_client

TOKENS = TokenFactory()


class DemoSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="STRATA_DEMO_", extra="ignore")
    service_name: ClassVar[str] = "demo"


router = APIRouter()


@router.get("/api/v1/demo/read")
async def read(user: CurrentUser) -> dict[str, str]:
    return {"user": user.user_id, "role": user.role.value}


@router.post("/api/v1/demo/run")
async def run(user: Annotated[Identity, Depends(require_role(Role.analyst))]) -> dict[str, str]:
    return {"ran_by": user.user_id}


@router.delete("/api/v1/demo/all")
async def wipe(user: AdminUser) -> dict[str, str]:
    return {"wiped_by": user.user_id}


def make_app(tmp_path: Path, nats_url: str):  # type: ignore[no-untyped-def]
    settings = DemoSettings(data_dir=tmp_path, nats_url=nats_url)
    app = create_service_app(
        settings, runtime=Runtime(settings, metrics=Metrics("demo")), title="demo", routers=[router]
    )
    TOKENS.install(app)
    return app


async def test_roles_on_service_routes(tmp_path: Path, nats_url: str) -> None:
    expected = {  # role -> (read, run, wipe)
        "viewer": (200, 403, 403),
        "analyst": (200, 200, 403),
        "admin": (200, 200, 200),
    }
    async with app_client(make_app(tmp_path, nats_url)) as client:
        for role, codes in expected.items():
            headers = TOKENS.headers(user_id=f"u-{role}", role=role)
            got = (
                (await client.get("/api/v1/demo/read", headers=headers)).status_code,
                (await client.post("/api/v1/demo/run", headers=headers)).status_code,
                (await client.delete("/api/v1/demo/all", headers=headers)).status_code,
            )
            assert got == codes, role
        refused = await client.post("/api/v1/demo/run", headers=TOKENS.headers(role="viewer"))
        assert refused.json()["error"]["code"] == "FORBIDDEN"
        assert "analyst" in refused.json()["error"]["message"]
        for headers in ({}, {"Authorization": "Bearer nope"}, TOKENS.headers(role="superuser")):
            assert (await client.get("/api/v1/demo/read", headers=headers)).status_code == 401


async def test_the_service_declares_the_oauth2_flow(tmp_path: Path, nats_url: str) -> None:
    spec = make_app(tmp_path, nats_url).openapi()
    scheme = spec["components"]["securitySchemes"]["OAuth2PasswordBearer"]
    assert scheme["flows"]["password"]["tokenUrl"] == "/api/v1/auth/token"
    assert spec["paths"]["/api/v1/demo/run"]["post"]["security"] == [{"OAuth2PasswordBearer": []}]


async def test_verified_tokens_are_cached_until_the_keys_change() -> None:
    from strata.common.auth import InvalidToken, TokenVerifier

    first, second = TokenFactory(), TokenFactory()
    current = {"jwks": first.jwks()}
    fetches = 0

    async def source() -> dict[str, object]:
        nonlocal fetches
        fetches += 1
        return current["jwks"]

    verifier = TokenVerifier(jwks_source=source, api_key_source=None, issuer="strata", audience="strata-api")
    token = first.token(role="analyst")
    for _ in range(3):
        assert (await verifier.verify(token)).role.value == "analyst"
    assert fetches == 1
    # The key that signed it is retired: once the verifier learns of new keys, the cached token is no good either.
    current["jwks"] = second.jwks()
    verifier.forget_keys()
    try:
        await verifier.verify(token)
    except InvalidToken:
        pass
    else:
        raise AssertionError("a token signed by a retired key was still accepted from the cache")
    assert (await verifier.verify(second.token())).user_id == "user-1"


async def test_the_first_requests_wait_for_an_auth_service_that_is_still_starting() -> None:
    """A service that started with auth: the first JWKS fetch found no responder; a token arriving a moment later is
    verified once auth answers, instead of being refused as signed by an unknown key."""
    from strata.common.auth import TokenVerifier
    from strata.common.errors import ServiceUnavailable

    tokens = TokenFactory()
    calls = 0

    async def jwks() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ServiceUnavailable("The auth service is not available.")
        return tokens.jwks()

    async def no_api_keys(key: str) -> Identity:
        raise AssertionError("not an API key")

    verifier = TokenVerifier(jwks_source=jwks, api_key_source=no_api_keys, issuer="strata", audience="strata-api")
    assert not await verifier.refresh_keys()  # at start-up: auth not there yet
    identity = await verifier.verify(tokens.token(user_id="u-1", role="analyst"))
    assert identity.user_id == "u-1" and calls == 3
