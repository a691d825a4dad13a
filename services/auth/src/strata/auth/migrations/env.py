"""Alembic environment of the auth service (run by ``strata.common.db.migrate`` at start-up)."""

from strata.auth.models import Base
from strata.common.db import run_alembic_env

run_alembic_env(Base.metadata)
