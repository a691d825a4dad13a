"""The public API description: every service's OpenAPI document merged into one, and the Swagger UI page for it.

Each service serves its own ``/openapi.json`` whose paths are already the public ones (``/api/v1/...``), so merging is
a union with the clashes resolved:

- a path declared by two parts is an error in the services; the first part (the gateway's own, then the services in
  the order given) keeps it and the clash is logged;
- components: an identical definition under the same name is kept once; a different one is renamed
  ``<Service>_<Name>`` and every reference to it inside that service's part is rewritten (``$ref``, discriminator
  mappings, and security requirements for security schemes);
- ``operationId``s are made unique (a later clash becomes ``<service>_<operationId>``), operations without tags get
  the service's name as their tag;
- ``components.securitySchemes`` always holds ``OAuth2PasswordBearer`` (the password flow at ``token_url``), so any
  client or the docs page can log in.

:class:`OpenApiAggregator` fetches the services' documents through the gateway's HTTP client, caches the merged one,
and keeps a service's last good document while it is down. :func:`install_docs` serves it at ``/openapi.json`` and
Swagger UI 5 (which renders OpenAPI 3.1) at ``/docs`` from assets installed with the gateway, so it works offline.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

log = logging.getLogger(__name__)

OPENAPI_VERSION = "3.1.0"
DEFAULT_TOKEN_URL = "/api/v1/auth/token"  # noqa: S105 (a URL, not a secret)
OAUTH2_SCHEME = "OAuth2PasswordBearer"
GATEWAY = "gateway"
# The gateway's own operational routes: not part of the public API description.
INTERNAL_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)
# The gateway proxies only this prefix, so a service path outside it cannot be reached through the gateway.
PUBLIC_PREFIX = "/api/"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
MISSING_SERVICES = "x-strata-missing-services"
STALE_SERVICES = "x-strata-stale-services"

# Swagger UI 5 (OpenAPI 3.1 support) ships inside the fastapi-offline wheel; the CDN pin is only a fallback for an
# environment where that package is missing, and it is the same version.
SWAGGER_UI_PACKAGE = "fastapi_offline"
SWAGGER_UI_CDN = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.32.6"

Spec = dict[str, Any]


def oauth2_password_scheme(token_url: str) -> dict[str, Any]:
    """The scheme FastAPI's ``OAuth2PasswordBearer(tokenUrl=token_url)`` declares, so the services' copies dedup."""
    return {"type": "oauth2", "flows": {"password": {"scopes": {}, "tokenUrl": token_url}}}


# -- merging ------------------------------------------------------------------------------------------------------


def merge_specs(
    gateway_spec: Spec,
    service_specs: Mapping[str, Spec],
    *,
    title: str,
    version: str,
    token_url: str = DEFAULT_TOKEN_URL,
) -> Spec:
    """One OpenAPI 3.1 document from the gateway's own and the services' documents. The inputs are left unchanged.

    ``service_specs`` maps a service name to its document; the order matters only for clashes: the gateway's own
    paths first, then the services in order, and the first to declare a path or an operationId keeps it.
    """
    merger = _Merger(token_url)
    merger.add(GATEWAY, gateway_spec)
    for service, spec in service_specs.items():
        merger.add(service, spec)
    info: dict[str, Any] = {"title": title, "version": version}
    description = (gateway_spec.get("info") or {}).get("description")
    if description:
        info["description"] = description
    doc: Spec = {"openapi": OPENAPI_VERSION, "info": info, "servers": [{"url": "/"}], "paths": merger.paths}
    if merger.webhooks:
        doc["webhooks"] = merger.webhooks
    doc["components"] = {section: entries for section, entries in merger.components.items() if entries}
    if merger.tags:
        doc["tags"] = list(merger.tags.values())
    return doc


class _Merger:
    def __init__(self, token_url: str) -> None:
        self.paths: dict[str, Any] = {}
        self.webhooks: dict[str, Any] = {}
        self.components: dict[str, dict[str, Any]] = {
            "securitySchemes": {OAUTH2_SCHEME: oauth2_password_scheme(token_url)}
        }
        self.tags: dict[str, dict[str, Any]] = {}
        self.operation_ids: set[str] = set()
        # path (webhook name) -> the part that declared it first
        self._path_owner: dict[str, str] = {}
        self._webhook_owner: dict[str, str] = {}

    def add(self, service: str, spec: Spec) -> None:
        part = copy.deepcopy(spec)
        paths = self._public_paths(service, part.get("paths") or {})
        webhooks = dict(part.get("webhooks") or {})
        components: dict[str, dict[str, Any]] = {
            section: dict(entries)
            for section, entries in (part.get("components") or {}).items()
            if isinstance(entries, dict)
        }
        # The service's global security requirement would apply to every service once merged: move it down.
        global_security = part.get("security")
        if global_security is not None:
            for operation in _operations_of(paths, webhooks):
                operation.setdefault("security", copy.deepcopy(global_security))

        paths = _first_wins(service, paths, self._path_owner, "path")
        webhooks = _first_wins(service, webhooks, self._webhook_owner, "webhook")
        op_renames: dict[str, str] = {}
        own_ids: set[str] = set()
        for operation in _operations_of(paths, webhooks, components.get("pathItems", {})):
            op_id = operation.get("operationId")
            if not isinstance(op_id, str):
                continue
            if op_id in self.operation_ids:
                operation["operationId"] = _free_name(f"{service}_{op_id}", self.operation_ids)
                if op_id not in own_ids:  # links to it mean this service's operation, now renamed
                    op_renames[op_id] = operation["operationId"]
            own_ids.add(op_id)
            self.operation_ids.add(operation["operationId"])
        if op_renames:
            log.warning("%s: operationIds renamed to stay unique in the merged API: %s", service, op_renames)
            _rename_link_targets([paths, webhooks, components], op_renames)
        tagged = False
        for operation in _operations_of(paths, webhooks):
            if not operation.get("tags"):
                operation["tags"] = [service]
                tagged = True

        renames = self._component_renames(service, components)
        if renames:
            log.info("%s: components renamed in the merged API: %s", service, renames)
            paths = _rewrite(paths, renames)
            webhooks = _rewrite(webhooks, renames)
            components = _rewrite(components, renames)
        for section, entries in components.items():
            merged = self.components.setdefault(section, {})
            for name, value in entries.items():
                # Absent, or equivalent to the one there and so dropped: _component_renames made sure of it.
                merged.setdefault(renames.get(section, {}).get(name, name), value)
        self.paths.update(paths)
        self.webhooks.update(webhooks)
        self._path_owner.update(dict.fromkeys(paths, service))
        self._webhook_owner.update(dict.fromkeys(webhooks, service))

        for tag in part.get("tags") or ():
            if isinstance(tag, dict) and isinstance(tag.get("name"), str):
                self.tags.setdefault(tag["name"], tag)
        if tagged and service not in self.tags:
            info = part.get("info") or {}
            description = info.get("description") or info.get("title") or service
            self.tags[service] = {"name": service, "description": description}

    @staticmethod
    def _public_paths(service: str, paths: Mapping[str, Any]) -> dict[str, Any]:
        kept: dict[str, Any] = {}
        for path, item in paths.items():
            if path in INTERNAL_PATHS:
                continue
            if service != GATEWAY and not path.startswith(PUBLIC_PREFIX):
                log.warning(
                    "%s declares %s, which the gateway does not proxy: left out of the merged API", service, path
                )
                continue
            kept[path] = item
        return kept

    def _component_renames(
        self, service: str, components: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, dict[str, str]]:
        """The components of this part to rename: those whose name is taken by a different definition.

        Renaming one changes the references in the others, which may then differ from their namesakes too, so this
        repeats until nothing more needs a new name.
        """
        renames: dict[str, dict[str, str]] = {}
        while True:
            more = False
            for section, entries in components.items():
                merged = self.components.get(section, {})
                for name, value in entries.items():
                    if name in renames.get(section, {}) or name not in merged:
                        continue
                    if _equivalent(section, merged[name], _rewrite(value, renames)):
                        continue
                    taken = set(merged) | set(entries) | set(renames.get(section, {}).values())
                    renames.setdefault(section, {})[name] = _free_name(f"{service.capitalize()}_{name}", taken)
                    more = True
            if not more:
                return renames


def _first_wins(service: str, items: Mapping[str, Any], owner: Mapping[str, str], what: str) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for key, item in items.items():
        if key in owner:
            log.error(
                "%s %s is declared by both %s and %s: the merged API keeps %s's (the first)",
                what,
                key,
                owner[key],
                service,
                owner[key],
            )
        else:
            kept[key] = item
    return kept


def _free_name(base: str, taken: set[str]) -> str:
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    return name


def _equivalent(section: str, a: Any, b: Any) -> bool:
    if section == "securitySchemes" and isinstance(a, dict) and isinstance(b, dict):
        # The same mechanism described in other words is one scheme, not two "Authorize" forms.
        return {k: v for k, v in a.items() if k != "description"} == {k: v for k, v in b.items() if k != "description"}
    return bool(a == b)


def _operations_of(*path_item_maps: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every operation in these path items (``paths``, ``webhooks``, ``components.pathItems``) and their callbacks."""
    queue = deque(item for items in path_item_maps for item in items.values())
    while queue:
        item = queue.popleft()
        if not isinstance(item, dict):
            continue
        for method in HTTP_METHODS:
            operation = item.get(method)
            if isinstance(operation, dict):
                yield operation
                for callback in (operation.get("callbacks") or {}).values():
                    if isinstance(callback, dict):
                        queue.extend(callback.values())


def _rewrite(node: Any, renames: Mapping[str, Mapping[str, str]]) -> Any:
    """A copy of ``node`` with references to renamed components pointing at their new names."""
    if not renames:
        return node
    schemes = renames.get("securitySchemes", {})

    def ref(value: str) -> str:
        if not value.startswith("#/components/"):
            return value
        section, _, rest = value[len("#/components/") :].partition("/")
        name, sep, tail = rest.partition("/")
        new = renames.get(section, {}).get(name)
        return f"#/components/{section}/{new}{sep}{tail}" if new else value

    def walk(value: Any) -> Any:
        if isinstance(value, list):
            return [walk(v) for v in value]
        if not isinstance(value, dict):
            return value
        out: dict[str, Any] = {}
        for key, child in value.items():
            if key == "$ref" and isinstance(child, str):
                out[key] = ref(child)
            elif key == "discriminator" and isinstance(child, dict) and isinstance(child.get("mapping"), dict):
                mapping = {k: ref(v) if isinstance(v, str) else v for k, v in child["mapping"].items()}
                out[key] = {**child, "mapping": mapping}
            elif key == "security" and isinstance(child, list) and schemes:
                out[key] = [
                    {schemes.get(k, k): v for k, v in req.items()} if isinstance(req, dict) else req for req in child
                ]
            else:
                out[key] = walk(child)
        return out

    return walk(node)


def _rename_link_targets(node: Any, renames: Mapping[str, str]) -> None:
    """Point links (``responses.*.links``, ``components.links``) at renamed operationIds, in place."""
    if isinstance(node, list):
        for child in node:
            _rename_link_targets(child, renames)
    elif isinstance(node, dict):
        links = node.get("links")
        if isinstance(links, dict):
            for link in links.values():
                if isinstance(link, dict) and link.get("operationId") in renames:
                    link["operationId"] = renames[link["operationId"]]
        for child in node.values():
            _rename_link_targets(child, renames)


# -- fetching -----------------------------------------------------------------------------------------------------


@dataclass
class _Copy:
    spec: Spec
    fetched_at: float


class OpenApiAggregator:
    """The merged API description, refreshed at most every ``ttl_s`` seconds.

    ``session`` returns the gateway's aiohttp session (called at fetch time, because the session is made in the
    lifespan). ``gateway_spec`` returns the gateway's own document; :func:`install_docs` sets it to ``app.openapi``
    when it is not given. A service that does not answer is merged from its last good document; one never fetched is
    left out and named in ``x-strata-missing-services``.
    """

    def __init__(
        self,
        *,
        upstreams: Mapping[str, str],
        session: Callable[[], aiohttp.ClientSession],
        gateway_spec: Callable[[], Spec] | None = None,
        title: str | None = None,
        version: str | None = None,
        token_url: str = DEFAULT_TOKEN_URL,
        ttl_s: float = 30.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstreams = {name: url.rstrip("/") for name, url in upstreams.items()}
        self.session = session
        self.gateway_spec = gateway_spec
        self.title = title
        self.version = version
        self.token_url = token_url
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._last_good: dict[str, _Copy] = {}
        self._doc: Spec | None = None
        self._inputs: tuple[Any, ...] | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def spec(self) -> Spec:
        """The merged document: the cached one while fresh, else fetched and merged again."""
        doc = self._doc
        if doc is not None and (self._clock() < self._expires or self._lock.locked()):
            return doc  # fresh, or another request is refreshing it: a document a few seconds old beats waiting
        async with self._lock:
            if self._doc is not None and self._clock() < self._expires:
                return self._doc
            return await self._refresh()

    def invalidate(self) -> None:
        """Fetch again on the next request (e.g. after a deployment)."""
        self._expires = 0.0

    async def _refresh(self) -> Spec:
        results = await asyncio.gather(*(self._fetch(name, url) for name, url in self.upstreams.items()))
        now = self._clock()
        specs: dict[str, Spec] = {}
        stale: list[str] = []
        missing: list[str] = []
        for name, result in zip(self.upstreams, results, strict=True):
            if isinstance(result, dict):
                self._last_good[name] = _Copy(result, now)
                specs[name] = result
                continue
            last = self._last_good.get(name)
            if last is not None:
                log.warning(
                    "%s's OpenAPI document unavailable (%s): using the copy fetched %.0f s ago",
                    name,
                    result,
                    now - last.fetched_at,
                )
                specs[name] = last.spec
                stale.append(name)
            else:
                log.warning("%s's OpenAPI document unavailable (%s): left out of the merged API", name, result)
                missing.append(name)
        own = self.gateway_spec() if self.gateway_spec is not None else {}
        inputs = (own, specs, stale, missing)
        if self._doc is None or inputs != self._inputs:
            info = own.get("info") or {}
            doc = merge_specs(
                own,
                specs,
                title=self.title or info.get("title") or "API",
                version=self.version or info.get("version") or "0",
                token_url=self.token_url,
            )
            if missing:
                doc[MISSING_SERVICES] = missing
            if stale:
                doc[STALE_SERVICES] = stale
            self._doc, self._inputs = doc, inputs
        self._expires = now + self.ttl_s
        return self._doc

    async def _fetch(self, name: str, url: str) -> Spec | str:
        """The upstream's document, or why it could not be had."""
        try:
            async with self.session().get(
                url + "/openapi.json",
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                # The gateway's session does not decompress, so ask for the plain bytes.
                headers={"Accept": "application/json", "Accept-Encoding": "identity"},
            ) as resp:
                if resp.status != 200:
                    return f"HTTP {resp.status}"
                spec = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__
        except ValueError:
            return "not JSON"
        if not (
            isinstance(spec, dict)
            and str(spec.get("openapi", "")).startswith("3.")
            and isinstance(spec.get("paths", {}), dict)
            and isinstance(spec.get("components", {}), dict)
        ):
            return "not an OpenAPI 3 document"
        return spec


# -- the docs page ------------------------------------------------------------------------------------------------


def swagger_ui_assets() -> Path | None:
    """The folder holding Swagger UI 5's ``swagger-ui-bundle.js`` and ``swagger-ui.css``, if the package is there."""
    found = importlib.util.find_spec(SWAGGER_UI_PACKAGE)
    if found is None or found.origin is None:
        return None
    folder = Path(found.origin).parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


DEFAULT_SWAGGER_UI_PARAMETERS: dict[str, Any] = {
    "persistAuthorization": True,  # keep the token across reloads of the page
    "displayRequestDuration": True,
    "docExpansion": "none",
    "filter": True,
    "validatorUrl": None,  # no calls to swagger.io's validator: the page must work offline
}


def install_docs(
    app: FastAPI,
    aggregator: OpenApiAggregator,
    *,
    openapi_url: str = "/openapi.json",
    docs_url: str = "/docs",
    title: str = "Strata API",
    swagger_ui_parameters: Mapping[str, Any] | None = None,
    assets_dir: Path | None = None,
) -> None:
    """Serve the merged document at ``openapi_url`` and Swagger UI for it at ``docs_url``.

    FastAPI's own ``/openapi.json`` and ``/docs`` describe the gateway alone and would shadow these, so the app must be
    made with ``openapi_url=None`` (which also turns off its ``/docs`` and ``/redoc``); a clash raises here.
    """
    redirect_url = docs_url + "/oauth2-redirect"
    static_url = docs_url + "/static"
    ours = {openapi_url, docs_url, redirect_url, static_url}
    taken = sorted(path for route in app.router.routes if (path := getattr(route, "path", None)) in ours)
    if taken:
        raise RuntimeError(
            f"{taken} already served by the app: make it with FastAPI(openapi_url=None, docs_url=None, "
            "redoc_url=None) so the merged API description is the one served"
        )
    if aggregator.gateway_spec is None:
        aggregator.gateway_spec = app.openapi
    assets = assets_dir or swagger_ui_assets()
    if assets is not None:
        app.mount(static_url, StaticFiles(directory=assets), name="docs_static")
    else:
        log.warning("%s is not installed: /docs loads Swagger UI from %s", SWAGGER_UI_PACKAGE, SWAGGER_UI_CDN)
    has_favicon = assets is not None and (assets / "favicon.png").is_file()
    parameters = {**DEFAULT_SWAGGER_UI_PARAMETERS, **(swagger_ui_parameters or {})}

    @app.get(openapi_url, include_in_schema=False, name="merged_openapi")
    async def merged_openapi() -> JSONResponse:
        return JSONResponse(await aggregator.spec())

    @app.get(docs_url, include_in_schema=False, name="merged_docs")
    async def merged_docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        assets_url = root + static_url if assets is not None else SWAGGER_UI_CDN
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{title} - Swagger UI",
            swagger_js_url=f"{assets_url}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets_url}/swagger-ui.css",
            swagger_favicon_url=f"{assets_url}/favicon.png" if has_favicon else "data:,",
            oauth2_redirect_url=root + redirect_url,
            swagger_ui_parameters=parameters,
        )

    @app.get(redirect_url, include_in_schema=False, name="merged_docs_oauth2_redirect")
    async def merged_docs_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
