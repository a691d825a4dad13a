"""``python -m bench._upstream``: a tiny ASGI echo app, the upstream behind the gateway in bench/auth_overhead.py.

It verifies nothing and does next to nothing (reads the request, answers a small JSON naming the method and path), so
its cost is the same whether the gateway in front of it checks tokens or not. Served by uvicorn with uvloop and
httptools on ``STRATA_BENCH_PORT``, as the services are.
"""

from __future__ import annotations

import json
import os

import uvicorn
from starlette.types import Receive, Scope, Send


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:  # drain the request body, if any
        message = await receive()
        more = message.get("more_body", False)
    body = json.dumps({"method": scope["method"], "path": scope["path"]}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(os.environ["STRATA_BENCH_PORT"]),
        log_config=None,
        access_log=False,
        server_header=False,
        lifespan="off",
        loop="uvloop",
        http="httptools",
    )
