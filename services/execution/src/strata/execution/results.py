"""Query results: pages, page tokens and downloads, served from the result's Parquet file in object storage.

A query job writes its result once, as ``results/<job_id>/result.parquet`` (see :class:`strata.common.storage.Storage`).
Everything here reads that file in place and never holds all of it in memory, whatever its size:

- :func:`read_page` decodes only the row groups that cover the page, found from the Parquet footer. On S3 that is one
  ranged ``GET`` per row group, plus a ``HEAD`` and a ``GET`` of the footer the first time: the object's details and
  footer are then cached per storage and key for :data:`FOOTER_CACHE_TTL_S` (s3fs reads ``If-Match`` the cached ETag,
  so a result deleted or replaced meanwhile is read afresh, never mixed up).
- :func:`make_page_token` / :func:`read_page_token`: opaque, URL-safe "next page of job X" tokens, signed with the
  job's own secret (HMAC-SHA256).
- :func:`download` streams the stored bytes (``parquet``) or converts them record batch by record batch (``csv``,
  ``json``, ``ndjson``, ``arrow``). A batch is converted in a worker thread while the chunk before it is being sent,
  and no further ahead, so memory stays flat and a client that stops reading stops the work; closing the body (or
  cancelling the task that reads it) lets the batch in hand finish and closes the file.

Values in pages and in JSON follow the datasets service's conventions: ISO 8601 dates and times (time zone aware
timestamps in UTC, ``+00:00``), decimals as text, bytes in base64, ``NaN`` and infinities as ``null``, durations as
ISO 8601 durations, nested lists, structs and maps as JSON arrays and objects. The common types are rendered by Arrow's
kernels rather than value by value in Python. Column types are named as DuckDB names them (``BIGINT``,
``DECIMAL(12,2)``, ``TIMESTAMP WITH TIME ZONE``, ``VARCHAR[]``, ``STRUCT(a INTEGER)``...; see :func:`duckdb_type_name`).

CSV is RFC 4180: UTF-8, CRLF line ends, fields quoted where needed, a header row. ``null`` is an empty field and an
empty string is ``""``; timestamps are written as Arrow writes them (``2024-01-31 12:00:00.000000``, time zone aware
ones in UTC with ``Z``); floats keep ``nan`` and ``inf``; nested values are JSON text and bytes base64.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import itertools
import json
import re
import struct
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from os import PathLike
from typing import Any, Final, Protocol, TypeVar

import duckdb
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.csv as pa_csv  # type: ignore[import-untyped]
import pyarrow.ipc as pa_ipc  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from strata.common.errors import BadRequest
from strata.common.jsonvalues import iso_duration, json_value
from strata.common.storage import Storage

__all__ = [
    "DOWNLOAD_FORMATS",
    "FOOTER_CACHE_TTL_S",
    "Download",
    "InvalidPageToken",
    "ResultPage",
    "UnsupportedFormat",
    "download",
    "duckdb_type_name",
    "make_page_token",
    "parquet_schema_columns",
    "read_page",
    "read_page_token",
]

T = TypeVar("T")

DOWNLOAD_FORMATS: Final = ("parquet", "csv", "json", "ndjson", "arrow")

#: How long an S3 result's footer (its details and Parquet metadata) is remembered for pages, and for how many results
#: at most. It saves a HEAD and a GET per page (~12 ms against a local moto server, more against S3 itself); local files
#: are not cached: parsing a footer costs them ~0.05-0.2 ms, ~2% of reading a page.
FOOTER_CACHE_TTL_S: Final = 60.0
FOOTER_CACHE_SIZE: Final = 256

#: Record batches are sized to about this many decoded bytes (from the row groups' statistics), within the bounds below.
_TARGET_BATCH_BYTES: Final = 4 << 20
_MIN_BATCH_ROWS: Final = 256
_MAX_BATCH_ROWS: Final = 65_536
#: Local files are read through a buffer per column, so memory does not grow with the size of a row group.
_LOCAL_READ_BUFFER: Final = 1 << 20
#: S3 reads are plain ranged GETs: fsspec's read-ahead cache would fetch (and keep) 50 MiB past every read.
_S3_OPEN_OPTIONS: Final[dict[str, Any]] = {"cache_type": "none"}


class InvalidPageToken(BadRequest):
    code = "INVALID_PAGE_TOKEN"
    default_message = "The page token is not valid for this job."


class UnsupportedFormat(BadRequest):
    code = "UNSUPPORTED_FORMAT"
    default_message = f"Unsupported download format; use one of: {', '.join(DOWNLOAD_FORMATS)}."


# --- column types -----------------------------------------------------------------------------------------------------


@functools.cache
def _duckdb_keywords() -> frozenset[str]:
    """DuckDB's SQL keywords: it quotes them (and any name that is not a plain identifier) inside ``STRUCT(...)``."""
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    try:
        return frozenset(
            str(row[0]).lower() for row in con.execute("SELECT keyword_name FROM duckdb_keywords()").fetchall()
        )
    finally:
        con.close()


_PLAIN_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _struct_field_name(name: str) -> str:
    if _PLAIN_IDENTIFIER.fullmatch(name) and name.lower() not in _duckdb_keywords():
        return name
    return '"' + name.replace('"', '""') + '"'


_SIMPLE_TYPE_NAMES: Final[list[tuple[Callable[[Any], bool], str]]] = [
    (pa.types.is_boolean, "BOOLEAN"),
    (pa.types.is_int8, "TINYINT"),
    (pa.types.is_int16, "SMALLINT"),
    (pa.types.is_int32, "INTEGER"),
    (pa.types.is_int64, "BIGINT"),
    (pa.types.is_uint8, "UTINYINT"),
    (pa.types.is_uint16, "USMALLINT"),
    (pa.types.is_uint32, "UINTEGER"),
    (pa.types.is_uint64, "UBIGINT"),
    # DuckDB has no half float; it reads one as FLOAT
    (pa.types.is_float16, "FLOAT"),
    (pa.types.is_float32, "FLOAT"),
    (pa.types.is_float64, "DOUBLE"),
    (pa.types.is_string, "VARCHAR"),
    (pa.types.is_large_string, "VARCHAR"),
    (pa.types.is_string_view, "VARCHAR"),
    (pa.types.is_binary, "BLOB"),
    (pa.types.is_large_binary, "BLOB"),
    (pa.types.is_binary_view, "BLOB"),
    (pa.types.is_fixed_size_binary, "BLOB"),
    (pa.types.is_date, "DATE"),
    (pa.types.is_duration, "INTERVAL"),
    (pa.types.is_interval, "INTERVAL"),
    (pa.types.is_null, "NULL"),
]


def duckdb_type_name(type_: Any) -> str:
    """The DuckDB name of an Arrow type, as DuckDB's ``DESCRIBE`` names the column of a Parquet file.

    Exceptions, where our values differ from what DuckDB would read: durations are ``INTERVAL`` (DuckDB reads the raw
    ``BIGINT``), decimals wider than 38 digits stay ``DECIMAL(p,s)`` (DuckDB reads ``DOUBLE``), and the null type is
    ``NULL`` (DuckDB writes ``"NULL"``).
    """
    if isinstance(type_, pa.BaseExtensionType):
        if type_.extension_name == "arrow.uuid":
            return "UUID"
        if type_.extension_name == "arrow.json":
            return "JSON"
        return duckdb_type_name(type_.storage_type)
    if pa.types.is_dictionary(type_):
        return duckdb_type_name(type_.value_type)
    for predicate, name in _SIMPLE_TYPE_NAMES:
        if predicate(type_):
            return name
    if pa.types.is_timestamp(type_):
        if type_.tz is not None:
            return "TIMESTAMPTZ_NS" if type_.unit == "ns" else "TIMESTAMP WITH TIME ZONE"
        return "TIMESTAMP_NS" if type_.unit == "ns" else "TIMESTAMP"
    if pa.types.is_time(type_):
        return "TIME_NS" if type_.unit == "ns" else "TIME"
    if pa.types.is_decimal(type_):
        return f"DECIMAL({type_.precision},{type_.scale})"
    if pa.types.is_map(type_):
        return f"MAP({duckdb_type_name(type_.key_type)}, {duckdb_type_name(type_.item_type)})"
    if _is_list(type_):
        return f"{duckdb_type_name(type_.value_type)}[]"
    if pa.types.is_struct(type_):
        fields = ", ".join(
            f"{_struct_field_name(type_.field(i).name)} {duckdb_type_name(type_.field(i).type)}"
            for i in range(type_.num_fields)
        )
        return f"STRUCT({fields})"
    return str(type_).upper()


def _is_list(type_: Any) -> bool:
    return bool(
        pa.types.is_list(type_)
        or pa.types.is_large_list(type_)
        or pa.types.is_fixed_size_list(type_)
        or pa.types.is_list_view(type_)
        or pa.types.is_large_list_view(type_)
    )


def _columns(schema: Any) -> list[dict[str, Any]]:
    return [{"name": f.name, "type": duckdb_type_name(f.type), "nullable": bool(f.nullable)} for f in schema]


def parquet_schema_columns(path: str | PathLike[str]) -> list[dict[str, Any]]:
    """The columns of a local Parquet file, from its footer: ``[{"name", "type", "nullable"}]`` (types as DuckDB's).

    Blocking (it reads the file's footer): call it from a worker thread.
    """
    return _columns(pq.read_schema(str(path)))


# --- JSON-safe values ------------------------------------------------------------------------------------------------


def _with_nulls(array: Any, values: list[Any]) -> list[Any]:
    if array.null_count == 0:
        return values
    valid = array.is_valid().to_pylist()
    return [v if ok else None for v, ok in zip(values, valid, strict=True)]


#: Arrow writes every digit of a time's unit; Python's ``isoformat`` (what the datasets service shows) writes none
#: when the fraction is zero and six otherwise. Nanoseconds keep all nine digits when the last three are not zero.
_FRACTION_FIXES: Final[dict[str, list[tuple[str, str]]]] = {
    "s": [],
    "ms": [(r"\.000$", ""), (r"(\.\d{3})$", r"\1" "000")],
    "us": [(r"\.000000$", "")],
    "ns": [(r"\.000000000$", ""), (r"(\.\d{6})000$", r"\1")],
}


def _iso_text(array: Any) -> Any:
    """Dates, times and timestamps as ISO 8601 text (a string array, nulls kept), computed by Arrow.

    Time zone aware timestamps are shown in UTC (``+00:00``), as the datasets service shows them.
    """
    type_ = array.type
    if pa.types.is_date(type_):
        return array.cast(pa.date32()).cast(pa.string())
    aware = pa.types.is_timestamp(type_) and type_.tz is not None
    if aware:
        # Arrow writes UTC as "...Z"; the offset goes back on after the fraction is fixed
        text = pc.replace_substring(array.cast(pa.timestamp(type_.unit, tz="UTC")).cast(pa.string()), "Z", "")
    else:
        text = array.cast(pa.string())
    if pa.types.is_timestamp(type_):
        # a cast is ~10x faster than strftime; it writes a space between date and time
        text = pc.replace_substring(text, " ", "T", max_replacements=1)
    for pattern, replacement in _FRACTION_FIXES[type_.unit]:
        text = pc.replace_substring_regex(text, pattern, replacement)
    if aware:
        text = pc.binary_join_element_wise(text, "+00:00", "")
    return text


#: Decimals of each storage width, with the widest precision and no scale: the same bytes read as the unscaled integer.
_UNSCALED: Final[dict[int, Any]] = {
    4: pa.decimal32(9, 0),
    8: pa.decimal64(18, 0),
    16: pa.decimal128(38, 0),
    32: pa.decimal256(76, 0),
}


def _decimal_text(array: Any) -> Any:
    """Decimals as plain text (``-0.05``, ``0.00``, as Python's ``format(value, "f")``), a string array with nulls.

    Arrow's own cast writes some values in scientific notation (``0E-10``), so the text is made from the unscaled
    integer (the same bytes read with scale 0) and the decimal point put in by string kernels.
    """
    type_ = array.type
    scale = type_.scale
    if scale < 0:
        return pa.array([None if v is None else format(v, "f") for v in array.to_pylist()], pa.string())
    unscaled = pa.Array.from_buffers(_UNSCALED[type_.byte_width], len(array), array.buffers(), offset=array.offset)
    text = unscaled.cast(pa.string())
    if scale == 0:
        return text
    negative = pc.starts_with(text, "-")
    digits = pc.utf8_lpad(pc.replace_substring(text, "-", ""), width=scale + 1, padding="0")
    plain = pc.binary_join_element_wise(
        pc.utf8_slice_codeunits(digits, 0, -scale), pc.utf8_slice_codeunits(digits, -scale), "."
    )
    return pc.if_else(negative, pc.binary_join_element_wise("-", plain, ""), plain)


def _list_values(array: Any) -> list[Any]:
    """The rows of a list array: its values cut at its offsets (which, unlike ``values``, account for slicing)."""
    offsets = array.offsets.to_pylist()
    if not offsets:
        return []
    first = offsets[0]
    children = _json_values(array.values.slice(first, offsets[-1] - first))
    rows = [children[a - first : b - first] for a, b in itertools.pairwise(offsets)]
    return _with_nulls(array, rows)


def _json_values(array: Any) -> list[Any]:
    """The values of one Arrow array as JSON-safe Python values (see the module docstring), decided by its type."""
    type_ = array.type
    if isinstance(type_, pa.BaseExtensionType):
        if type_.extension_name == "arrow.uuid":
            return [None if v is None else str(v) for v in array.to_pylist()]
        return _json_values(array.storage)
    if pa.types.is_dictionary(type_):
        return _json_values(array.dictionary_decode())
    if pa.types.is_null(type_):
        return [None] * len(array)
    if (
        pa.types.is_integer(type_)
        or pa.types.is_boolean(type_)
        or pa.types.is_string(type_)
        or pa.types.is_large_string(type_)
        or pa.types.is_string_view(type_)
    ):
        return list(array.to_pylist())
    if pa.types.is_floating(type_):
        if pa.types.is_float16(type_):
            array = array.cast(pa.float32())
        finite = pc.is_finite(array)
        if pc.all(finite).as_py() is False:
            array = pc.if_else(finite, array, pa.scalar(None, array.type))
        return list(array.to_pylist())
    if pa.types.is_decimal(type_):
        return list(_decimal_text(array).to_pylist())
    if pa.types.is_timestamp(type_) or pa.types.is_time(type_) or pa.types.is_date(type_):
        return list(_iso_text(array).to_pylist())
    if pa.types.is_duration(type_):
        if type_.unit == "ns":
            array = array.cast(pa.duration("us"), safe=False)
        return [None if v is None else iso_duration(v) for v in array.to_pylist()]
    if pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or pa.types.is_fixed_size_binary(type_):
        return [None if v is None else base64.b64encode(v).decode("ascii") for v in array.to_pylist()]
    if pa.types.is_map(type_):
        keys = array.keys
        items = array.items
        offsets = array.offsets.to_pylist()
        if not offsets:
            return []
        first, last = offsets[0], offsets[-1]
        key_values = _json_values(keys.slice(first, last - first))
        item_values = _json_values(items.slice(first, last - first))
        maps: list[Any] = [
            {
                str(k): v
                for k, v in zip(key_values[a - first : b - first], item_values[a - first : b - first], strict=True)
            }
            for a, b in itertools.pairwise(offsets)
        ]
        return _with_nulls(array, maps)
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return _list_values(array)
    if pa.types.is_fixed_size_list(type_):
        size = type_.list_size
        children = _json_values(array.values.slice(array.offset * size, len(array) * size))
        return _with_nulls(array, [children[i * size : (i + 1) * size] for i in range(len(array))])
    if pa.types.is_struct(type_):
        names = [type_.field(i).name for i in range(type_.num_fields)]
        fields = [_json_values(child) for child in array.flatten()]
        structs: list[Any] = [dict(zip(names, row, strict=True)) for row in zip(*fields, strict=True)]
        if not fields:
            structs = [{} for _ in range(len(array))]
        return _with_nulls(array, structs)
    return [json_value(v) for v in array.to_pylist()]


def _json_rows(batch: Any) -> list[list[Any]]:
    columns = [_json_values(column) for column in batch.columns]
    if not columns:
        return [[] for _ in range(batch.num_rows)]
    return [list(row) for row in zip(*columns, strict=True)]


# --- opening result files ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Footer:
    """What opening an S3 result costs two round trips to learn: the object's details (size, ETag) and footer."""

    details: dict[str, Any]
    metadata: Any  # pyarrow.parquet.FileMetaData
    expires: float


_footers: weakref.WeakKeyDictionary[Storage, OrderedDict[str, _Footer]] = weakref.WeakKeyDictionary()


def _cached_footer(storage: Storage, key: str) -> _Footer | None:
    """Called on the event loop only (so the cache needs no lock)."""
    entries = _footers.get(storage)
    if entries is None or (footer := entries.get(key)) is None:
        return None
    if footer.expires < time.monotonic():
        del entries[key]
        return None
    return footer


def _remember_footer(storage: Storage, key: str, details: dict[str, Any], metadata: Any) -> None:
    entries = _footers.setdefault(storage, OrderedDict())
    entries[key] = _Footer(details, metadata, time.monotonic() + FOOTER_CACHE_TTL_S)
    entries.move_to_end(key)
    while len(entries) > FOOTER_CACHE_SIZE:
        entries.popitem(last=False)


def _forget_footer(storage: Storage, key: str) -> None:
    entries = _footers.get(storage)
    if entries is not None:
        entries.pop(key, None)


class _ResultFile:
    """An open result file. Created and used in worker threads, one thread at a time."""

    def __init__(self, storage: Storage, key: str, footer: _Footer | None) -> None:
        local = storage.local_path(key)
        self._raw: Any = None  # the fsspec file (S3)
        self.details: dict[str, Any] | None = None
        if local is not None:
            self.parquet = pq.ParquetFile(str(local), pre_buffer=False, buffer_size=_LOCAL_READ_BUFFER)
        else:
            fs = storage.fsspec_filesystem()
            path = storage.engine_path(key)
            if footer is None:
                self._raw = fs.open(path, "rb", **_S3_OPEN_OPTIONS)  # a HEAD request
            else:
                self._raw = fs.open(path, "rb", size=footer.details["size"], **_S3_OPEN_OPTIONS)
                # s3fs reads with If-Match on the ETag in these: a replaced object fails instead of mixing versions
                self._raw.details = footer.details
            try:
                # pre-buffering coalesces a row group's column chunks into one ranged GET
                self.parquet = pq.ParquetFile(
                    self._raw, metadata=footer.metadata if footer is not None else None, pre_buffer=True
                )
            except BaseException:
                self._raw.close()
                raise
            self.details = dict(self._raw.details)
        self.metadata = self.parquet.metadata
        self.schema = self.parquet.schema_arrow

    def close(self) -> None:
        try:
            self.parquet.close()
        finally:
            if self._raw is not None:
                self._raw.close()

    def batch_rows(self, row_group: int) -> int:
        """Rows per record batch for one row group, so that a batch is about ``_TARGET_BATCH_BYTES`` decoded."""
        meta = self.metadata.row_group(row_group)
        per_row = max(1, meta.total_byte_size // max(1, meta.num_rows))
        return int(min(_MAX_BATCH_ROWS, max(_MIN_BATCH_ROWS, _TARGET_BATCH_BYTES // per_row)))

    def batches(self, row_group: int, batch_size: int) -> Iterator[Any]:
        # One row group at a time: with pre-buffering, iter_batches over many row groups reads all of them first.
        return iter(self.parquet.iter_batches(batch_size=batch_size, row_groups=[row_group], use_threads=False))


async def _wait_uncancellable(task: asyncio.Future[T]) -> T:
    """Wait for ``task`` (work in a thread, which cancelling would not stop) even if we are cancelled meanwhile."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return task.result()


async def _open(storage: Storage, key: str, *, cached: bool) -> _ResultFile:
    """The result file, opened; on S3 with its footer from the cache when there is one and ``cached``."""
    local = storage.local_path(key) is not None
    footer = _cached_footer(storage, key) if cached and not local else None
    if not local:
        storage.fsspec_filesystem()  # made here, on the loop, so that two threads never both make one
    opening = asyncio.ensure_future(asyncio.to_thread(_ResultFile, storage, key, footer))
    try:
        result = await _wait_uncancellable(opening)
    except asyncio.CancelledError:
        if not opening.cancelled() and opening.exception() is None:
            await asyncio.to_thread(opening.result().close)
        raise
    except OSError:
        _forget_footer(storage, key)
        raise
    if footer is None and result.details is not None:
        _remember_footer(storage, key, result.details, result.metadata)
    return result


async def _close(result: _ResultFile) -> None:
    await _wait_uncancellable(asyncio.ensure_future(asyncio.to_thread(result.close)))


# --- pages ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResultPage:
    #: ``{"name", "type", "nullable"}`` per column, types named as DuckDB names them.
    columns: list[dict[str, Any]]
    #: Rows as lists in ``columns`` order, every value JSON-safe.
    rows: list[list[Any]]
    offset: int
    total_rows: int
    #: The offset of the next page, or ``None`` when this page is the last.
    next_offset: int | None


def _page_batches(result: _ResultFile, offset: int, limit: int) -> list[Any]:
    """The record batches holding rows ``[offset, offset + limit)``, decoding only the row groups that cover them."""
    metadata = result.metadata
    end = min(offset + limit, metadata.num_rows)
    out: list[Any] = []
    start = 0
    for index in range(metadata.num_row_groups):
        count = metadata.row_group(index).num_rows
        if start >= end:
            break
        if start + count > offset:
            low, high = max(offset, start) - start, min(end, start + count) - start
            position = 0
            # decoding stops at the last row needed; rows before ``low`` are decoded (Parquet pages must be) and dropped
            for batch in result.batches(index, min(_MAX_BATCH_ROWS, max(high, _MIN_BATCH_ROWS))):
                batch_end = position + batch.num_rows
                if batch_end > low:
                    first = max(low, position)
                    out.append(batch.slice(first - position, min(high, batch_end) - first))
                position = batch_end
                if position >= high:
                    break
        start += count
    return out


def _read_page_sync(result: _ResultFile, offset: int, limit: int) -> ResultPage:
    total = int(result.metadata.num_rows)
    rows: list[list[Any]] = []
    for batch in _page_batches(result, offset, limit):
        rows.extend(_json_rows(batch))
    end = offset + len(rows)
    return ResultPage(
        columns=_columns(result.schema),
        rows=rows,
        offset=offset,
        total_rows=total,
        next_offset=end if rows and end < total else None,
    )


async def read_page(storage: Storage, key: str, *, offset: int, limit: int) -> ResultPage:
    """Rows ``[offset, offset + limit)`` of the result at ``key``, in file order.

    An offset at or past the end gives an empty page (``next_offset`` ``None``). ``FileNotFoundError`` if there is no
    object at ``key``. The caller bounds ``limit`` (the rows are built in memory).
    """
    if offset < 0:
        raise ValueError("offset must not be negative")
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if storage.local_path(key) is None and _cached_footer(storage, key) is not None:
        try:
            return await _read_page(storage, key, offset, limit, cached=True)
        except OSError:
            # the object was deleted or replaced since (s3fs reads If-Match its ETag): once more, afresh
            _forget_footer(storage, key)
    return await _read_page(storage, key, offset, limit, cached=False)


async def _read_page(storage: Storage, key: str, offset: int, limit: int, *, cached: bool) -> ResultPage:
    result = await _open(storage, key, cached=cached)
    try:
        return await _wait_uncancellable(
            asyncio.ensure_future(asyncio.to_thread(_read_page_sync, result, offset, limit))
        )
    finally:
        await _close(result)


# --- page tokens ------------------------------------------------------------------------------------------------------

_TOKEN_VERSION: Final = 1
_TOKEN_MAC_BYTES: Final = 18
_TOKEN_LAYOUT: Final = struct.Struct(">Bq")  # version, offset (signed, so that a negative one is refused, not wrapped)
_TOKEN_BYTES: Final = _TOKEN_LAYOUT.size + _TOKEN_MAC_BYTES
#: 27 bytes are 36 base64 characters exactly: no padding, and no spare bits that would let two texts mean one token
_TOKEN_TEXT: Final = re.compile(rf"[A-Za-z0-9_-]{{{_TOKEN_BYTES * 4 // 3}}}")


def _token_mac(job_id: str, secret: str, payload: bytes) -> bytes:
    if not secret:
        raise ValueError("a page token needs the job's secret")
    message = b"strata.execution.page-token\x00" + job_id.encode() + b"\x00" + payload
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()[:_TOKEN_MAC_BYTES]


def _sign_token(job_id: str, secret: str, offset: int) -> str:
    payload = _TOKEN_LAYOUT.pack(_TOKEN_VERSION, offset)
    raw = payload + _token_mac(job_id, secret, payload)
    return base64.urlsafe_b64encode(raw).decode("ascii")


def make_page_token(job_id: str, secret: str, offset: int) -> str:
    """An opaque, URL-safe token for "job ``job_id``'s rows from ``offset`` on", signed with the job's ``secret``."""
    if offset < 0:
        raise ValueError("offset must not be negative")
    return _sign_token(job_id, secret, offset)


def read_page_token(token: str, job_id: str, secret: str) -> int:
    """The offset in a token from :func:`make_page_token`; :class:`InvalidPageToken` unless it was made for this job
    (with this secret) and is intact."""
    if not _TOKEN_TEXT.fullmatch(token):
        raise InvalidPageToken
    raw = base64.urlsafe_b64decode(token)
    payload, mac = raw[: _TOKEN_LAYOUT.size], raw[_TOKEN_LAYOUT.size :]
    if not hmac.compare_digest(mac, _token_mac(job_id, secret, payload)):
        raise InvalidPageToken
    version, offset = _TOKEN_LAYOUT.unpack(payload)
    if version != _TOKEN_VERSION or offset < 0:
        raise InvalidPageToken
    return int(offset)


# --- downloads --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Download:
    media_type: str
    #: ``<stem>.<extension>``, made of ``[A-Za-z0-9._-]`` only (safe in a ``Content-Disposition`` header as it is).
    filename: str
    #: The bytes; an async generator, so ``aclose()`` (or cancelling its consumer) stops the work and closes the file.
    #: Nothing is opened before the first iteration; a missing object raises ``FileNotFoundError`` there.
    body: AsyncGenerator[bytes, None]


class _Encoder(Protocol):
    """Turns record batches into the bytes of one format. Used from worker threads, one thread at a time."""

    def start(self, schema: Any) -> bytes: ...

    def batch(self, batch: Any) -> bytes: ...

    def finish(self) -> bytes: ...


class _Sink:
    """A writable file for Arrow writers that collects what they write until it is taken."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        return len(chunk)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def _json_text(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _csv_plan(type_: Any) -> tuple[Any, Callable[[Any], Any] | None]:
    """The type a column is written to CSV as, and how to convert it (``None``: as it is)."""

    def as_text(render: Callable[[Any], Any]) -> Callable[[Any], Any]:
        return lambda array: pa.array(render(array), pa.string())

    if isinstance(type_, pa.BaseExtensionType):
        if type_.extension_name == "arrow.uuid":
            return pa.string(), as_text(_json_values)
        storage_type, convert_storage = _csv_plan(type_.storage_type)
        if convert_storage is None:
            return storage_type, lambda a: a.storage
        inner = convert_storage
        return storage_type, lambda a: inner(a.storage)
    if pa.types.is_dictionary(type_):
        value_type, convert = _csv_plan(type_.value_type)
        if convert is None:
            return type_, None
        return value_type, lambda a: convert(a.dictionary_decode())
    if pa.types.is_timestamp(type_) and type_.tz is not None and type_.tz != "UTC":
        # written in UTC (``...Z``) like every other time zone aware value we show; the cast only relabels
        utc = pa.timestamp(type_.unit, tz="UTC")
        return utc, lambda a: a.cast(utc)
    if pa.types.is_decimal(type_):
        # Arrow's CSV writer would write 0E-10 and 1.000E-7
        return pa.string(), _decimal_text
    if pa.types.is_string_view(type_):
        return pa.string(), lambda a: a.cast(pa.string())
    if pa.types.is_float16(type_):
        return pa.float32(), lambda a: a.cast(pa.float32())
    if (
        pa.types.is_binary(type_)
        or pa.types.is_large_binary(type_)
        or pa.types.is_fixed_size_binary(type_)
        or pa.types.is_binary_view(type_)
        or pa.types.is_duration(type_)
    ):
        return pa.string(), as_text(_json_values)
    if pa.types.is_nested(type_):
        return pa.string(), as_text(lambda a: [_json_text(v) for v in _json_values(a)])
    return type_, None


class _CsvEncoder:
    def __init__(self) -> None:
        self._sink = _Sink()
        self._writer: Any = None
        self._plan: list[Callable[[Any], Any] | None] = []
        self._schema: Any = None

    def start(self, schema: Any) -> bytes:
        plans = [_csv_plan(field.type) for field in schema]
        self._plan = [convert for _, convert in plans]
        self._schema = pa.schema([pa.field(f.name, t) for f, (t, _) in zip(schema, plans, strict=True)])
        self._writer = pa_csv.CSVWriter(self._sink, self._schema, write_options=pa_csv.WriteOptions(eol="\r\n"))
        return self._sink.take()

    def batch(self, batch: Any) -> bytes:
        if any(self._plan):
            arrays = [
                column if convert is None else convert(column)
                for column, convert in zip(batch.columns, self._plan, strict=True)
            ]
            batch = pa.RecordBatch.from_arrays(arrays, schema=self._schema)
        self._writer.write_batch(batch)
        return self._sink.take()

    def finish(self) -> bytes:
        self._writer.close()
        return self._sink.take()


_NEEDS_JSON_ESCAPE: Final = "[\\x00-\\x1f]"
_encode_json_string: Callable[[str], str] = json.encoder.encode_basestring


def _json_fragments(array: Any) -> Any:
    """Each value of ``array`` as JSON text (a string array without nulls: ``null`` is the text ``null``).

    The common types are rendered by Arrow's kernels, the rest value by value from :func:`_json_values`; either way
    a value reads back as the same value a page shows.
    """
    type_ = array.type
    if pa.types.is_dictionary(type_):
        return _json_fragments(array.dictionary_decode())
    text: Any
    if pa.types.is_integer(type_) or pa.types.is_boolean(type_):
        text = array.cast(pa.string())
    elif pa.types.is_floating(type_):
        # through float64, so a FLOAT shows the digits a page shows (Python's float of it), not float32's shortest
        doubles = array.cast(pa.float64())
        text = pc.if_else(pc.is_finite(doubles), doubles.cast(pa.string()), pa.scalar(None, pa.string()))
    elif pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_string_view(type_):
        text = _json_string_fragments(array.cast(pa.string()))
    elif pa.types.is_timestamp(type_) or pa.types.is_time(type_) or pa.types.is_date(type_):
        text = pc.binary_join_element_wise('"', _iso_text(array), '"', "")
    elif pa.types.is_decimal(type_):
        text = pc.binary_join_element_wise('"', _decimal_text(array), '"', "")
    elif pa.types.is_null(type_):
        text = pa.nulls(len(array), pa.string())
    else:
        text = pa.array([_json_text(v) for v in _json_values(array)], pa.string())
    return text.fill_null("null") if text.null_count else text


def _json_string_fragments(strings: Any) -> Any:
    """Strings as JSON string literals; escaped by Arrow unless a control character needs ``\\u00XX``."""
    if pc.any(pc.match_substring_regex(strings, _NEEDS_JSON_ESCAPE)).as_py():
        return pa.array([None if v is None else _encode_json_string(v) for v in strings.to_pylist()], pa.string())
    escaped = pc.replace_substring(pc.replace_substring(strings, "\\", "\\\\"), '"', '\\"')
    return pc.binary_join_element_wise('"', escaped, '"', "")


def _string_array_bytes(array: Any) -> bytes:
    """The UTF-8 bytes of a string array's values, back to back."""
    count = len(array)
    if count == 0:
        return b""
    offsets = array.buffers()[1]
    start = struct.unpack_from("=i", offsets, 4 * array.offset)[0]
    end = struct.unpack_from("=i", offsets, 4 * (array.offset + count))[0]
    return bytes(array.buffers()[2][start:end].to_pybytes())


def _unique_names(names: list[str]) -> list[str]:
    """Column names as object keys: a repeated name gets ``_1``, ``_2``... as DuckDB would name it."""
    seen: set[str] = set()
    out: list[str] = []
    for name in names:
        unique, n = name, 0
        while unique in seen:
            n += 1
            unique = f"{name}_{n}"
        seen.add(unique)
        out.append(unique)
    return out


class _JsonEncoder:
    """A JSON array of objects (``array=True``) or one object per line (NDJSON).

    Each row's text is assembled by Arrow from the columns' JSON fragments and the keys between them, so no Python
    object is made per row (for the common column types, none per value either).
    """

    def __init__(self, *, array: bool) -> None:
        self._array = array
        self._keys: list[str] = []
        self._first = True

    def start(self, schema: Any) -> bytes:
        self._keys = [_encode_json_string(name) + ":" for name in _unique_names(list(schema.names))]
        return b"[" if self._array else b""

    def batch(self, batch: Any) -> bytes:
        if batch.num_rows == 0:
            return b""
        # JSON arrays: every object starts with a comma, and the very first one loses it
        opening, closing = (",{", "}") if self._array else ("{", "}\n")
        parts: list[Any] = []
        for index, column in enumerate(batch.columns):
            parts.append(("" if index == 0 else ",") + self._keys[index])
            parts.append(_json_fragments(column))
        if parts:
            parts[0] = opening + parts[0]
            parts.append(closing)
            rows = pc.binary_join_element_wise(*parts, "")
            data = _string_array_bytes(rows)
        else:
            data = (opening + closing).encode() * batch.num_rows
        if self._array and self._first:
            data = data[1:]
        self._first = False
        return data

    def finish(self) -> bytes:
        return b"]" if self._array else b""


class _ArrowEncoder:
    """The Arrow IPC stream format: the schema, then one message per record batch."""

    def __init__(self) -> None:
        self._sink = _Sink()
        self._writer: Any = None

    def start(self, schema: Any) -> bytes:
        self._writer = pa_ipc.new_stream(self._sink, schema)
        return self._sink.take()

    def batch(self, batch: Any) -> bytes:
        self._writer.write_batch(batch)
        return self._sink.take()

    def finish(self) -> bytes:
        self._writer.close()
        return self._sink.take()


@dataclass(frozen=True, slots=True)
class _Format:
    media_type: str
    extension: str
    encoder: Callable[[], _Encoder] | None  # None: the stored Parquet bytes as they are


_FORMATS: Final[dict[str, _Format]] = {
    "parquet": _Format("application/vnd.apache.parquet", "parquet", None),
    "csv": _Format("text/csv; charset=utf-8", "csv", _CsvEncoder),
    "json": _Format("application/json", "json", lambda: _JsonEncoder(array=True)),
    "ndjson": _Format("application/x-ndjson", "ndjson", lambda: _JsonEncoder(array=False)),
    "arrow": _Format("application/vnd.apache.arrow.stream", "arrows", _ArrowEncoder),
}
assert tuple(_FORMATS) == DOWNLOAD_FORMATS


class _Conversion:
    """Reads a result batch by batch and encodes it; :meth:`next` runs in a worker thread, one call at a time."""

    def __init__(self, result: _ResultFile, encoder: _Encoder) -> None:
        self._result = result
        self._encoder = encoder
        self._batches = self._all_batches()
        self._done = False

    def _all_batches(self) -> Iterator[Any]:
        for index in range(self._result.metadata.num_row_groups):
            yield from self._result.batches(index, self._result.batch_rows(index))

    def start(self) -> bytes:
        return self._encoder.start(self._result.schema)

    def next(self) -> bytes | None:
        """The next non-empty chunk, or ``None`` after the last one."""
        while not self._done:
            batch = next(self._batches, None)
            if batch is None:
                self._done = True
                return self._encoder.finish() or None
            if chunk := self._encoder.batch(batch):
                return chunk
        return None


async def _converted(storage: Storage, key: str, encoder: _Encoder) -> AsyncGenerator[bytes, None]:
    # a download costs the two requests for the footer anew: against a whole file they are nothing, and a footer
    # from the cache that turned out stale could only fail after the first bytes were sent
    result = await _open(storage, key, cached=False)
    pending: asyncio.Future[bytes | None] | None = None
    try:
        conversion = _Conversion(result, encoder)
        header = await _wait_uncancellable(asyncio.ensure_future(asyncio.to_thread(conversion.start)))
        # one chunk ahead: the next is converted while this one is sent, and no further
        pending = asyncio.ensure_future(asyncio.to_thread(conversion.next))
        if header:
            yield header
        while True:
            chunk = await asyncio.shield(pending)
            if chunk is None:
                break
            pending = asyncio.ensure_future(asyncio.to_thread(conversion.next))
            yield chunk
    finally:
        try:
            if pending is not None and not pending.done():
                # a thread cannot be stopped: let the chunk in hand finish before the file is closed under it
                with contextlib.suppress(Exception):
                    await _wait_uncancellable(pending)
            elif pending is not None and not pending.cancelled():
                pending.exception()  # seen, so that a failure nobody waited for is not logged as never retrieved
        finally:
            await _close(result)


async def _stored(storage: Storage, key: str) -> AsyncGenerator[bytes, None]:
    async with contextlib.aclosing(storage.read_chunks(key)) as chunks:
        async for chunk in chunks:
            yield chunk


_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")


def _filename(stem: str, extension: str) -> str:
    safe = _UNSAFE_FILENAME.sub("_", stem).strip("._")[:100] or "result"
    return f"{safe}.{extension}"


def download(storage: Storage, key: str, fmt: str, *, filename_stem: str) -> Download:
    """The result at ``key`` as a download in ``fmt`` (one of :data:`DOWNLOAD_FORMATS`), streamed.

    :class:`UnsupportedFormat` for any other format (raised here, before anything is read). ``filename_stem`` names
    the file; characters outside ``[A-Za-z0-9._-]`` become ``_``.
    """
    spec = _FORMATS.get(fmt)
    if spec is None:
        raise UnsupportedFormat(
            f"Unsupported download format {fmt[:40]!r}; use one of: {', '.join(DOWNLOAD_FORMATS)}.",
            details=[{"parameter": "format", "supported": list(DOWNLOAD_FORMATS)}],
        )
    body = _stored(storage, key) if spec.encoder is None else _converted(storage, key, spec.encoder())
    return Download(media_type=spec.media_type, filename=_filename(filename_stem, spec.extension), body=body)


def warm_up() -> None:
    """Pay pyarrow's one-time costs at start-up (its first compute call imports pandas, ~0.9 s here), not in the
    first user's request. Blocking: call it in a thread."""
    pc.utf8_length(pa.array(["warm"]))
