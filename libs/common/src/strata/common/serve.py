"""``python -m strata.<service>``: build the settings from the environment and serve the app with uvicorn."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import uvicorn
from fastapi import FastAPI

from .settings import ServiceSettings

S = TypeVar("S", bound=ServiceSettings)


def serve(create_app: Callable[[S], FastAPI], settings_cls: type[S]) -> None:
    settings = settings_cls()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # our logging, set up by the lifespan
        access_log=False,  # our middleware logs requests, with their route template and request id
        server_header=False,
        proxy_headers=False,
        lifespan="on",
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=10,
        **settings.uvicorn_options(),  # type: ignore[arg-type]
    )
