"""Results on real Parquet files, local and on a moto S3 server: pages, page tokens and every download format.

Values are checked against what the datasets service shows for the same file (DuckDB reads it,
``strata.common.jsonvalues.json_value`` renders it), so both services show a result the same way.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import logging
import math
import os
import random
import re
import threading
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import boto3
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.ipc as pa_ipc
import pyarrow.parquet as pq
import pytest

from strata.common.errors import BadRequest
from strata.common.jsonvalues import json_value
from strata.common.storage import Storage
from strata.datasets import engine as datasets_engine
from strata.execution import results
from strata.execution.results import (
    DOWNLOAD_FORMATS,
    InvalidPageToken,
    UnsupportedFormat,
    download,
    make_page_token,
    parquet_schema_columns,
    read_page,
    read_page_token,
)

KEY = "results/job-1/result.parquet"
N_ROWS = 2_500
ROW_GROUP_ROWS = 400  # seven row groups, the last one short
TEXTS = [
    "plain",
    "comma, here",
    'quote " inside',
    "new\nline",
    "crlf\r\nline",
    "unicode ü → 😀",
    "",
    "ctrl\x01char",
    "back\\slash",
    " padded ",
]


# --- data -------------------------------------------------------------------------------------------------------------


class Typed(NamedTuple):
    """The many-types result under ``root``, and the columns and rows the datasets service shows for it."""

    root: Path
    columns: list[dict[str, Any]]
    rows: list[list[Any]]


def typed_table(n: int = N_ROWS) -> pa.Table:
    """Many column types, with nulls, NaN and infinities, awkward text and nested values."""
    rnd = random.Random(7)
    base = datetime(2024, 1, 1, 12, 0)  # noqa: DTZ001 (a naive TIMESTAMP column; the aware ones get UTC)

    def ratio(i: int) -> float | None:
        if i % 23 == 0:
            return None
        if i % 13 == 0:
            return math.nan
        if i % 17 == 0:
            return math.inf
        if i % 19 == 0:
            return -math.inf
        return i / 7

    columns: dict[str, pa.Array] = {
        "id": pa.array(range(n), pa.int64()),
        "small": pa.array([None if i % 11 == 0 else (i % 500) - 250 for i in range(n)], pa.int16()),
        "ratio": pa.array([ratio(i) for i in range(n)], pa.float64()),
        "f32": pa.array([i / 10 for i in range(n)], pa.float32()),
        "price": pa.array(
            [None if i % 29 == 0 else Decimal(i * 37 % 100_000 - 50_000) / 100 for i in range(n)], pa.decimal128(12, 2)
        ),
        "label": pa.array([None if i % 31 == 0 else TEXTS[i % len(TEXTS)] for i in range(n)], pa.string()),
        "flag": pa.array([None if i % 5 == 0 else i % 2 == 0 for i in range(n)], pa.bool_()),
        "day": pa.array([date(2020, 1, 1) + timedelta(days=i) for i in range(n)], pa.date32()),
        "at": pa.array(
            [base + timedelta(seconds=i * 3601, microseconds=0 if i % 3 else i) for i in range(n)], pa.timestamp("us")
        ),
        "at_tz": pa.array(
            [None if i % 7 == 0 else (base + timedelta(minutes=i)).replace(tzinfo=UTC) for i in range(n)],
            pa.timestamp("us", tz="UTC"),
        ),
        "at_ms": pa.array(
            [(base + timedelta(milliseconds=i * 1001)).replace(tzinfo=UTC) for i in range(n)],
            pa.timestamp("ms", tz="Europe/Berlin"),
        ),
        "clock": pa.array([dt_time(i % 24, i % 60, i % 60, (i * 999) % 1_000_000) for i in range(n)], pa.time64("us")),
        "raw": pa.array([None if i % 9 == 0 else bytes([i % 256, 0, 255]) * (i % 3) for i in range(n)], pa.binary()),
        "tags": pa.array(
            [
                None if i % 8 == 0 else [TEXTS[(i + k) % len(TEXTS)] if k % 3 else None for k in range(i % 4)]
                for i in range(n)
            ],
            pa.list_(pa.string()),
        ),
        "point": pa.array(
            [None if i % 6 == 0 else {"x": i / 4, "label": f"p{i}"} for i in range(n)],
            pa.struct([("x", pa.float64()), ("label", pa.string())]),
        ),
        "attrs": pa.array(
            [None if i % 10 == 0 else [(f"k{k}", None if k == 1 else i * k) for k in range(i % 3)] for i in range(n)],
            pa.map_(pa.string(), pa.int64()),
        ),
        "uid": pa.array(
            [None if i % 4 == 0 else uuid.UUID(int=rnd.getrandbits(128)).bytes for i in range(n)], pa.uuid()
        ),
    }
    fields = [pa.field(name, array.type, nullable=name != "id") for name, array in columns.items()]
    return pa.Table.from_arrays(list(columns.values()), schema=pa.schema(fields))


def write_parquet(table: pa.Table, path: Path, row_group_rows: int = ROW_GROUP_ROWS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_rows)
    return path


def datasets_view(path: Path) -> tuple[list[dict[str, Any]], list[list[Any]]]:
    """The columns and rows the datasets service would show for this Parquet file."""
    con = datasets_engine.connect(threads=1)
    try:
        cur = con.cursor()
        columns = [{"name": c.name, "type": c.type, "nullable": c.nullable} for c in datasets_engine.schema(cur, path)]
        fetched = cur.execute("SELECT * FROM read_parquet(?)", [str(path)]).fetchall()
        cur.close()
    finally:
        con.close()
    return columns, [[json_value(v) for v in row] for row in fetched]


def as_objects(names: list[str], rows: list[list[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(names, row, strict=True)) for row in rows]


async def collect(body: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in body])


@pytest.fixture(scope="module")
def typed(tmp_path_factory: pytest.TempPathFactory) -> Typed:
    root = tmp_path_factory.mktemp("typed")
    path = write_parquet(typed_table(), root / KEY)
    return Typed(root, *datasets_view(path))


@pytest.fixture
def local(typed: Typed) -> Storage:
    return Storage.from_url(typed.root.as_uri())


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2M rows (~27 MB on disk, ~67 MB decoded, ~136 MB as CSV) in DuckDB's row groups of 122,880 rows."""
    root = tmp_path_factory.mktemp("big")
    path = root / "results" / "big" / "result.parquet"
    path.parent.mkdir(parents=True)
    con = datasets_engine.connect(threads=2)
    try:
        con.execute(
            "COPY (SELECT i AS id, i * 0.5 AS amount, 'customer-' || (i % 1000)::VARCHAR || ', \"vip\"' AS name, "
            "TIMESTAMP '2024-01-01' + to_microseconds(i) AS at FROM range(2000000) t(i)) TO ? (FORMAT parquet)",
            [str(path)],
        )
    finally:
        con.close()
    return root


# --- column types -----------------------------------------------------------------------------------------------------


def test_columns_are_described_as_the_datasets_service_describes_them(
    typed: Typed,
) -> None:
    root, columns, _ = typed
    assert parquet_schema_columns(root / KEY) == columns
    assert columns[0] == {"name": "id", "type": "BIGINT", "nullable": False}


def test_type_names_match_duckdb_for_many_arrow_types(tmp_path: Path) -> None:
    types = {
        "i8": pa.int8(),
        "u16": pa.uint16(),
        "u32": pa.uint32(),
        "u64": pa.uint64(),
        "half": pa.float16(),
        "large_text": pa.large_string(),
        "view": pa.string_view(),
        "large_bytes": pa.large_binary(),
        "fixed": pa.binary(3),
        "d64": pa.date64(),
        "t_ms": pa.time32("ms"),
        "t_ns": pa.time64("ns"),
        "ts_ns": pa.timestamp("ns"),
        "tz_ns": pa.timestamp("ns", tz="Europe/Paris"),
        "tz_off": pa.timestamp("ms", tz="+01:00"),
        "dec38": pa.decimal128(38, 10),
        "dec32": pa.decimal32(9, 2),
        "fixed_list": pa.list_(pa.float32(), 3),
        "large_list": pa.large_list(pa.string()),
        "odd_struct": pa.struct([("a", pa.int32()), ("b c", pa.string()), ("Sel", pa.int8()), ("select", pa.bool_())]),
        "dict": pa.dictionary(pa.int32(), pa.string()),
        "json": pa.json_(),
        "nested": pa.list_(pa.struct([("x", pa.map_(pa.int32(), pa.list_(pa.date32())))])),
        # ours differ from DuckDB's on purpose (see duckdb_type_name)
        "wide_dec": pa.decimal256(50, 5),
        "span": pa.duration("us"),
    }
    path = tmp_path / "types.parquet"
    pq.write_table(pa.table({name: pa.array([None], t) for name, t in types.items()}), path)
    ours = {c["name"]: c["type"] for c in parquet_schema_columns(path)}
    duck = {c["name"]: c["type"] for c in datasets_view(path)[0]}
    assert {n: ours[n] for n in types if ours[n] != duck[n]} == {"wide_dec": "DECIMAL(50,5)", "span": "INTERVAL"}
    assert ours["odd_struct"] == 'STRUCT(a INTEGER, "b c" VARCHAR, Sel TINYINT, "select" BOOLEAN)'
    assert ours["tz_ns"] == "TIMESTAMPTZ_NS"
    assert results.duckdb_type_name(pa.null()) == "NULL"


# --- pages ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "limit"),
    [(0, 10), (395, 10), (399, 1), (400, 400), (390, 1300), (2490, 50), (0, N_ROWS), (1234, 1)],
)
async def test_a_page_is_the_slice_of_the_whole_result(local: Storage, typed: Typed, offset: int, limit: int) -> None:
    _, columns, rows = typed
    page = await read_page(local, KEY, offset=offset, limit=limit)
    assert page.columns == columns
    assert page.rows == rows[offset : offset + limit]
    assert (page.offset, page.total_rows) == (offset, N_ROWS)
    assert page.next_offset == (offset + limit if offset + limit < N_ROWS else None)
    json.dumps(page.rows, allow_nan=False)  # JSON-safe as it is


async def test_walking_every_page_gives_the_whole_result(local: Storage, typed: Typed) -> None:
    seen: list[list[Any]] = []
    offset: int | None = 0
    while offset is not None:
        page = await read_page(local, KEY, offset=offset, limit=333)
        seen.extend(page.rows)
        offset = page.next_offset
    assert seen == typed.rows


async def test_values_follow_the_datasets_conventions(local: Storage) -> None:
    page = await read_page(local, KEY, offset=0, limit=40)
    by_name = [dict(zip([c["name"] for c in page.columns], row, strict=True)) for row in page.rows]
    first, nan_row, inf_row = by_name[1], by_name[13], by_name[17]
    assert (nan_row["ratio"], inf_row["ratio"], by_name[19]["ratio"], by_name[23]["ratio"]) == (None, None, None, None)
    assert first["price"] == "-499.63" and isinstance(first["price"], str)
    assert (first["at"], by_name[3]["at"]) == ("2024-01-01T13:00:01", "2024-01-01T15:00:03.000003")
    assert first["at_tz"] == "2024-01-01T12:01:00+00:00"
    assert first["at_ms"] == "2024-01-01T12:00:01.001000+00:00"
    assert first["raw"] == base64.b64encode(bytes([1, 0, 255])).decode()
    assert first["attrs"] == {"k0": 0}
    assert by_name[2]["attrs"] == {"k0": 0, "k1": None}
    assert first["point"] == {"x": 0.25, "label": "p1"}
    assert by_name[3]["tags"] == [None, "crlf\r\nline", "unicode ü → 😀"]
    assert by_name[5]["label"] == "unicode ü → 😀"


async def test_nanoseconds_and_other_values_python_cannot_hold(tmp_path: Path) -> None:
    storage = Storage.from_url(tmp_path.as_uri())
    table = pa.table(
        {
            "ns": pa.array([1_700_000_000_123_456_789, 1_700_000_000_123_456_000, 0, None], pa.timestamp("ns")),
            "ns_tz": pa.array([1_700_000_000_000_000_001, 5, 1_000, None], pa.timestamp("ns", tz="Asia/Tokyo")),
            "t_ns": pa.array([3_723_000_000_001, 3_723_000_000_000, 0, None], pa.time64("ns")),
            "span": pa.array([timedelta(days=1, seconds=1.5), timedelta(seconds=-2), timedelta(0), None]),
            "half": pa.array([1.5, float("nan"), None, -0.0], pa.float16()),
            "dict": pa.array(["a", "b", None, "a"]).dictionary_encode(),
            # Arrow alone writes these 0E-10 and 1.000E-7
            "dec": pa.array([Decimal(0), Decimal("0.0000001"), Decimal("-12.5"), None], pa.decimal128(38, 10)),
        }
    )
    write_parquet(table, tmp_path / KEY)
    page = await read_page(storage, KEY, offset=0, limit=10)
    names = [c["name"] for c in page.columns]
    assert {name: [row[i] for row in page.rows] for i, name in enumerate(names)} == {
        "ns": ["2023-11-14T22:13:20.123456789", "2023-11-14T22:13:20.123456", "1970-01-01T00:00:00", None],
        "ns_tz": [
            "2023-11-14T22:13:20.000000001+00:00",
            "1970-01-01T00:00:00.000000005+00:00",
            "1970-01-01T00:00:00.000001+00:00",
            None,
        ],
        "t_ns": ["01:02:03.000000001", "01:02:03", "00:00:00", None],
        "span": ["P1DT1.5S", "-P0DT2S", "P0DT0S", None],
        "half": [1.5, None, None, -0.0],
        "dict": ["a", "b", None, "a"],
        "dec": ["0.0000000000", "0.0000001000", "-12.5000000000", None],
    }
    body = await collect(download(storage, KEY, "json", filename_stem="x").body)
    assert json.loads(body) == as_objects(names, page.rows)
    text = (await collect(download(storage, KEY, "csv", filename_stem="x").body)).decode()
    assert [row[-1] for row in csv.reader(io.StringIO(text, newline=""))] == ["dec", *(v[-1] or "" for v in page.rows)]


async def test_an_offset_past_the_end_gives_an_empty_last_page(local: Storage) -> None:
    for offset in (N_ROWS, N_ROWS + 1, 10**12):
        page = await read_page(local, KEY, offset=offset, limit=50)
        assert (page.rows, page.total_rows, page.next_offset, page.offset) == ([], N_ROWS, None, offset)
        assert len(page.columns) == 17
    last = await read_page(local, KEY, offset=N_ROWS - 5, limit=50)
    assert (len(last.rows), last.next_offset) == (5, None)
    exact = await read_page(local, KEY, offset=N_ROWS - 50, limit=50)
    assert (len(exact.rows), exact.next_offset) == (50, None)


async def test_page_arguments_are_checked(local: Storage) -> None:
    with pytest.raises(ValueError, match="offset"):
        await read_page(local, KEY, offset=-1, limit=10)
    with pytest.raises(ValueError, match="limit"):
        await read_page(local, KEY, offset=0, limit=0)


async def test_an_empty_result_has_its_columns_and_no_rows(tmp_path: Path) -> None:
    storage = Storage.from_url(tmp_path.as_uri())
    empty = typed_table().slice(0, 0)
    write_parquet(empty, tmp_path / KEY)
    page = await read_page(storage, KEY, offset=0, limit=100)
    assert (page.rows, page.total_rows, page.next_offset) == ([], 0, None)
    assert page.columns == datasets_view(tmp_path / KEY)[0]

    bodies = {fmt: await collect(download(storage, KEY, fmt, filename_stem="e").body) for fmt in DOWNLOAD_FORMATS}
    assert bodies["csv"] == (",".join(f'"{name}"' for name in empty.column_names) + "\r\n").encode()
    assert json.loads(bodies["json"]) == []
    assert bodies["ndjson"] == b""
    arrow = pa_ipc.open_stream(bodies["arrow"]).read_all()
    assert (arrow.num_rows, arrow.schema) == (0, empty.schema)
    assert bodies["parquet"] == (tmp_path / KEY).read_bytes()


async def test_a_missing_result_is_file_not_found(local: Storage) -> None:
    with pytest.raises(FileNotFoundError):
        await read_page(local, "results/nope/result.parquet", offset=0, limit=1)
    for fmt in ("csv", "parquet"):
        with pytest.raises(FileNotFoundError):
            await collect(download(local, "results/nope/result.parquet", fmt, filename_stem="x").body)


# --- page tokens ------------------------------------------------------------------------------------------------------


def test_page_tokens_round_trip_and_are_url_safe() -> None:
    for offset in (0, 1, 400, 10**12, 2**63 - 1):
        token = make_page_token("job-1", "s3cret", offset)
        assert re.fullmatch(r"[A-Za-z0-9_-]+", token), token
        assert read_page_token(token, "job-1", "s3cret") == offset
    assert make_page_token("job-1", "s3cret", 5) != make_page_token("job-2", "s3cret", 5)


def test_a_page_token_is_refused_for_another_job_or_when_tampered_with() -> None:
    token = make_page_token("job-1", "s3cret", 400)
    middle = len(token) // 2
    tampered = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    forged_negative = results._sign_token("job-1", "s3cret", -400)
    cases = {
        "other job": (token, "job-2", "s3cret"),
        "other secret": (token, "job-1", "other"),
        "tampered": (tampered, "job-1", "s3cret"),
        "truncated": (token[:-2], "job-1", "s3cret"),
        "extended": (token + "AAAA", "job-1", "s3cret"),
        "empty": ("", "job-1", "s3cret"),
        "garbage": ("!!not a token!!", "job-1", "s3cret"),
        "padding only": ("====", "job-1", "s3cret"),
        "padded": (token + "==", "job-1", "s3cret"),
        "standard alphabet": ("+" + token[1:], "job-1", "s3cret"),
        "negative offset": (forged_negative, "job-1", "s3cret"),
    }
    for name, (candidate, job_id, secret) in cases.items():
        with pytest.raises(InvalidPageToken) as caught:
            read_page_token(candidate, job_id, secret)
        error = caught.value
        assert isinstance(error, BadRequest), name
        assert (error.status, error.code) == (400, "INVALID_PAGE_TOKEN"), name
        assert "not valid for this job" in error.message, name
    with pytest.raises(ValueError, match="negative"):
        make_page_token("job-1", "s3cret", -1)


# --- downloads --------------------------------------------------------------------------------------------------------


def test_an_unsupported_format_is_refused_with_the_supported_ones() -> None:
    storage = Storage.from_url("file:///nonexistent")
    for fmt in ("xlsx", "CSV", "", "parquet;x"):
        with pytest.raises(UnsupportedFormat) as caught:
            download(storage, KEY, fmt, filename_stem="x")
        error = caught.value
        assert isinstance(error, BadRequest)
        assert (error.status, error.code) == (400, "UNSUPPORTED_FORMAT")
        assert all(f in error.message for f in DOWNLOAD_FORMATS)


def test_download_names_and_media_types() -> None:
    storage = Storage.from_url("file:///nonexistent")
    expected = {
        "parquet": ("application/vnd.apache.parquet", "q_1_sales.parquet"),
        "csv": ("text/csv; charset=utf-8", "q_1_sales.csv"),
        "json": ("application/json", "q_1_sales.json"),
        "ndjson": ("application/x-ndjson", "q_1_sales.ndjson"),
        "arrow": ("application/vnd.apache.arrow.stream", "q_1_sales.arrows"),
    }
    for fmt, (media_type, filename) in expected.items():
        d = download(storage, KEY, fmt, filename_stem='q 1/"sales"')
        assert (d.media_type, d.filename) == (media_type, filename)
    assert download(storage, KEY, "csv", filename_stem="../..").filename == "result.csv"


async def test_parquet_download_is_the_stored_file(local: Storage, typed: Typed) -> None:
    body = await collect(download(local, KEY, "parquet", filename_stem="r").body)
    assert body == (typed.root / KEY).read_bytes()


async def test_json_and_ndjson_downloads_hold_what_pages_show(local: Storage, typed: Typed) -> None:
    _, columns, rows = typed
    expected = as_objects([c["name"] for c in columns], rows)
    body = await collect(download(local, KEY, "json", filename_stem="r").body)
    assert json.loads(body) == expected
    lines = (await collect(download(local, KEY, "ndjson", filename_stem="r").body)).decode().split("\n")
    assert lines[-1] == ""
    assert [json.loads(line) for line in lines[:-1]] == expected


async def test_arrow_download_is_the_table(local: Storage, typed: Typed) -> None:
    body = await collect(download(local, KEY, "arrow", filename_stem="r").body)
    reader = pa_ipc.open_stream(body)
    streamed = reader.read_all()
    stored = pq.read_table(typed.root / KEY)
    assert streamed.schema == stored.schema
    for name in stored.column_names:
        assert _nan_safe(streamed.column(name).to_pylist()) == _nan_safe(stored.column(name).to_pylist()), name


async def test_csv_download_reads_back(local: Storage, typed: Typed) -> None:
    root, columns, rows = typed
    body = await collect(download(local, KEY, "csv", filename_stem="r").body)
    stored = pq.read_table(root / KEY)
    names = stored.column_names
    assert body.startswith((",".join(f'"{n}"' for n in names) + "\r\n").encode())

    # Arrow's reader, told the scalar columns' types, gets the same values back (nulls included: an empty field is
    # null, a quoted empty field an empty string)
    scalar = ["id", "small", "ratio", "f32", "price", "label", "flag", "day", "at", "at_tz", "at_ms", "clock"]
    read = pa_csv.read_csv(
        io.BytesIO(body),
        convert_options=pa_csv.ConvertOptions(
            column_types={n: stored.schema.field(n).type for n in scalar},
            null_values=[""],  # so that "nan" is NaN, not one of Arrow's default null spellings
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )
    assert read.num_rows == N_ROWS
    for name in scalar:
        assert _nan_safe(read.column(name).to_pylist()) == _nan_safe(stored.column(name).to_pylist()), name

    # Python's csv module (RFC 4180) agrees; nested values are JSON text, bytes base64, UUIDs text
    parsed = list(csv.reader(io.StringIO(body.decode("utf-8"), newline="")))
    assert parsed[0] == names and len(parsed) == N_ROWS + 1
    by_column = {n: [row[i] for row in parsed[1:]] for i, n in enumerate(names)}
    assert by_column["label"] == ["" if v is None else v for v in stored.column("label").to_pylist()]
    for name in ("tags", "point", "attrs"):
        assert [json.loads(v) if v else None for v in by_column[name]] == _column(columns, rows, name), name
    assert [v or None for v in by_column["raw"]] == [v or None for v in _column(columns, rows, "raw")]
    assert [v or None for v in by_column["uid"]] == _column(columns, rows, "uid")


def _column(columns: list[dict[str, Any]], rows: list[list[Any]], name: str) -> list[Any]:
    index = [c["name"] for c in columns].index(name)
    return [row[index] for row in rows]


def _nan_safe(values: list[Any]) -> list[Any]:
    return ["NaN" if isinstance(v, float) and math.isnan(v) else v for v in values]


# --- streaming: memory and disconnects --------------------------------------------------------------------------------


class ArrowMemorySampler:
    """The highest Arrow allocation seen while it runs (sampled every millisecond from a thread)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, pa.total_allocated_bytes())
            time.sleep(0.001)

    def __enter__(self) -> ArrowMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def test_a_large_download_streams_in_flat_memory(big: Path) -> None:
    storage = Storage.from_url(big.as_uri())
    key = "results/big/result.parquet"
    metadata = pq.read_metadata(big / key)
    decoded = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    baseline = pa.total_allocated_bytes()
    lines = chunks = largest = total = 0
    tracemalloc.start()
    try:
        with ArrowMemorySampler() as arrow:
            async for chunk in download(storage, key, "csv", filename_stem="big").body:
                chunks += 1
                total += len(chunk)
                largest = max(largest, len(chunk))
                lines += chunk.count(b"\r\n")
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines == 2_000_001
    assert total > 120e6 and decoded > 60e6
    # what is held at once is a few batches' worth, not the result: chunks of a few MB, and at the peak (measured
    # ~14 MB in Arrow and ~13 MB in Python) a fraction of the ~67 MB decoded and ~136 MB of CSV
    assert chunks > 30 and largest < 8e6
    assert arrow.peak - baseline < 48e6, arrow.peak - baseline
    assert python_peak < 32e6, python_peak


def _open_paths() -> set[str]:
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        with_path = os.path.join("/proc/self/fd", fd)
        try:
            paths.add(os.readlink(with_path))
        except OSError:
            continue
    return paths


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see open files")
@pytest.mark.parametrize("fmt", ["csv", "json", "arrow", "parquet"])
async def test_closing_the_body_stops_the_work_and_closes_the_file(big: Path, fmt: str) -> None:
    storage = Storage.from_url(big.as_uri())
    path = str(big / "results/big/result.parquet")
    body = download(storage, "results/big/result.parquet", fmt, filename_stem="big").body
    first = await anext(body)
    assert first and path in _open_paths()
    started = time.monotonic()
    await body.aclose()
    # the conversion of the chunk in hand finishes (a thread cannot be interrupted), nothing after it
    assert time.monotonic() - started < 5
    assert path not in _open_paths()
    with pytest.raises(StopAsyncIteration):
        await anext(body)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see open files")
async def test_cancelling_the_reader_stops_the_work_and_closes_the_file(big: Path) -> None:
    storage = Storage.from_url(big.as_uri())
    path = str(big / "results/big/result.parquet")
    got_one = asyncio.Event()
    received = 0

    async def slow_client() -> None:
        nonlocal received
        body = download(storage, "results/big/result.parquet", "ndjson", filename_stem="big").body
        try:
            async for chunk in body:
                received += len(chunk)
                got_one.set()
                await asyncio.sleep(10)  # the client stops reading: the producer must not run ahead
        finally:
            await body.aclose()

    task = asyncio.create_task(slow_client())
    await asyncio.wait_for(got_one.wait(), 30)
    await asyncio.sleep(0.3)  # the one chunk converted ahead is ready by now
    # while the client does not read, nothing works: a producer running ahead would keep a core busy
    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.sleep(0.5)
    assert time.process_time() - cpu < 0.4 * (time.monotonic() - wall)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert path not in _open_paths()
    assert 0 < received < 20e6


# --- S3 ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
async def s3(s3_server: str, typed: Typed) -> AsyncIterator[Storage]:
    bucket = f"results-{uuid.uuid4().hex[:10]}"
    client = boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    )
    client.create_bucket(Bucket=bucket)
    storage = Storage.from_url(
        f"s3://{bucket}/strata", s3_endpoint_url=s3_server, s3_region="us-east-1", s3_key="test", s3_secret="test"
    )
    async with storage.writer(KEY) as out:
        await out.write((typed.root / KEY).read_bytes())
    yield storage
    await storage.close()


def _s3_requests(records: list[logging.LogRecord]) -> tuple[int, list[tuple[int, int]]]:
    """HEAD requests and the byte ranges of the GETs, in s3fs's debug log."""
    heads = sum(1 for r in records if r.getMessage().startswith("CALL: head_object"))
    fetches: list[Any] = [r.args for r in records if r.msg == "Fetch: %s/%s, %s-%s"]
    return heads, [(int(args[2]), int(args[3])) for args in fetches]


def _row_group_span(metadata: pq.FileMetaData, index: int) -> tuple[int, int]:
    """Where a row group's column chunks lie in the file: ``(start, end)``."""
    group = metadata.row_group(index)
    chunks = [group.column(i) for i in range(group.num_columns)]
    starts = [c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in chunks]
    return min(starts), max(start + c.total_compressed_size for start, c in zip(starts, chunks, strict=True))


async def test_pages_from_s3_read_only_the_row_groups_they_need(
    s3: Storage, typed: Typed, caplog: pytest.LogCaptureFixture
) -> None:
    root, columns, rows = typed
    size = await s3.size(KEY)
    metadata = pq.read_metadata(root / KEY)
    caplog.set_level(logging.DEBUG, logger="s3fs")

    page = await read_page(s3, KEY, offset=790, limit=20)  # the end of row group 1, the start of row group 2
    assert (page.columns, page.rows, page.next_offset) == (columns, rows[790:810], 810)
    heads, ranges = _s3_requests(caplog.records)
    # the object's size, its last 64 KiB (the footer), then one ranged GET per row group the page needs
    assert heads == 1, caplog.text
    assert ranges == [(size - 65_536, size), _row_group_span(metadata, 1), _row_group_span(metadata, 2)]

    caplog.clear()
    page = await read_page(s3, KEY, offset=1210, limit=5)
    assert page.rows == rows[1210:1215]
    heads, ranges = _s3_requests(caplog.records)
    # the footer came from the cache
    assert (heads, ranges) == (0, [_row_group_span(metadata, 3)]), caplog.text

    empty = await read_page(s3, KEY, offset=N_ROWS, limit=5)
    assert (empty.rows, empty.total_rows, empty.next_offset) == ([], N_ROWS, None)


async def test_downloads_from_s3_match_the_local_ones(s3: Storage, local: Storage) -> None:
    for fmt in ("csv", "parquet"):
        remote = await collect(download(s3, KEY, fmt, filename_stem="r").body)
        assert remote == await collect(download(local, KEY, fmt, filename_stem="r").body), fmt
    with pytest.raises(FileNotFoundError):
        await read_page(s3, "results/nope/result.parquet", offset=0, limit=1)


async def test_a_replaced_or_deleted_s3_result_is_not_served_from_the_footer_cache(s3: Storage) -> None:
    first = await read_page(s3, KEY, offset=0, limit=1)
    assert first.total_rows == N_ROWS
    replacement = io.BytesIO()
    pq.write_table(pa.table({"answer": [42, 43]}), replacement)
    async with s3.writer(KEY) as out:
        await out.write(replacement.getvalue())
    page = await read_page(s3, KEY, offset=0, limit=10)
    assert (page.columns, page.rows, page.total_rows) == (
        [{"name": "answer", "type": "BIGINT", "nullable": True}],
        [[42], [43]],
        2,
    )
    await s3.delete(KEY)
    with pytest.raises(FileNotFoundError):
        await read_page(s3, KEY, offset=0, limit=1)
