"""Alembic environment of the auth service (run by ``strata.common.db.migrate`` at start-up)."""

from strata.common.db import run_alembic_env
from strata.auth.models import Base

run_alembic_env(Base.metadata)
