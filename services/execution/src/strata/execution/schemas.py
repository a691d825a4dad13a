"""Request and response bodies of the execution API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from strata.common.contracts.execution import JobState

Engine = Literal["duckdb", "clickhouse"]
JobKind = Literal["query"]
ParameterValue = str | int | float | bool | None | list[str | int | float | bool | None]


class QueryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sql: Annotated[str, StringConstraints(min_length=1)] = Field(
        description='One read-only statement. Tables are your datasets by name, `"<owner id>".name` or id.'
    )
    engine: Engine = "duckdb"
    parameters: dict[str, ParameterValue] = Field(
        default_factory=dict,
        description="Named parameters, bound by the engine (DuckDB `$name`, ClickHouse `{name:Type}`).",
    )
    priority: int = Field(default=3, ge=1, le=5, description="1 is the most urgent; a worker takes 1 before 2.")
    timeout_s: float | None = Field(
        default=None, gt=0, description="One deadline for queue wait and run together (default from settings)."
    )
    max_rows: int | None = Field(
        default=None, ge=1, description="Rows kept in the result; beyond it the result is cut and `truncated` set."
    )
    dry_run: bool = Field(default=False, description="Validate and plan only: the output columns and the plan.")
    request_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = Field(
        default=None, description="Idempotency key: the same key from you within a day returns the same job."
    )
    wait_ms: int = Field(
        default=0, ge=0, description="Wait up to this long for the job to end (bounded by the server's maximum)."
    )
    label: Annotated[str, StringConstraints(max_length=200)] = ""


class JobError(BaseModel):
    code: str
    message: str
    status: int | None = None
    line: int | None = None
    column: int | None = None
    model_config = ConfigDict(extra="allow")


class ResultInfo(BaseModel):
    rows: int
    bytes: int
    columns: list[dict[str, Any]]
    truncated: bool
    expires_at: datetime | None
    deleted_at: datetime | None


class JobOut(BaseModel):
    id: str
    kind: JobKind
    engine: Engine
    state: JobState
    owner_id: str
    priority: int
    sql: str
    parameters: dict[str, Any]
    label: str
    datasets: list[dict[str, Any]] = Field(description="The datasets the statement read, at the versions resolved.")
    request_id: str | None
    timeout_s: float
    max_rows: int
    progress: float | None
    attempts: int
    created_at: datetime
    deadline_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queued_s: float | None = Field(description="Time from submit to start (or to now while queued).")
    run_s: float | None
    result: ResultInfo | None
    error: JobError | None
    timed_out_in: Literal["queue", "run"] | None
    stats: dict[str, Any]


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class QueryPlan(BaseModel):
    """What a dry run answers: nothing ran."""

    engine: Engine
    kind: str
    columns: list[dict[str, Any]]
    plan: str | None
    datasets: list[dict[str, Any]]
    parameters: list[str]


class ResultPageOut(BaseModel):
    job_id: str
    columns: list[dict[str, Any]]
    rows: list[list[Any]]
    offset: int
    total_rows: int
    truncated: bool
    next_page_token: str | None


class JobEventOut(BaseModel):
    seq: int = Field(description="The JetStream stream sequence: the same numbers the WebSocket carries.")
    type: str
    time: datetime
    event: dict[str, Any]


class JobEventsOut(BaseModel):
    job_id: str
    events: list[JobEventOut]
    last_seq: int = Field(description="Pass it as `after` to get what follows.")
    recovered: bool = Field(description="False when events after `after` are gone (stream retention): refetch the job.")


class ExampleQuery(BaseModel):
    title: str
    description: str
    engine: Engine
    sql: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class BlockInputOut(BaseModel):
    name: str
    description: str
    required: bool


class BlockOut(BaseModel):
    """A block as a frontend renders its form: what it reads, its config's JSON Schema, one output row's schema."""

    id: str
    version: int
    name: str
    category: str
    description: str
    inputs: list[BlockInputOut]
    config_schema: dict[str, Any]
    output_schema: dict[str, Any]
    builtin: bool = True


class BlockPage(BaseModel):
    data: list[BlockOut]
    meta: dict[str, Any]
