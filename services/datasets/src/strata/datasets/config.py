"""Settings of the datasets service: ``STRATA_DATASETS_*`` first, then the shared ``STRATA_*``."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from strata.common.settings import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="STRATA_DATASETS_", extra="ignore")
    service_name: ClassVar[str] = "datasets"
    port: int = 8002

    #: Where datasets live: ``file:///abs/folder`` (default: <data dir>/storage) or ``s3://bucket/prefix``.
    storage_url: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str | None = None

    max_upload_bytes: int = Field(default=2 * 1024**3, ge=1024)
    ingest_threads: int = Field(default=2, ge=1)
    #: DuckDB's memory limit while ingesting: 256MB keeps the service under ~500 MB RSS on a 1 GB CSV at the same
    #: speed; below ~192MB DuckDB spills so much that conversion takes twice as long (bench/README.md).
    ingest_memory_limit: str = "256MB"
    ingest_max_attempts: int = Field(default=3, ge=1)
    #: How long a taken work item may go without a heartbeat before another replica gets it (a dead worker's).
    ingest_ack_wait_s: float = Field(default=60.0, gt=0)
    preview_max_rows: int = Field(default=1000, ge=1)
    #: Load the two demo datasets (support calls, taxi trips) on first start (``make run`` turns it on).
    demo_data: bool = False

    def model_post_init(self, context: object, /) -> None:
        super().model_post_init(context)
        if not self.storage_url:
            self.storage_url = (self.data_dir / "storage").as_uri()
