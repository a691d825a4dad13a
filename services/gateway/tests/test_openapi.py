"""The merged OpenAPI document, the aggregator that builds it from live services, and the docs page that shows it."""

from __future__ import annotations

import asyncio
import copy
import importlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from openapi_spec_validator import validate

from strata.common.procs import free_port
from strata.common.testing import serve_app
from strata.gateway.openapi import (
    MISSING_SERVICES,
    OAUTH2_SCHEME,
    STALE_SERVICES,
    OpenApiAggregator,
    install_docs,
    merge_specs,
)
from strata.gateway.proxy import upstream_session

SERVICES = ("auth", "datasets", "execution", "schemas")
TOKEN_URL = "/api/v1/auth/token"


# -- helpers ------------------------------------------------------------------------------------------------------


def spec(title: str, paths: dict[str, Any], schemas: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"openapi": "3.1.0", "info": {"title": title, "version": "1"}, "paths": paths, **extra}
    if schemas is not None:
        doc.setdefault("components", {})["schemas"] = schemas
    return doc


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def get_op(schema_ref: dict[str, Any], op_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "get": {
            "operationId": op_id,
            "responses": {"200": {"description": "ok", "content": {"application/json": {"schema": schema_ref}}}},
            **extra,
        }
    }


def refs_in(node: Any) -> Iterator[str]:
    """Every reference in ``node``: ``$ref`` values and discriminator mappings."""
    if isinstance(node, list):
        for child in node:
            yield from refs_in(child)
    elif isinstance(node, dict):
        for key, child in node.items():
            if key == "$ref" and isinstance(child, str):
                yield child
            elif key == "discriminator" and isinstance(child, dict):
                yield from child.get("mapping", {}).values()
            else:
                yield from refs_in(child)


def resolve(doc: dict[str, Any], pointer: str) -> Any:
    assert pointer.startswith("#/"), pointer
    node: Any = doc
    for part in pointer[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def assert_refs_resolve(doc: dict[str, Any]) -> None:
    for pointer in refs_in(doc):
        resolve(doc, pointer)  # a KeyError names the dangling one


def operations(doc: dict[str, Any]) -> list[dict[str, Any]]:
    methods = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
    return [item[m] for item in doc["paths"].values() for m in methods if m in item]


def merge(*parts: tuple[str, dict[str, Any]], gateway: dict[str, Any] | None = None) -> dict[str, Any]:
    return merge_specs(gateway or spec("gw", {}), dict(parts), title="Strata API", version="9.9", token_url=TOKEN_URL)


# -- merge_specs ----------------------------------------------------------------------------------------------------

ERROR = {"type": "object", "properties": {"detail": {"type": "array", "items": ref("ValidationError")}}}
VALIDATION_ERROR = {"type": "object", "properties": {"msg": {"type": "string"}}, "required": ["msg"]}


def test_identical_schemas_are_kept_once() -> None:
    schemas = {"HTTPValidationError": ERROR, "ValidationError": VALIDATION_ERROR}
    doc = merge(
        ("auth", spec("auth", {"/api/v1/auth/me": get_op(ref("HTTPValidationError"), "me")}, copy.deepcopy(schemas))),
        ("datasets", spec("ds", {"/api/v1/datasets": get_op(ref("HTTPValidationError"), "list")}, schemas)),
    )
    assert doc["components"]["schemas"] == schemas
    for path in ("/api/v1/auth/me", "/api/v1/datasets"):
        assert doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == ref(
            "HTTPValidationError"
        )
    validate(doc)


def test_conflicting_schemas_are_renamed_and_every_ref_in_that_service_rewritten() -> None:
    auth_item = {"type": "object", "properties": {"name": {"type": "string"}}}
    ds_item = {"type": "object", "properties": {"id": {"type": "integer"}, "parent": ref("Item")}}
    # Textually the same in both services, but each points at its own Item: datasets' Page must be renamed too.
    page = {"type": "object", "properties": {"data": {"type": "array", "items": ref("Item")}}}
    cat = {
        "type": "object",
        "properties": {"kind": {"const": "cat"}, "item": {"anyOf": [ref("Item"), {"type": "null"}]}},
    }
    pet = {
        "oneOf": [ref("Cat")],
        "discriminator": {"propertyName": "kind", "mapping": {"cat": "#/components/schemas/Cat"}},
    }
    auth = spec(
        "auth",
        {"/api/v1/auth/items": get_op(ref("Page"), "auth_items")},
        {"Item": auth_item, "Page": page, "Cat": copy.deepcopy(cat), "Pet": copy.deepcopy(pet)},
    )
    auth["components"]["schemas"]["Cat"]["properties"]["lives"] = {"type": "integer"}  # so datasets' Cat differs
    datasets_paths = {
        "/api/v1/datasets/{id}": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": ref("Item")}],
            "post": {
                "operationId": "ds_post",
                "requestBody": {"content": {"application/json": {"schema": {"allOf": [ref("Page")]}}}},
                "responses": {
                    "200": {
                        "description": "ok",
                        "headers": {"X-Item": {"schema": ref("Item")}},
                        "content": {"application/json": {"schema": ref("Pet")}},
                    }
                },
            },
        }
    }
    # Page and Pet come before what they refer to, so one pass over the names would not find that they differ.
    datasets = spec("datasets", datasets_paths, {"Pet": pet, "Page": copy.deepcopy(page), "Cat": cat, "Item": ds_item})
    untouched = copy.deepcopy(datasets)

    doc = merge(("auth", auth), ("datasets", datasets))

    schemas = doc["components"]["schemas"]
    assert set(schemas) == {
        "Item",
        "Page",
        "Cat",
        "Pet",
        "Datasets_Item",
        "Datasets_Page",
        "Datasets_Cat",
        "Datasets_Pet",
    }
    assert schemas["Item"] == auth_item
    assert schemas["Datasets_Item"]["properties"]["parent"] == ref("Datasets_Item")  # self-reference followed
    assert schemas["Datasets_Page"]["properties"]["data"]["items"] == ref("Datasets_Item")
    assert schemas["Page"]["properties"]["data"]["items"] == ref("Item")  # auth's part is not touched
    assert schemas["Datasets_Cat"]["properties"]["item"]["anyOf"][0] == ref("Datasets_Item")
    assert schemas["Datasets_Pet"]["discriminator"]["mapping"] == {"cat": "#/components/schemas/Datasets_Cat"}
    assert schemas["Pet"]["discriminator"]["mapping"] == {"cat": "#/components/schemas/Cat"}
    item = doc["paths"]["/api/v1/datasets/{id}"]
    assert item["parameters"][0]["schema"] == ref("Datasets_Item")
    assert item["post"]["requestBody"]["content"]["application/json"]["schema"] == {"allOf": [ref("Datasets_Page")]}
    assert item["post"]["responses"]["200"]["headers"]["X-Item"]["schema"] == ref("Datasets_Item")
    assert item["post"]["responses"]["200"]["content"]["application/json"]["schema"] == ref("Datasets_Pet")
    assert doc["paths"]["/api/v1/auth/items"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == (
        ref("Page")
    )
    assert datasets == untouched  # the inputs are not modified
    assert_refs_resolve(doc)
    validate(doc)


def test_other_component_sections_are_renamed_too() -> None:
    def with_param(description: str) -> dict[str, Any]:
        return spec(
            "x",
            {},
            components={
                "parameters": {"Limit": {"name": "limit", "in": "query", "description": description, "schema": {}}}
            },
        )

    auth, datasets = with_param("auth's"), with_param("datasets'")
    auth["paths"] = {"/api/v1/auth/users": {"get": {"parameters": [{"$ref": "#/components/parameters/Limit"}]}}}
    datasets["paths"] = {"/api/v1/datasets": {"get": {"parameters": [{"$ref": "#/components/parameters/Limit"}]}}}

    doc = merge(("auth", auth), ("datasets", datasets))

    assert set(doc["components"]["parameters"]) == {"Limit", "Datasets_Limit"}
    assert doc["paths"]["/api/v1/datasets"]["get"]["parameters"] == [{"$ref": "#/components/parameters/Datasets_Limit"}]
    assert doc["paths"]["/api/v1/auth/users"]["get"]["parameters"] == [{"$ref": "#/components/parameters/Limit"}]
    validate(doc)


def test_a_path_in_two_services_is_logged_and_the_first_wins(caplog: pytest.LogCaptureFixture) -> None:
    first = spec("auth", {"/api/v1/shared": get_op({"type": "string"}, "from_auth")})
    second = spec(
        "datasets",
        {"/api/v1/shared": get_op({"type": "integer"}, "from_datasets"), "/api/v1/datasets": get_op({}, "list")},
    )
    with caplog.at_level(logging.ERROR, logger="strata.gateway.openapi"):
        doc = merge(("auth", first), ("datasets", second))
    assert doc["paths"]["/api/v1/shared"]["get"]["operationId"] == "from_auth"
    assert "/api/v1/datasets" in doc["paths"]  # the rest of the second service is still there
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "/api/v1/shared" in record.getMessage()
    assert "auth" in record.getMessage() and "datasets" in record.getMessage()
    assert {op["operationId"] for op in operations(doc)} == {"from_auth", "list"}  # the loser reserves no id


def test_operation_ids_are_made_unique() -> None:
    link = {"links": {"next": {"operationId": "list_items"}}}
    auth = spec("auth", {"/api/v1/auth/items": get_op({}, "list_items")})
    datasets_paths = {"/api/v1/datasets/items": get_op({}, "list_items"), "/api/v1/datasets/x": get_op({}, "x")}
    datasets_paths["/api/v1/datasets/x"]["get"]["responses"]["200"].update(copy.deepcopy(link))
    datasets = spec("datasets", datasets_paths)
    schemas = spec("schemas", {"/api/v1/schemas/items": get_op({}, "list_items")})

    doc = merge(("auth", auth), ("datasets", datasets), ("schemas", schemas))

    ids = [op["operationId"] for op in operations(doc)]
    assert len(ids) == len(set(ids))
    assert doc["paths"]["/api/v1/auth/items"]["get"]["operationId"] == "list_items"
    assert doc["paths"]["/api/v1/datasets/items"]["get"]["operationId"] == "datasets_list_items"
    assert doc["paths"]["/api/v1/schemas/items"]["get"]["operationId"] == "schemas_list_items"
    # A link inside datasets' part meant datasets' own operation, now renamed.
    assert doc["paths"]["/api/v1/datasets/x"]["get"]["responses"]["200"]["links"]["next"]["operationId"] == (
        "datasets_list_items"
    )
    validate(doc)


def test_the_oauth2_password_flow_is_declared_and_services_schemes_are_deduplicated() -> None:
    same = {"type": "oauth2", "flows": {"password": {"scopes": {}, "tokenUrl": TOKEN_URL}}, "description": "Log in."}
    other_url = {"type": "oauth2", "flows": {"password": {"scopes": {}, "tokenUrl": "/elsewhere"}}}
    api_key = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    secured = get_op({}, "me", security=[{OAUTH2_SCHEME: []}])

    def secured_spec(title: str, path: str, schemes: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return spec(title, {path: copy.deepcopy(secured)}, components={"securitySchemes": schemes}, **extra)

    doc = merge(
        ("auth", secured_spec("auth", "/api/v1/auth/me", {OAUTH2_SCHEME: same, "APIKeyHeader": api_key})),
        ("datasets", secured_spec("datasets", "/api/v1/datasets", {OAUTH2_SCHEME: copy.deepcopy(same)})),
        ("execution", secured_spec("execution", "/api/v1/jobs", {OAUTH2_SCHEME: other_url})),
        (
            "schemas",
            spec(
                "schemas",
                {"/api/v1/schemas": get_op({}, "schemas_list"), "/api/v1/schemas/open": get_op({}, "o", security=[])},
                components={"securitySchemes": {"APIKeyHeader": api_key}},
                security=[{"APIKeyHeader": []}],
            ),
        ),
    )

    schemes = doc["components"]["securitySchemes"]
    assert schemes[OAUTH2_SCHEME]["type"] == "oauth2"
    assert schemes[OAUTH2_SCHEME]["flows"]["password"]["tokenUrl"] == TOKEN_URL
    assert set(schemes) == {OAUTH2_SCHEME, "APIKeyHeader", "Execution_OAuth2PasswordBearer"}
    assert doc["paths"]["/api/v1/auth/me"]["get"]["security"] == [{OAUTH2_SCHEME: []}]
    assert doc["paths"]["/api/v1/datasets"]["get"]["security"] == [{OAUTH2_SCHEME: []}]
    assert doc["paths"]["/api/v1/jobs"]["get"]["security"] == [{"Execution_OAuth2PasswordBearer": []}]
    # A service's global requirement applies to its own operations only, and an explicit "none" stays none.
    assert "security" not in doc
    assert doc["paths"]["/api/v1/schemas"]["get"]["security"] == [{"APIKeyHeader": []}]
    assert doc["paths"]["/api/v1/schemas/open"]["get"]["security"] == []
    validate(doc)


def test_scheme_is_there_without_any_service_and_the_document_shape() -> None:
    gateway = spec(
        "Strata API",
        {
            "/healthz": get_op({}, "healthz"),
            "/readyz": get_op({}, "readyz"),
            "/metrics": get_op({}, "metrics"),
            "/openapi.json": get_op({}, "openapi"),
            "/docs": get_op({}, "docs"),
            "/api/v1/system/instances": get_op({}, "instances", tags=["system"]),
        },
        info={"title": "Strata API", "version": "1", "description": "The gateway."},
        tags=[{"name": "system", "description": "Instances and versions."}],
    )
    datasets = spec(
        "datasets",
        {"/api/v1/datasets": get_op({}, "list"), "/internal/debug": get_op({}, "debug")},
        info={"title": "Strata datasets", "version": "1", "description": "Uploads."},
    )

    doc = merge_specs(gateway, {"datasets": datasets}, title="Strata API", version="2.0", token_url="/t")

    assert doc["openapi"].startswith("3.1")
    assert doc["info"] == {"title": "Strata API", "version": "2.0", "description": "The gateway."}
    assert doc["servers"] == [{"url": "/"}]
    assert set(doc["paths"]) == {"/api/v1/system/instances", "/api/v1/datasets"}  # no internal or unproxied paths
    assert doc["components"]["securitySchemes"] == {
        OAUTH2_SCHEME: {"type": "oauth2", "flows": {"password": {"scopes": {}, "tokenUrl": "/t"}}}
    }
    assert doc["paths"]["/api/v1/datasets"]["get"]["tags"] == ["datasets"]
    assert doc["paths"]["/api/v1/system/instances"]["get"]["tags"] == ["system"]
    assert doc["tags"] == [
        {"name": "system", "description": "Instances and versions."},
        {"name": "datasets", "description": "Uploads."},
    ]
    validate(doc)


# -- the real services ----------------------------------------------------------------------------------------------


def real_specs(tmp_path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The gateway's and the services' documents, from their real apps (built, not started: nothing connects)."""
    docs: dict[str, dict[str, Any]] = {}
    for name in ("gateway", *SERVICES):
        app_module = importlib.import_module(f"strata.{name}.app")
        config = importlib.import_module(f"strata.{name}.config")
        settings = config.Settings(data_dir=tmp_path / name, nats_url="nats://127.0.0.1:1")
        docs[name] = app_module.create_app(settings).openapi()
    gateway = docs.pop("gateway")
    return gateway, docs


def test_the_real_services_merge_into_a_valid_document(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gateway, services = real_specs(tmp_path)
    with caplog.at_level(logging.WARNING, logger="strata.gateway.openapi"):
        doc = merge_specs(gateway, services, title="Strata API", version="1.0")

    validate(doc)
    assert_refs_resolve(doc)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "paths declared twice"
    expected = {f"/api/v1/system/{name}/info" for name in (*SERVICES, "gateway")} | {"/api/v1/system/instances"}
    assert expected <= set(doc["paths"])
    for name, service_doc in services.items():  # nothing a service declares under /api/ is lost
        public = {p for p in service_doc["paths"] if p.startswith("/api/")}
        assert public <= set(doc["paths"]), name
    ids = [op.get("operationId") for op in operations(doc)]
    assert len(ids) == len(set(ids))
    schemes = doc["components"]["securitySchemes"]
    assert schemes[OAUTH2_SCHEME]["flows"]["password"]["tokenUrl"] == TOKEN_URL
    # A service's own password flow that differs from the gateway's would show a second login form on /docs.
    assert not [name for name in schemes if name.endswith("_" + OAUTH2_SCHEME)], schemes
    assert not {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"} & set(doc["paths"])


# -- the aggregator -------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def upstream_app(hits: list[str]) -> FastAPI:
    """A small service: one public route, and a counted /openapi.json."""
    app = FastAPI(title="Strata datasets", openapi_url=None)

    @app.get("/api/v1/datasets/things", operation_id="list_things")
    async def things() -> list[str]:
        return []

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        hits.append("openapi")
        await asyncio.sleep(0.05)  # long enough for concurrent callers to overlap
        return JSONResponse(app.openapi())

    return app


def gateway_doc() -> dict[str, Any]:
    return spec("Strata API", {"/api/v1/system/instances": get_op({}, "instances")})


async def test_the_aggregator_caches_and_keeps_the_last_good_copy_of_a_service_that_went_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hits: list[str] = []
    clock = Clock()
    never_up = f"http://127.0.0.1:{free_port()}"
    async with upstream_session(connect_timeout_s=1, read_timeout_s=5, max_connections=10) as session:
        async with serve_app(upstream_app(hits)) as url:
            aggregator = OpenApiAggregator(
                upstreams={"datasets": url, "schemas": never_up},
                session=lambda: session,
                gateway_spec=gateway_doc,
                ttl_s=30,
                clock=clock,
            )
            docs = await asyncio.gather(*(aggregator.spec() for _ in range(5)))
            assert hits == ["openapi"]  # concurrent first requests share one fetch
            first = docs[0]
            assert "/api/v1/datasets/things" in first["paths"]
            assert "/api/v1/system/instances" in first["paths"]
            assert first[MISSING_SERVICES] == ["schemas"]
            assert STALE_SERVICES not in first
            assert first["info"]["title"] == "Strata API"
            validate(first)

            clock.now += 10
            await aggregator.spec()
            assert hits == ["openapi"]  # within the TTL: from the cache
            clock.now += 30
            await aggregator.spec()
            assert hits == ["openapi", "openapi"]

        clock.now += 31  # datasets is down now
        with caplog.at_level(logging.WARNING, logger="strata.gateway.openapi"):
            stale = await aggregator.spec()
    assert stale["paths"]["/api/v1/datasets/things"] == first["paths"]["/api/v1/datasets/things"]
    assert stale[STALE_SERVICES] == ["datasets"]
    assert stale[MISSING_SERVICES] == ["schemas"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("datasets" in m and "copy fetched" in m for m in messages), messages
    assert any("schemas" in m and "left out" in m for m in messages), messages
    validate(stale)


async def test_an_upstream_that_answers_nonsense_is_treated_as_down() -> None:
    app = FastAPI(openapi_url=None)

    @app.get("/openapi.json")
    async def openapi() -> dict[str, str]:
        return {"not": "openapi"}

    session = upstream_session(connect_timeout_s=1, read_timeout_s=5, max_connections=10)
    async with session, serve_app(app) as url:
        aggregator = OpenApiAggregator(upstreams={"auth": url}, session=lambda: session, gateway_spec=gateway_doc)
        doc = await aggregator.spec()
    assert doc[MISSING_SERVICES] == ["auth"]
    validate(doc)


# -- the docs page --------------------------------------------------------------------------------------------------


def docs_app() -> FastAPI:
    app = FastAPI(title="Strata API", openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/api/v1/system/instances", tags=["system"])
    async def instances() -> dict[str, Any]:
        return {}

    def no_session() -> Any:
        raise AssertionError("no upstreams here")

    install_docs(app, OpenApiAggregator(upstreams={}, session=no_session, title="Strata API", version="1"))
    return app


async def test_docs_page_serves_the_merged_document_and_swagger_ui_5_from_local_assets() -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=docs_app()), base_url="http://gw") as client:
        spec_resp = await client.get("/openapi.json")
        page = await client.get("/docs")
        bundle = await client.get("/docs/static/swagger-ui-bundle.js")
        css = await client.get("/docs/static/swagger-ui.css")
        redirect = await client.get("/docs/oauth2-redirect")

    assert spec_resp.status_code == 200
    doc = spec_resp.json()
    assert "/api/v1/system/instances" in doc["paths"]  # the gateway's own routes, from app.openapi()
    assert doc["components"]["securitySchemes"][OAUTH2_SCHEME]["flows"]["password"]["tokenUrl"] == TOKEN_URL
    validate(doc)

    assert page.status_code == 200
    html = page.text
    assert "url: '/openapi.json'" in html
    assert '"/docs/static/swagger-ui-bundle.js"' in html and '"/docs/static/swagger-ui.css"' in html
    assert "cdn" not in html.lower()  # nothing loaded from the internet
    assert '"persistAuthorization": true' in html
    assert "oauth2RedirectUrl: window.location.origin + '/docs/oauth2-redirect'" in html

    assert bundle.status_code == 200
    assert 'PACKAGE_VERSION:"5.' in bundle.text  # Swagger UI 5: renders OpenAPI 3.1
    assert css.status_code == 200
    assert redirect.status_code == 200 and "oauth2" in redirect.text.lower()


def test_install_docs_refuses_to_be_shadowed_by_fastapis_own_docs() -> None:
    app = FastAPI()
    aggregator = OpenApiAggregator(upstreams={}, session=lambda: pytest.fail("unused"))
    with pytest.raises(RuntimeError, match="openapi_url=None"):
        install_docs(app, aggregator)
