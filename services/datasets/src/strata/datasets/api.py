"""The datasets API, under ``/api/v1/datasets``."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from strata.common.contracts.auth import Identity
from strata.common.db import utcnow
from strata.common.deps import CurrentUser, RuntimeDep, SessionDep
from strata.common.errors import BadRequest, Conflict, StrataError, Unprocessable
from strata.common.storage import Storage

from . import engine, service
from .config import Settings
from .models import Dataset, DatasetShare, DatasetVersion
from .schemas import (
    ColumnOut,
    DatasetOut,
    DatasetPatch,
    Manifest,
    Page,
    PresignedUploadIn,
    PresignedUploadOut,
    ShareIn,
    ShareOut,
    VersionOut,
)
from .upload import SNIFF_BYTES, EmptyFile, FileTooLarge, clean_filename, format_of, receive, sniff, valid_name

PRESIGNED_EXPIRES_S = 3600

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "name": {"type": "string", "maxLength": 200, "description": "Defaults to the file's name"},
                        "description": {"type": "string", "maxLength": 2000},
                        "format": {
                            "type": "string",
                            "enum": ["csv", "tsv", "json", "ndjson", "xlsx", "parquet"],
                            "description": "Send before the file; defaults to the file's extension",
                        },
                        "options": {"type": "string", "description": "JSON: delimiter, header, encoding, sheet, ..."},
                        "file": {"type": "string", "format": "binary"},
                    },
                }
            }
        },
    }
}


class ProfileNotReady(Conflict):
    code = "PROFILE_NOT_READY"
    default_message = "The data is ready; its profile is still being computed. Try again in a moment."


class UploadInterrupted(BadRequest):
    code, default_message = "UPLOAD_INTERRUPTED", "The upload was cut off before it ended."


@dataclasses.dataclass
class Services:
    storage: Storage
    settings: Settings
    duck: Any  # a DuckDB connection: one per process, a cursor per call


def get_services(request: Request) -> Services:
    services: Services = request.state.datasets
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def _version_out(row: DatasetVersion) -> VersionOut:
    return VersionOut(
        version=row.version,
        status=row.status,
        format=row.format,
        original_filename=row.original_filename,
        original_bytes=row.original_bytes,
        sha256=row.sha256,
        row_count=row.row_count,
        bytes=row.data_bytes,
        error=row.error,
        created_by=row.created_by,
        created_at=row.created_at,
        ready_at=row.ready_at,
    )


def _share_out(row: DatasetShare) -> ShareOut:
    return ShareOut(
        id=row.id,
        user_id=row.grantee if row.grantee_type == "user" else None,
        role=row.grantee if row.grantee_type == "role" else None,
        permission=row.permission,
        created_by=row.created_by,
        created_at=row.created_at,
    )


def out(dataset: Dataset, row: DatasetVersion | None, permission: str) -> DatasetOut:
    return DatasetOut(
        id=dataset.id,
        name=dataset.name,
        description=dataset.description,
        tags=list(dataset.tags or []),
        owner_id=dataset.owner_id,
        status=dataset.status,
        format=dataset.format,
        version=dataset.current_version,
        row_count=row.row_count if row else None,
        bytes=row.data_bytes if row else None,
        columns=[ColumnOut(**c) for c in row.columns] if row and row.columns else None,
        error=row.error if row else None,
        permission=permission,
        created_at=dataset.created_at,
        updated_at=dataset.updated_at,
    )


async def _receive(request: Request, services: Services, dataset_id: str, version: int) -> Any:
    try:
        return await receive(
            content_type=request.headers.get("content-type"),
            body=request.stream(),
            open_writer=services.storage.writer,
            key_for=lambda fmt: service.original_key(dataset_id, version, fmt),
            max_bytes=services.settings.max_upload_bytes,
        )
    except ClientDisconnect:
        raise UploadInterrupted() from None


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    openapi_extra=UPLOAD_BODY,
    summary="Upload a dataset (multipart, streamed); it becomes ready when ingested",
)
async def upload(request: Request, identity: CurrentUser, runtime: RuntimeDep, services: ServicesDep) -> DatasetOut:
    dataset_id = str(uuid.uuid4())
    received = await _receive(request, services, dataset_id, 1)
    try:
        name = valid_name(received.fields.get("name") or Path(received.filename).stem)
        description = received.fields.get("description", "")
        if len(description) > 2000:
            raise Unprocessable("The description may have at most 2000 characters.")
        options = service.parse_options(received.fields.get("options"))
        assert runtime.db is not None
        # Its own transaction, not the request's: the stored file must be removed if this does not commit.
        async with runtime.db.session() as session:
            dataset = await service.create_dataset(
                session=session,
                stage=runtime.stage,
                owner=identity,
                dataset_id=dataset_id,
                upload=received,
                name=name,
                description=description,
                options=options,
            )
            row = await service.current(session, dataset)
            return out(dataset, row, "owner")
    except BaseException:
        await services.storage.delete(received.key)
        raise


@router.post(
    "/uploads",
    status_code=status.HTTP_201_CREATED,
    summary="Start an upload straight to S3: PUT the file to the URL, then complete it",
)
async def begin_upload(
    spec: PresignedUploadIn, identity: CurrentUser, runtime: RuntimeDep, services: ServicesDep
) -> PresignedUploadOut:
    if spec.size > services.settings.max_upload_bytes:
        raise FileTooLarge(f"The file is larger than the limit of {services.settings.max_upload_bytes} bytes.")
    filename = clean_filename(spec.filename)
    fmt = format_of(filename, spec.format)
    options = service.parse_options(json.dumps(spec.options)) if spec.options else {}
    dataset_id = str(uuid.uuid4())
    expires = PRESIGNED_EXPIRES_S
    url = await services.storage.presigned_put_url(service.original_key(dataset_id, 1, fmt), expires)
    assert runtime.db is not None
    async with runtime.db.session() as session:
        await service.begin_presigned(
            session=session,
            owner=identity,
            dataset_id=dataset_id,
            filename=filename,
            fmt=fmt,
            name=valid_name(spec.name or Path(filename).stem),
            description=spec.description,
            options=options,
            size=spec.size,
        )
    return PresignedUploadOut(
        dataset_id=dataset_id,
        url=url,
        expires_at=utcnow() + timedelta(seconds=expires),
        complete_url=f"/api/v1/datasets/uploads/{dataset_id}/complete",
    )


@router.post(
    "/uploads/{dataset_id}/complete",
    status_code=status.HTTP_202_ACCEPTED,
    summary="The file is in place: check it and start ingestion",
)
async def complete_upload(
    dataset_id: str, identity: CurrentUser, runtime: RuntimeDep, services: ServicesDep
) -> DatasetOut:
    assert runtime.db is not None
    async with runtime.db.session() as session:
        dataset, _ = await service.load(session, dataset_id, identity, "owner")
        if dataset.status != "uploading":
            raise service.UploadNotFound()
        row = await service.current(session, dataset)
        key, fmt, declared = row.original_key, row.format, row.original_bytes
    if not await services.storage.exists(key):
        raise service.UploadMissing()
    size = await services.storage.size(key)
    try:
        # A presigned PUT cannot cap its size: check what arrived, and its first bytes, before ingesting it.
        if size > services.settings.max_upload_bytes or size > declared:
            raise FileTooLarge(f"The file ({size} bytes) is larger than declared or allowed.")
        if size == 0:
            raise EmptyFile()
        digest, head = hashlib.sha256(), bytearray()
        async for chunk in services.storage.read_chunks(key):
            if len(head) < SNIFF_BYTES:
                head.extend(chunk[: SNIFF_BYTES - len(head)])
            digest.update(chunk)
        sniff(fmt, bytes(head))
    except StrataError:
        await services.storage.delete(key)
        async with runtime.db.session() as session:
            dataset, _ = await service.load(session, dataset_id, identity, "owner")
            dataset.deleted_at = utcnow()
        raise
    async with runtime.db.session() as session:
        dataset, _ = await service.load(session, dataset_id, identity, "owner")
        row = await service.complete_presigned(
            session=session, stage=runtime.stage, dataset=dataset, size=size, sha256=digest.hexdigest()
        )
        return out(dataset, row, "owner")


@router.get("", summary="Your datasets and those shared with you")
async def list_datasets(
    identity: CurrentUser,
    session: SessionDep,
    q: Annotated[str | None, Query(max_length=200, description="Search name, description and column names")] = None,
    status_: Annotated[Literal["uploading", "processing", "ready", "failed"] | None, Query(alias="status")] = None,
    format_: Annotated[Literal["csv", "tsv", "json", "ndjson", "xlsx", "parquet"] | None, Query(alias="format")] = None,
    owner_id: Annotated[str | None, Query(max_length=36)] = None,
    sort: Annotated[str, Query(description="created_at, updated_at or name; '-' for descending")] = "-created_at",
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
    all: bool = False,
) -> Page[DatasetOut]:
    query = service.ListQuery(
        q=q, status=status_, format=format_, owner_id=owner_id, sort=sort, limit=limit, cursor=cursor, all=all
    )
    rows, next_cursor = await service.list_datasets(session, identity, query)
    permissions = await service.permissions_for(session, rows, identity)
    data = []
    for dataset in rows:
        data.append(out(dataset, await service.current(session, dataset), permissions[dataset.id]))
    return Page[DatasetOut](data=data, meta={"next_cursor": next_cursor, "limit": limit})


@router.get("/{dataset_id}")
async def get_dataset(dataset_id: str, identity: CurrentUser, session: SessionDep) -> DatasetOut:
    dataset, permission = await service.load(session, dataset_id, identity)
    return out(dataset, await service.current(session, dataset), permission)


@router.patch("/{dataset_id}", summary="Rename, describe or tag a dataset (owner or write share)")
async def patch_dataset(
    dataset_id: str, patch: DatasetPatch, identity: CurrentUser, session: SessionDep, runtime: RuntimeDep
) -> DatasetOut:
    dataset, permission = await service.load(session, dataset_id, identity, "write")
    await service.update_dataset(session=session, stage=runtime.stage, dataset=dataset, patch=patch)
    return out(dataset, await service.current(session, dataset), permission)


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a dataset; its files are removed, and other services drop what they hold",
)
async def delete_dataset(dataset_id: str, identity: CurrentUser, session: SessionDep, runtime: RuntimeDep) -> None:
    dataset, _ = await service.load(session, dataset_id, identity, "owner")
    await service.delete_dataset(session=session, stage=runtime.stage, dataset=dataset)


@router.get("/{dataset_id}/versions")
async def versions(dataset_id: str, identity: CurrentUser, session: SessionDep) -> Page[VersionOut]:
    dataset, _ = await service.load(session, dataset_id, identity)
    rows = await service.list_versions(session, dataset)
    data = [_version_out(r) for r in rows]
    return Page[VersionOut](data=data, meta={"next_cursor": None, "limit": len(data)})


@router.post(
    "/{dataset_id}/versions",
    status_code=status.HTTP_202_ACCEPTED,
    openapi_extra=UPLOAD_BODY,
    summary="Upload a new version (owner or write share); the current one stays readable until it is ready",
)
async def add_version(
    dataset_id: str, request: Request, identity: CurrentUser, runtime: RuntimeDep, services: ServicesDep
) -> VersionOut:
    assert runtime.db is not None
    async with runtime.db.session() as session:
        dataset, _ = await service.load(session, dataset_id, identity, "write")
        number = await service.next_version_number(session, dataset)
    received = await _receive(request, services, dataset_id, number)
    try:
        options = service.parse_options(received.fields.get("options"))
        async with runtime.db.session() as session:
            dataset, _ = await service.load(session, dataset_id, identity, "write")
            row = await service.add_version(
                session=session,
                stage=runtime.stage,
                actor=identity,
                dataset=dataset,
                version=number,
                upload=received,
                options=options,
            )
            return _version_out(row)
    except BaseException:
        await services.storage.delete(received.key)
        raise


async def _ready(
    session: Any, dataset_id: str, identity: Identity, version: int | None
) -> tuple[Dataset, DatasetVersion]:
    dataset, _ = await service.load(session, dataset_id, identity)
    return dataset, await service.ready_version(session, dataset, version)


@router.get("/{dataset_id}/schema")
async def schema(
    dataset_id: str, identity: CurrentUser, session: SessionDep, version: Annotated[int | None, Query(ge=1)] = None
) -> dict[str, Any]:
    _, row = await _ready(session, dataset_id, identity, version)
    return {"version": row.version, "columns": row.columns}


@router.get("/{dataset_id}/profile")
async def profile(
    dataset_id: str, identity: CurrentUser, session: SessionDep, version: Annotated[int | None, Query(ge=1)] = None
) -> dict[str, Any]:
    _, row = await _ready(session, dataset_id, identity, version)
    if row.profile is None:
        raise ProfileNotReady(headers={"Retry-After": "2"})
    return {"version": row.version, **row.profile}


@router.get("/{dataset_id}/manifest")
async def manifest(
    dataset_id: str,
    identity: CurrentUser,
    session: SessionDep,
    services: ServicesDep,
    version: Annotated[int | None, Query(ge=1)] = None,
) -> Manifest:
    dataset, _ = await service.load(session, dataset_id, identity)
    row = await service.current(session, dataset, version)
    return Manifest(
        id=dataset.id,
        version=row.version,
        sha256=row.sha256,
        original_bytes=row.original_bytes,
        bytes=row.data_bytes,
        rows=row.row_count,
        storage_url=services.storage.display_url(row.data_key) if row.data_key else None,
        created_at=dataset.created_at,
        updated_at=dataset.updated_at,
    )


def _filters(raw: list[str]) -> list[engine.Filter]:
    # parse_filter raises InvalidFilter (422, INVALID_FILTER) with the reason.
    return [engine.parse_filter(text) for text in raw]


def _sort(raw: str | None) -> list[tuple[str, bool]]:
    if not raw:
        return []
    return [(part.lstrip("-"), part.startswith("-")) for part in raw.split(",") if part.strip()]


async def _in_thread(services: Services, fn: Any, *args: Any, **kwargs: Any) -> Any:
    def call() -> Any:
        cur = services.duck.cursor()
        try:
            return fn(cur, *args, **kwargs)
        finally:
            cur.close()

    return await asyncio.to_thread(call)


@router.get("/{dataset_id}/preview", summary="Rows with paging, column selection, sort and filters")
async def preview(
    dataset_id: str,
    identity: CurrentUser,
    session: SessionDep,
    services: ServicesDep,
    columns: Annotated[str | None, Query(max_length=4000, description="Comma-separated column names")] = None,
    filter: Annotated[list[str], Query(max_length=50, description="column:op:value, repeatable")] = [],  # noqa: B006
    sort: Annotated[str | None, Query(max_length=1000, description="col,-other")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**12)] = 0,
    version: Annotated[int | None, Query(ge=1)] = None,
) -> dict[str, Any]:
    _, row = await _ready(session, dataset_id, identity, version)
    assert row.data_key is not None
    selected = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    page = await _in_thread(
        services,
        engine.preview,
        services.storage.engine_path(row.data_key),
        columns=selected,
        filters=_filters(filter),
        sort=_sort(sort),
        limit=limit,
        offset=offset,
    )
    return {
        "columns": [dataclasses.asdict(c) for c in page.columns],
        "data": page.rows,
        "meta": {
            "limit": limit,
            "offset": offset,
            "next_offset": page.next_offset,
            "total_rows": page.total_rows,
            "version": row.version,
        },
    }


@router.get("/{dataset_id}/options", summary="Distinct values with counts, for filter widgets")
async def options(
    dataset_id: str,
    identity: CurrentUser,
    session: SessionDep,
    services: ServicesDep,
    column: Annotated[str, Query(min_length=1, max_length=300)],
    q: Annotated[str | None, Query(max_length=200)] = None,
    filter: Annotated[list[str], Query(max_length=50)] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    version: Annotated[int | None, Query(ge=1)] = None,
) -> dict[str, Any]:
    _, row = await _ready(session, dataset_id, identity, version)
    assert row.data_key is not None
    values = await _in_thread(
        services,
        engine.options,
        services.storage.engine_path(row.data_key),
        column,
        filters=_filters(filter),
        q=q,
        limit=limit,
    )
    return {"column": column, "data": [{"value": v, "count": n} for v, n in values], "meta": {"limit": limit}}


@router.get("/{dataset_id}/download", summary="The data as original, parquet, csv or json (streamed)")
async def download(
    dataset_id: str,
    identity: CurrentUser,
    session: SessionDep,
    services: ServicesDep,
    format: Literal["original", "parquet", "csv", "json"] = "parquet",
    version: Annotated[int | None, Query(ge=1)] = None,
) -> Response:
    dataset, row = await _ready(session, dataset_id, identity, version)
    assert row.data_key is not None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset.name)[:100] or "dataset"
    if format in ("original", "parquet"):
        key = row.original_key if format == "original" else row.data_key
        ext = row.format if format == "original" else "parquet"
        size = await services.storage.size(key)
        return StreamingResponse(
            services.storage.read_chunks(key),
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{safe}.{ext}"', "Content-Length": str(size)},
        )
    tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="strata-dl-", dir=services.settings.service_dir))
    target = tmp / f"data.{format}"

    def export(cur: Any) -> None:
        options = "FORMAT csv, HEADER true" if format == "csv" else "FORMAT json, ARRAY true"
        path = services.storage.engine_path(row.data_key or "")
        cur.execute(f"COPY (SELECT * FROM read_parquet($p)) TO '{target}' ({options})", {"p": path})  # noqa: S608

    try:
        await _in_thread(services, export)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, tmp, True)  # a failed export leaves no temp folder behind
        raise
    media = "text/csv" if format == "csv" else "application/json"

    async def chunks() -> AsyncIterator[bytes]:
        file = await asyncio.to_thread(target.open, "rb")
        try:
            while chunk := await asyncio.to_thread(file.read, 1 << 20):
                yield chunk
        finally:
            await asyncio.to_thread(file.close)

    return StreamingResponse(
        chunks(),
        media_type=media,
        background=BackgroundTask(shutil.rmtree, tmp, True),
        headers={"Content-Disposition": f'attachment; filename="{safe}.{format}"'},
    )


@router.get("/{dataset_id}/shares", summary="Who the dataset is shared with (owner or admin)")
async def shares(dataset_id: str, identity: CurrentUser, session: SessionDep) -> Page[ShareOut]:
    dataset, _ = await service.load(session, dataset_id, identity, "owner")
    rows = await service.list_shares(session, dataset)
    data = [_share_out(r) for r in rows]
    return Page[ShareOut](data=data, meta={"next_cursor": None, "limit": len(data)})


@router.post(
    "/{dataset_id}/shares",
    status_code=status.HTTP_201_CREATED,
    summary="Share with a user or a role, read or write (owner or admin)",
)
async def add_share(
    dataset_id: str, spec: ShareIn, identity: CurrentUser, session: SessionDep, runtime: RuntimeDep
) -> ShareOut:
    dataset, _ = await service.load(session, dataset_id, identity, "owner")
    r = await service.share(session=session, stage=runtime.stage, actor=identity, dataset=dataset, spec=spec)
    return _share_out(r)


@router.delete("/{dataset_id}/shares/{share_id}", status_code=status.HTTP_204_NO_CONTENT)
async def remove_share(
    dataset_id: str, share_id: int, identity: CurrentUser, session: SessionDep, runtime: RuntimeDep
) -> None:
    dataset, _ = await service.load(session, dataset_id, identity, "owner")
    await service.unshare(session=session, stage=runtime.stage, dataset=dataset, share_id=share_id)
