"""Alembic environment of the datasets service (run by ``strata.common.db.migrate`` at start-up)."""

from strata.common.db import run_alembic_env
from strata.datasets.models import Base

run_alembic_env(Base.metadata)
