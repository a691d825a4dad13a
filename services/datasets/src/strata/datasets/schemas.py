"""Request and response models of the datasets API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from strata.common.contracts.auth import Role

T = TypeVar("T")
Name = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
]
Tag = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=50)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Page(BaseModel, Generic[T]):
    data: list[T]
    meta: dict[str, Any]


class ColumnOut(BaseModel):
    name: str
    type: str
    nullable: bool


class DatasetOut(BaseModel):
    id: str
    name: str
    description: str
    tags: list[str]
    owner_id: str
    status: Literal["uploading", "processing", "ready", "failed"]
    format: str
    version: int
    row_count: int | None
    bytes: int | None
    columns: list[ColumnOut] | None
    error: dict[str, Any] | None
    permission: Literal["owner", "write", "read", "admin"]
    created_at: datetime
    updated_at: datetime


class DatasetPatch(Strict):
    name: Name | None = None
    description: Annotated[str, StringConstraints(max_length=2000)] | None = None
    tags: Annotated[list[Tag], Field(max_length=20)] | None = None


class VersionOut(BaseModel):
    version: int
    status: str
    format: str
    original_filename: str
    original_bytes: int
    sha256: str
    row_count: int | None
    bytes: int | None
    error: dict[str, Any] | None
    created_by: str
    created_at: datetime
    ready_at: datetime | None


class Manifest(BaseModel):
    id: str
    version: int
    sha256: str
    original_bytes: int
    bytes: int | None
    rows: int | None
    storage_url: str | None
    created_at: datetime
    updated_at: datetime


class PresignedUploadIn(Strict):
    filename: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    size: int = Field(gt=0, description="The file's size in bytes; the upload may not be larger")
    name: Name | None = None
    description: Annotated[str, StringConstraints(max_length=2000)] = ""
    format: Literal["csv", "tsv", "json", "ndjson", "xlsx", "parquet"] | None = None
    options: dict[str, Any] | None = None


class PresignedUploadOut(BaseModel):
    dataset_id: str
    method: Literal["PUT"] = "PUT"
    url: str
    expires_at: datetime
    complete_url: str


class ShareIn(Strict):
    user_id: Annotated[str, StringConstraints(min_length=1, max_length=36)] | None = None
    role: Role | None = None
    permission: Literal["read", "write"] = "read"


class ShareOut(BaseModel):
    id: int
    user_id: str | None
    role: Role | None
    permission: Literal["read", "write"]
    created_by: str
    created_at: datetime
