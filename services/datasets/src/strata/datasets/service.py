"""What the datasets service does with its tables. Functions take what they need, keyword-only; they flush, never
commit (the request's session, or the worker's, commits once)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from strata.common.contracts.auth import Identity, Role
from strata.common.contracts.datasets import (
    DatasetDeleted,
    DatasetEvent,
    DatasetShared,
    DatasetUpdated,
    DatasetUploaded,
    IngestRequested,
)
from strata.common.contracts.realtime import ReadCheck, ReadVerdict, SharedWith, SharedWithRequest
from strata.common.db import utcnow
from strata.common.errors import BadRequest, Conflict, Forbidden, NotFound, Unprocessable
from strata.common.events import CloudEvent, EventPayload, source_of
from strata.common.pagination import decode_cursor, encode_cursor

from .models import Dataset, DatasetShare, DatasetVersion
from .schemas import DatasetPatch, ShareIn
from .upload import ReceivedUpload

SOURCE = source_of("datasets")
D = TypeVar("D", bound=DatasetEvent)
Stage = Callable[[AsyncSession, CloudEvent], None]
Permission = Literal["owner", "admin", "write", "read"]
SORTS = {"created_at", "-created_at", "updated_at", "-updated_at", "name", "-name"}


class DatasetNotFound(NotFound):
    code, default_message = "DATASET_NOT_FOUND", "No such dataset."


class VersionNotFound(NotFound):
    code, default_message = "VERSION_NOT_FOUND", "No such version of this dataset."


class DatasetNotReady(Conflict):
    code, default_message = "DATASET_NOT_READY", "The dataset is not ready yet."


class ShareNotFound(NotFound):
    code, default_message = "SHARE_NOT_FOUND", "No such share."


def event(payload: EventPayload, subject: str) -> CloudEvent:
    return CloudEvent.of(payload, source=SOURCE, subject=subject)


def dataset_event(kind: type[D], dataset: Dataset, version: int, **fields: Any) -> D:
    """A dataset event with the fields every one of them carries filled in from ``dataset``."""
    return kind(dataset_id=dataset.id, owner_id=dataset.owner_id, version=version, name=dataset.name, **fields)


def key_prefix(dataset_id: str, version: int) -> str:
    return f"datasets/{dataset_id}/v{version}"


def original_key(dataset_id: str, version: int, fmt: str) -> str:
    return f"{key_prefix(dataset_id, version)}/original.{fmt}"


def data_key(dataset_id: str, version: int) -> str:
    return f"{key_prefix(dataset_id, version)}/data.parquet"


# -- access ----------------------------------------------------------------------------------------------------------
def _shared_with(identity: Identity) -> Any:
    """A condition true for shares that reach ``identity``: to the user, or to a role they hold or exceed."""
    roles = [r.value for r in Role if identity.role.at_least(r)]
    return or_(
        and_(DatasetShare.grantee_type == "user", DatasetShare.grantee == identity.user_id),
        and_(DatasetShare.grantee_type == "role", DatasetShare.grantee.in_(roles)),
    )


async def permission_on(session: AsyncSession, dataset: Dataset, identity: Identity) -> Permission | None:
    if dataset.owner_id == identity.user_id:
        return "owner"
    if identity.role == Role.admin:
        return "admin"
    grants = (
        await session.scalars(
            select(DatasetShare.permission).where(DatasetShare.dataset_id == dataset.id, _shared_with(identity))
        )
    ).all()
    if "write" in grants:
        return "write"
    if "read" in grants:
        return "read"
    return None


async def load(
    session: AsyncSession, dataset_id: str, identity: Identity, need: Literal["read", "write", "owner"] = "read"
) -> tuple[Dataset, Permission]:
    """The dataset if ``identity`` may do ``need`` with it. Not readable at all: 404, so existence does not leak."""
    try:
        uuid.UUID(dataset_id)
    except ValueError:
        raise DatasetNotFound() from None
    dataset = await session.get(Dataset, dataset_id)
    if dataset is None or dataset.deleted_at is not None:
        raise DatasetNotFound()
    permission = await permission_on(session, dataset, identity)
    if permission is None:
        raise DatasetNotFound()
    if need == "write" and permission == "read":
        raise Forbidden("This dataset is shared with you read-only.")
    if need == "owner" and permission not in ("owner", "admin"):
        raise Forbidden("Only the dataset's owner (or an admin) may do this.")
    return dataset, permission


async def read_verdict(session: AsyncSession, check: ReadCheck) -> ReadVerdict:
    """``rpc.datasets.can_read``: the rule of :func:`load` (owner, admin, or a share to the user or their role), as
    a verdict; a malformed id, an unknown or deleted dataset is simply not readable."""
    try:
        dataset, _ = await load(session, check.resource_id, Identity(user_id=check.user_id, role=check.role))
    except DatasetNotFound:
        return ReadVerdict(readable=False)
    return ReadVerdict(readable=True, owner_id=dataset.owner_id)


async def shared_with(session: AsyncSession, request: SharedWithRequest) -> SharedWith:
    """``rpc.datasets.shared_with``: the live datasets shared with the user, directly or through a role they hold or
    exceed, not their own; by id, at most ``limit``."""
    identity = Identity(user_id=request.user_id, role=request.role)
    shared = select(DatasetShare.dataset_id).where(_shared_with(identity))
    ids = list(
        (
            await session.scalars(
                select(Dataset.id)
                .where(Dataset.id.in_(shared), Dataset.owner_id != identity.user_id, Dataset.deleted_at.is_(None))
                .order_by(Dataset.id)
                .limit(request.limit + 1)
            )
        ).all()
    )
    return SharedWith(dataset_ids=ids[: request.limit], truncated=len(ids) > request.limit)


async def current(session: AsyncSession, dataset: Dataset, version: int | None = None) -> DatasetVersion:
    number = version if version is not None else dataset.current_version
    row = await session.scalar(
        select(DatasetVersion).where(DatasetVersion.dataset_id == dataset.id, DatasetVersion.version == number)
    )
    if row is None:
        raise VersionNotFound()
    return row


async def ready_version(session: AsyncSession, dataset: Dataset, version: int | None = None) -> DatasetVersion:
    row = await current(session, dataset, version)
    if row.status != "ready" or row.data_key is None:
        if row.status == "failed":
            raise DatasetNotReady("This version failed to ingest: " + str((row.error or {}).get("message", "")))
        raise DatasetNotReady()
    return row


# -- create, versions ------------------------------------------------------------------------------------------------
def _ingest_events(stage: Stage, session: AsyncSession, dataset: Dataset, row: DatasetVersion) -> None:
    stage(
        session,
        event(
            dataset_event(
                DatasetUploaded,
                dataset,
                row.version,
                format=row.format,
                bytes=row.original_bytes,
                sha256=row.sha256,
            ),
            dataset.id,
        ),
    )
    # The work item goes through the outbox too: committed with the rows, so it is never lost or sent early.
    stage(session, event(IngestRequested(dataset_id=dataset.id, version=row.version), dataset.id))


def parse_options(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except ValueError:
        raise Unprocessable("'options' must be a JSON object.", details=[{"loc": ["body", "options"]}]) from None
    allowed = {"delimiter", "header", "encoding", "sheet", "skip_rows", "quote", "null_values", "date_format"}
    if not isinstance(options, dict) or set(options) - allowed:
        raise Unprocessable(
            f"'options' may hold: {', '.join(sorted(allowed))}.",
            details=[
                {
                    "loc": ["body", "options"],
                    "unknown": sorted(set(options) - allowed) if isinstance(options, dict) else [],
                }
            ],
        )
    return options


async def create_dataset(
    *,
    session: AsyncSession,
    stage: Stage,
    owner: Identity,
    dataset_id: str,
    upload: ReceivedUpload,
    name: str,
    description: str,
    options: dict[str, Any],
) -> Dataset:
    now = utcnow()
    dataset = Dataset(
        id=dataset_id,
        owner_id=owner.user_id,
        name=name,
        description=description,
        tags=[],
        status="processing",
        format=upload.format,
        current_version=1,
        created_at=now,
        updated_at=now,
        column_names="",
    )
    row = _new_version(dataset_id, 1, "processing", upload, options, owner.user_id)
    session.add_all([dataset, row])
    await session.flush()
    _ingest_events(stage, session, dataset, row)
    return dataset


def _new_version(
    dataset_id: str, version: int, status: str, upload: ReceivedUpload, options: dict[str, Any], created_by: str
) -> DatasetVersion:
    return DatasetVersion(
        dataset_id=dataset_id,
        version=version,
        status=status,
        format=upload.format,
        options=options,
        original_filename=upload.filename,
        original_key=upload.key,
        original_bytes=upload.size,
        sha256=upload.sha256,
        created_by=created_by,
        created_at=utcnow(),
        attempts=0,
    )


async def next_version_number(session: AsyncSession, dataset: Dataset) -> int:
    latest = await session.scalar(
        select(func.max(DatasetVersion.version)).where(DatasetVersion.dataset_id == dataset.id)
    )
    return int(latest or 0) + 1


async def add_version(
    *,
    session: AsyncSession,
    stage: Stage,
    actor: Identity,
    dataset: Dataset,
    version: int,
    upload: ReceivedUpload,
    options: dict[str, Any],
) -> DatasetVersion:
    row = _new_version(dataset.id, version, "processing", upload, options, actor.user_id)
    session.add(row)
    dataset.updated_at = row.created_at
    await session.flush()
    _ingest_events(stage, session, dataset, row)
    return row


async def list_versions(session: AsyncSession, dataset: Dataset) -> list[DatasetVersion]:
    return list(
        (
            await session.scalars(
                select(DatasetVersion)
                .where(DatasetVersion.dataset_id == dataset.id)
                .order_by(DatasetVersion.version.desc())
            )
        ).all()
    )


# -- list, update, delete --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ListQuery:
    q: str | None = None
    status: str | None = None
    format: str | None = None
    owner_id: str | None = None
    sort: str = "-created_at"
    limit: int = 50
    cursor: str | None = None
    all: bool = False


async def list_datasets(
    session: AsyncSession, identity: Identity, query: ListQuery
) -> tuple[list[Dataset], str | None]:
    if query.sort not in SORTS:
        raise BadRequest(f"sort must be one of {', '.join(sorted(SORTS))}.", details=[{"loc": ["query", "sort"]}])
    stmt: Select[Dataset] = select(Dataset).where(Dataset.deleted_at.is_(None))
    if not (query.all and identity.role == Role.admin):
        shared = select(DatasetShare.dataset_id).where(_shared_with(identity))
        stmt = stmt.where(or_(Dataset.owner_id == identity.user_id, Dataset.id.in_(shared)))
    if query.q:
        like = "%" + query.q.lower().replace("\\", "").replace("%", "").replace("_", "") + "%"
        stmt = stmt.where(
            or_(
                func.lower(Dataset.name).like(like),
                func.lower(Dataset.description).like(like),
                func.lower(Dataset.column_names).like(like),
            )
        )
    if query.status:
        stmt = stmt.where(Dataset.status == query.status)
    if query.format:
        stmt = stmt.where(Dataset.format == query.format)
    if query.owner_id:
        stmt = stmt.where(Dataset.owner_id == query.owner_id)
    descending = query.sort.startswith("-")
    column = getattr(Dataset, query.sort.lstrip("-"))
    if query.cursor:
        raw_value, last_id = decode_cursor(query.cursor)
        value: str | datetime = raw_value
        if query.sort.lstrip("-") != "name":
            try:
                value = datetime.fromisoformat(raw_value)
            except ValueError:
                raise BadRequest("The cursor is not valid for this sort.") from None
        after = column < value if descending else column > value
        tie = and_(column == value, Dataset.id < last_id if descending else Dataset.id > last_id)
        stmt = stmt.where(or_(after, tie))
    order = (column.desc(), Dataset.id.desc()) if descending else (column.asc(), Dataset.id.asc())
    rows = list((await session.scalars(stmt.order_by(*order).limit(query.limit + 1))).all())
    next_cursor = None
    if len(rows) > query.limit:
        rows = rows[: query.limit]
        last = rows[-1]
        value = getattr(last, query.sort.lstrip("-"))
        next_cursor = encode_cursor([value.isoformat() if isinstance(value, datetime) else value, last.id])
    return rows, next_cursor


async def permissions_for(session: AsyncSession, datasets: list[Dataset], identity: Identity) -> dict[str, Permission]:
    out: dict[str, Permission] = {}
    shared_ids = [d.id for d in datasets if d.owner_id != identity.user_id]
    grants: dict[str, set[str]] = {}
    if shared_ids:
        for dataset_id, permission in (
            await session.execute(
                select(DatasetShare.dataset_id, DatasetShare.permission).where(
                    DatasetShare.dataset_id.in_(shared_ids), _shared_with(identity)
                )
            )
        ).all():
            grants.setdefault(dataset_id, set()).add(permission)
    for d in datasets:
        if d.owner_id == identity.user_id:
            out[d.id] = "owner"
        elif identity.role == Role.admin:  # as in permission_on: an admin's rights do not come from shares
            out[d.id] = "admin"
        elif "write" in grants.get(d.id, ()):
            out[d.id] = "write"
        elif "read" in grants.get(d.id, ()):
            out[d.id] = "read"
        else:  # listed with all=true by an admin, or shared through a role: never reached otherwise
            out[d.id] = "admin"
    return out


async def update_dataset(*, session: AsyncSession, stage: Stage, dataset: Dataset, patch: DatasetPatch) -> Dataset:
    changes = []
    for name in ("name", "description", "tags"):
        value = getattr(patch, name)
        if value is not None and value != getattr(dataset, name):
            setattr(dataset, name, value)
            changes.append(name)
    if changes:
        dataset.updated_at = utcnow()
        await session.flush()
        stage(
            session,
            event(
                dataset_event(
                    DatasetUpdated,
                    dataset,
                    dataset.current_version,
                    changes=changes,
                ),
                dataset.id,
            ),
        )
    return dataset


async def delete_dataset(*, session: AsyncSession, stage: Stage, dataset: Dataset) -> None:
    """Marks it deleted now (it disappears at once). The files go when the service's own consumer of the
    ``deleted`` event (durable, retried) handles it, after this commits."""
    dataset.deleted_at = utcnow()
    dataset.updated_at = dataset.deleted_at
    await session.flush()
    stage(
        session,
        event(
            dataset_event(DatasetDeleted, dataset, dataset.current_version),
            dataset.id,
        ),
    )


# -- shares ----------------------------------------------------------------------------------------------------------
async def share(
    *, session: AsyncSession, stage: Stage, actor: Identity, dataset: Dataset, spec: ShareIn
) -> DatasetShare:
    if (spec.user_id is None) == (spec.role is None):
        raise Unprocessable("Share with exactly one of 'user_id' or 'role'.", details=[{"loc": ["body"]}])
    grantee_type, grantee = ("user", spec.user_id) if spec.user_id else ("role", spec.role.value if spec.role else "")
    if grantee_type == "user" and grantee == dataset.owner_id:
        raise Unprocessable("The owner already has every right on the dataset.")
    row = await session.scalar(
        select(DatasetShare).where(
            DatasetShare.dataset_id == dataset.id,
            DatasetShare.grantee_type == grantee_type,
            DatasetShare.grantee == grantee,
        )
    )
    if row is None:
        row = DatasetShare(
            dataset_id=dataset.id,
            grantee_type=grantee_type,
            grantee=grantee,
            permission=spec.permission,
            created_by=actor.user_id,
            created_at=utcnow(),
        )
        session.add(row)
    else:
        row.permission = spec.permission
    await session.flush()
    stage(
        session,
        event(
            dataset_event(
                DatasetShared,
                dataset,
                dataset.current_version,
                grantee_type=grantee_type,
                grantee=grantee,
                permission=spec.permission,
            ),
            dataset.id,
        ),
    )
    return row


async def list_shares(session: AsyncSession, dataset: Dataset) -> list[DatasetShare]:
    return list(
        (
            await session.scalars(
                select(DatasetShare).where(DatasetShare.dataset_id == dataset.id).order_by(DatasetShare.id)
            )
        ).all()
    )


async def unshare(*, session: AsyncSession, stage: Stage, dataset: Dataset, share_id: int) -> None:
    row = await session.get(DatasetShare, share_id)
    if row is None or row.dataset_id != dataset.id:
        raise ShareNotFound()
    await session.delete(row)
    await session.flush()
    stage(
        session,
        event(
            dataset_event(
                DatasetShared,
                dataset,
                dataset.current_version,
                grantee_type=row.grantee_type,
                grantee=row.grantee,
                permission=None,
            ),
            dataset.id,
        ),
    )


# -- resolve (for the execution service) -----------------------------------------------------------------------------
async def resolve_ref(session: AsyncSession, identity: Identity, ref: str) -> Dataset | None:
    """A dataset named as a query names it: an id, one of the user's own names, or ``<owner id>.<name>``."""
    try:
        uuid.UUID(ref)
        candidates = select(Dataset).where(Dataset.id == ref)
    except ValueError:
        owner, dot, name = ref.partition(".")
        if dot and owner and name:
            candidates = select(Dataset).where(Dataset.owner_id == owner, Dataset.name == name)
        else:
            candidates = select(Dataset).where(Dataset.owner_id == identity.user_id, Dataset.name == ref)
    candidates = candidates.where(Dataset.deleted_at.is_(None), Dataset.status == "ready")
    for dataset in (await session.scalars(candidates.order_by(Dataset.updated_at.desc()))).all():
        if await permission_on(session, dataset, identity) is not None:
            return dataset
    if "." in ref:
        return None
    # No dataset of their own by that name: one shared with them by that name, if there is exactly one.
    shared = select(DatasetShare.dataset_id).where(_shared_with(identity))
    found = (
        await session.scalars(
            select(Dataset)
            .where(Dataset.name == ref, Dataset.id.in_(shared), Dataset.deleted_at.is_(None), Dataset.status == "ready")
            .limit(2)
        )
    ).all()
    return found[0] if len(found) == 1 else None


# -- uploads straight to S3 ------------------------------------------------------------------------------------------
class UploadNotFound(NotFound):
    code, default_message = "UPLOAD_NOT_FOUND", "No upload waiting to be completed here."


class UploadMissing(Conflict):
    code, default_message = "UPLOAD_NOT_RECEIVED", "The file has not arrived: PUT it to the presigned URL first."


async def begin_presigned(
    *,
    session: AsyncSession,
    owner: Identity,
    dataset_id: str,
    filename: str,
    fmt: str,
    name: str,
    description: str,
    options: dict[str, Any],
    size: int,
) -> Dataset:
    """A dataset in status ``uploading`` whose file the client PUTs straight to storage, then completes."""
    now = utcnow()
    dataset = Dataset(
        id=dataset_id,
        owner_id=owner.user_id,
        name=name,
        description=description,
        tags=[],
        status="uploading",
        format=fmt,
        current_version=1,
        created_at=now,
        updated_at=now,
        column_names="",
    )
    # Size and hash as declared; complete_presigned replaces them with what arrived.
    pending = ReceivedUpload({}, filename, fmt, original_key(dataset_id, 1, fmt), size, "")
    row = _new_version(dataset_id, 1, "uploading", pending, options, owner.user_id)
    session.add_all([dataset, row])
    await session.flush()
    return dataset


async def complete_presigned(
    *, session: AsyncSession, stage: Stage, dataset: Dataset, size: int, sha256: str
) -> DatasetVersion:
    row = await current(session, dataset)
    row.status, row.original_bytes, row.sha256 = "processing", size, sha256
    dataset.status, dataset.updated_at = "processing", utcnow()
    await session.flush()
    _ingest_events(stage, session, dataset, row)
    return row
