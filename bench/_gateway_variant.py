"""``python -m bench._gateway_variant``: the gateway for bench/auth_overhead.py, with its edge on or off.

The gateway app exactly as ``python -m strata.gateway`` builds and serves it (settings from the environment, uvicorn
with uvloop and httptools through :func:`strata.common.serve.serve`), with two changes that only the benchmark makes:

- its token verifier trusts the JWKS in the file named by ``STRATA_BENCH_JWKS_FILE`` (written by the benchmark, whose
  ``TokenFactory`` signs the tokens), instead of asking the auth service over NATS;
- with ``STRATA_BENCH_GATEWAY_AUTH=off``, ``EdgeMiddleware`` (token verification, rate limits, identity headers) is
  taken out of ``app.user_middleware`` before the app starts. ``on`` (the default) leaves the gateway as it ships.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.middleware import Middleware

from strata.common.serve import serve
from strata.gateway.app import create_app
from strata.gateway.config import Settings
from strata.gateway.edge import EdgeMiddleware

JWKS_FILE_ENV = "STRATA_BENCH_JWKS_FILE"
AUTH_ENV = "STRATA_BENCH_GATEWAY_AUTH"


def _is_edge(middleware: Middleware) -> bool:
    cls: object = middleware.cls  # a "middleware factory" to Starlette's types; a class here
    return cls is EdgeMiddleware


def build(settings: Settings) -> FastAPI:
    app = create_app(settings)
    jwks_file = Path(os.environ[JWKS_FILE_ENV])

    async def jwks_source() -> dict[str, Any]:
        jwks: dict[str, Any] = json.loads(jwks_file.read_text())
        return jwks

    app.state.runtime.verifier.jwks_source = jwks_source
    auth = os.environ.get(AUTH_ENV, "on")
    if auth == "off":
        kept = [m for m in app.user_middleware if not _is_edge(m)]
        if len(kept) != len(app.user_middleware) - 1:
            raise RuntimeError(f"expected one EdgeMiddleware in the gateway's middleware: {app.user_middleware}")
        app.user_middleware = kept
    elif auth != "on":
        raise ValueError(f"{AUTH_ENV} must be 'on' or 'off', not {auth!r}")
    return app


if __name__ == "__main__":
    serve(build, Settings)
