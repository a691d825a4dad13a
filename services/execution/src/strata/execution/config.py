"""Settings of the execution service: ``STRATA_EXECUTION_*`` first, then the shared ``STRATA_*``."""

from __future__ import annotations

import os
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from strata.common.settings import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="STRATA_EXECUTION_", extra="ignore")
    service_name: ClassVar[str] = "execution"
    port: int = 8003

    #: Where results are written (``results/<job id>/result.parquet``): the same storage as the datasets service.
    storage_url: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    #: A ClickHouse server (``http://user:password@host:8123/database``) for ``engine=clickhouse``; embedded chdb when
    #: empty. ``STRATA_CLICKHOUSE_URL``, or ``CLICKHOUSE_URL`` as a last resort.
    clickhouse_url: str | None = None

    #: Jobs this replica runs at once (each runs one engine statement on ``engine_threads`` threads).
    workers: int = Field(default=2, ge=0, le=64)
    engine_threads: int = Field(default=2, ge=1)
    engine_memory_limit: str = "1GB"
    #: ClickHouse's ``max_bytes_to_read`` for one query (0: no limit).
    max_bytes_to_read: int = Field(default=0, ge=0)

    default_timeout_s: float = Field(default=300.0, gt=0)
    max_timeout_s: float = Field(default=3600.0, gt=0)
    default_max_rows: int = Field(default=1_000_000, ge=1)
    max_rows_limit: int = Field(default=100_000_000, ge=1)
    max_sql_bytes: int = Field(default=100_000, ge=1)
    #: Longest ``wait_ms`` a submit may ask for.
    max_wait_ms: int = Field(default=30_000, ge=0)
    results_page_max: int = Field(default=10_000, ge=1)
    #: How long results are kept after the job ends; then the files are deleted and the job says so.
    results_ttl_s: float = Field(default=7 * 24 * 3600.0, gt=0)

    #: Deliveries of one job before it is failed (a worker that dies mid-job counts as one).
    max_attempts: int = Field(default=3, ge=1)
    #: How long a taken job may go without a heartbeat before the queue hands it to another replica.
    ack_wait_s: float = Field(default=30.0, ge=1)
    #: A running job whose heartbeat is older than this is closed by the reaper (its worker vanished).
    stale_after_s: float = Field(default=120.0, ge=5)
    reaper_interval_s: float = Field(default=10.0, gt=0)
    #: How often a running job's progress is published and its heartbeat written.
    progress_interval_s: float = Field(default=0.5, gt=0)

    def model_post_init(self, context: object, /) -> None:
        super().model_post_init(context)
        if not self.storage_url:
            self.storage_url = (self.data_dir / "storage").as_uri()
        if self.clickhouse_url is None:
            self.clickhouse_url = os.environ.get("CLICKHOUSE_URL") or None
