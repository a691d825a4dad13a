"""``python -m strata.execution``: serve the execution service (host and port from ``STRATA_EXECUTION_HOST/PORT``)."""

from strata.common.serve import serve

from .app import create_app
from .config import Settings

if __name__ == "__main__":
    serve(create_app, Settings)
