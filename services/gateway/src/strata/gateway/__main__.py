"""``python -m strata.gateway``: serve the gateway (port from ``STRATA_GATEWAY_PORT``, default 8000)."""

from strata.common.serve import serve

from .app import create_app
from .config import Settings

if __name__ == "__main__":
    serve(create_app, Settings)
