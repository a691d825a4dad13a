"""Alembic environment of the execution service (run by ``strata.common.db.migrate`` at start-up)."""

from strata.common.db import run_alembic_env
from strata.execution.models import Base

run_alembic_env(Base.metadata)
