"""Object storage: every behaviour on a local folder and on a real S3 API (moto's server, a fresh bucket per test)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import duckdb
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from strata.common.errors import StrataError
from strata.common.storage import (
    MIN_PART_SIZE,
    FileStorage,
    PresignedUrlsUnsupported,
    S3Storage,
    Storage,
    default_storage_url,
)

MiB = 1 << 20


@dataclass
class Backend:
    """A storage under test plus a way to look behind its back at what is really stored."""

    kind: str
    storage: Storage
    root: Path | None = None  # file
    s3: Any = None  # boto3 client (S3)
    bucket: str = ""

    def stored(self) -> list[str]:
        """Every file under the root (temporary ones too) / every object in the bucket."""
        if self.root is not None:
            return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def pending_uploads(self) -> list[str]:
        """S3 multipart uploads not completed nor aborted (they cost money and are invisible to listings)."""
        if self.s3 is None:
            return []
        return [u["Key"] for u in self.s3.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])]


@pytest.fixture(scope="module")
def s3_client(s3_server: str) -> Iterator[Any]:
    client = boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    )
    yield client
    client.close()


@pytest.fixture
async def file_backend(tmp_path: Path) -> AsyncIterator[Backend]:
    root = tmp_path / "storage"
    storage = Storage.from_url(root.as_uri())
    yield Backend("file", storage, root=root)
    await storage.close()


@pytest.fixture
async def s3_backend(s3_server: str, s3_client: Any) -> AsyncIterator[Backend]:
    bucket = f"strata-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=bucket)
    storage = Storage.from_url(
        f"s3://{bucket}/strata", s3_endpoint_url=s3_server, s3_region="us-east-1", s3_key="test", s3_secret="test"
    )
    assert isinstance(storage, S3Storage)
    storage.part_size = MIN_PART_SIZE  # several parts without huge test objects
    yield Backend("s3", storage, s3=s3_client, bucket=bucket)
    await storage.close()


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest) -> Backend:
    found: Backend = request.getfixturevalue(f"{request.param}_backend")
    return found


async def write_in_chunks(storage: Storage, key: str, data: bytes, sizes: list[int]) -> int:
    """Write ``data`` in chunks cycling through ``sizes`` (as bytes, bytearray and memoryview); returns the count."""
    async with storage.writer(key) as out:
        pos, i = 0, 0
        while pos < len(data):
            piece = data[pos : pos + sizes[i % len(sizes)]]
            chunk: bytes | bytearray | memoryview = (piece, bytearray(piece), memoryview(piece))[i % 3]
            await out.write(chunk)
            pos, i = pos + len(piece), i + 1
        assert out.bytes_written == len(data)
    return i


def open_files() -> list[str]:
    """What this process has open (Linux)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
    return found


async def read_all(storage: Storage, key: str, chunk_size: int = MiB) -> tuple[bytes, list[int]]:
    chunks = [chunk async for chunk in storage.read_chunks(key, chunk_size)]
    return b"".join(chunks), [len(c) for c in chunks]


# ------------------------------------------------------------------------------------------------ round trips


async def test_multi_mib_object_written_in_many_chunks_reads_back_identical(backend: Backend) -> None:
    storage = backend.storage
    data = random.Random(1).randbytes(23 * MiB + 12345)
    key = "datasets/d1/v1/original.csv"

    n_chunks = await write_in_chunks(storage, key, data, [256 * 1024 + 7, 64 * 1024, MiB, 1])

    assert n_chunks > 40  # of sizes that never line up with parts or read chunks
    assert await storage.size(key) == len(data)
    read, sizes = await read_all(storage, key)
    assert hashlib.sha256(read).hexdigest() == hashlib.sha256(data).hexdigest()
    assert sizes == [MiB] * 23 + [12345]  # full chunks, however the bytes arrived
    small, small_sizes = await read_all(storage, key, chunk_size=100_000)
    assert small == data and small_sizes[:-1] == [100_000] * (len(data) // 100_000)
    if backend.kind == "s3":
        head = backend.s3.head_object(Bucket=backend.bucket, Key=f"strata/{key}")
        assert head["ETag"].endswith('-5"')  # really one multipart upload of 5 parts (5 MiB each, the last shorter)
    assert backend.stored() == ([key] if backend.kind == "file" else [f"strata/{key}"])


async def test_empty_and_small_objects(backend: Backend) -> None:
    storage = backend.storage
    async with storage.writer("results/j0/empty.bin"):
        pass
    async with storage.writer("results/j1/result.parquet") as out:
        await out.write(b"PAR1")
        await out.write(b"")

    assert await storage.size("results/j0/empty.bin") == 0
    assert await read_all(storage, "results/j0/empty.bin") == (b"", [])
    assert await read_all(storage, "results/j1/result.parquet") == (b"PAR1", [4])
    assert backend.pending_uploads() == []


async def test_a_reader_that_stops_early_releases_the_object(backend: Backend) -> None:
    storage = backend.storage
    await write_in_chunks(storage, "big.bin", bytes(6 * MiB), [MiB])

    async def first_chunk() -> bytes:
        async with aclosing(storage.read_chunks("big.bin")) as chunks:
            async for chunk in chunks:
                return chunk
        raise AssertionError("no chunk")

    # more early stops than the S3 client has pooled connections (10): each must give its connection back
    for _ in range(12):
        assert len(await asyncio.wait_for(first_chunk(), 10)) == MiB
    if backend.root is not None:
        assert str(backend.root / "big.bin") not in open_files()


# ----------------------------------------------------------------------------------- atomicity and clean-up


async def test_object_appears_only_when_the_writer_closes(backend: Backend) -> None:
    storage = backend.storage
    key = "datasets/d1/v2/data.parquet"
    await write_in_chunks(storage, key, b"old version", [100])

    async with storage.writer(key) as out:
        for _ in range(12):  # beyond one part: the S3 multipart upload has started
            await out.write(b"n" * MiB)
        assert await storage.size(key) == len(b"old version")
        assert (await read_all(storage, key))[0] == b"old version"
        assert await storage.list() == [key]
        assert not await storage.exists("datasets/d1/v2/other")
        if backend.kind == "s3":
            assert backend.pending_uploads() == [f"strata/{key}"]
        else:
            assert len(backend.stored()) == 2  # the object and a hidden temporary file beside it

    assert await storage.size(key) == 12 * MiB
    assert await storage.list() == [key]
    assert len(backend.stored()) == 1
    assert backend.pending_uploads() == []


async def test_an_exception_inside_the_writer_leaves_nothing(backend: Backend) -> None:
    storage = backend.storage
    await write_in_chunks(storage, "results/keep/result.parquet", b"kept", [100])

    with pytest.raises(RuntimeError, match="upload cut off"):
        async with storage.writer("results/j2/result.parquet") as out:
            for _ in range(12):
                await out.write(b"x" * MiB)
            assert backend.pending_uploads() or len(backend.stored()) == 2  # something to clean up
            raise RuntimeError("upload cut off")

    with pytest.raises(ValueError, match="too large"):
        async with storage.writer("results/keep/result.parquet") as out:  # a failed overwrite keeps the old one
            await out.write(b"y" * (6 * MiB))
            raise ValueError("too large")

    assert not await storage.exists("results/j2/result.parquet")
    assert await storage.list() == ["results/keep/result.parquet"]
    assert (await read_all(storage, "results/keep/result.parquet"))[0] == b"kept"
    assert len(backend.stored()) == 1
    assert backend.pending_uploads() == []


async def test_cancellation_inside_the_writer_leaves_nothing(backend: Backend) -> None:
    storage = backend.storage
    written = asyncio.Event()

    async def upload() -> None:
        async with storage.writer("datasets/d3/v1/original.xlsx") as out:
            while True:
                await out.write(b"z" * MiB)
                if out.bytes_written >= 12 * MiB:
                    written.set()

    task = asyncio.create_task(upload())
    await asyncio.wait_for(written.wait(), 30)
    assert backend.pending_uploads() or len(backend.stored()) == 1  # an upload in progress: a part or a temp file
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert not await storage.exists("datasets/d3/v1/original.xlsx")
    assert await storage.list() == []
    assert backend.stored() == []
    assert backend.pending_uploads() == []


# ------------------------------------------------------------------------------------------- the other calls


async def test_list_size_exists_delete_and_delete_prefix(backend: Backend) -> None:
    storage = backend.storage
    keys = [
        "datasets/1/v1/data.parquet",
        "datasets/1/v2/data.parquet",
        "datasets/10/v1/data.parquet",
        "results/j/result.parquet",
    ]
    for n, key in enumerate(keys):
        await write_in_chunks(storage, key, b"k" * (n + 1), [10])

    assert await storage.list() == keys
    assert await storage.list("datasets/1") == keys[:2]  # a folder: not datasets/10
    assert await storage.list("datasets/1/") == keys[:2]
    assert await storage.list("datasets/1/v1/data.parquet") == []  # an object is not a folder
    assert await storage.list("nothing") == []
    assert [await storage.size(k) for k in keys] == [1, 2, 3, 4]
    assert await storage.exists("results/j/result.parquet")
    assert not await storage.exists("results/j")  # nor a folder an object
    assert not await storage.exists("results/other")
    with pytest.raises(FileNotFoundError):
        await storage.size("results/other")
    with pytest.raises(FileNotFoundError):
        await read_all(storage, "results/other")

    await storage.delete("results/j/result.parquet")
    await storage.delete("results/j/result.parquet")  # already gone: fine
    assert not await storage.exists("results/j/result.parquet")

    await storage.delete_prefix("datasets/1")
    assert await storage.list() == ["datasets/10/v1/data.parquet"]
    await storage.delete_prefix("datasets/404")  # nothing there: fine
    with pytest.raises(ValueError, match="whole storage"):
        await storage.delete_prefix("")
    with pytest.raises(ValueError, match="whole storage"):
        await storage.delete_prefix("/")
    assert await storage.list() == ["datasets/10/v1/data.parquet"]


async def test_delete_prefix_removes_more_than_one_listing_page(s3_backend: Backend) -> None:
    storage = s3_backend.storage

    # 1001 objects (S3 lists and deletes at most 1000 at a time), made quickly behind the storage's back
    def put(i: int) -> None:
        s3_backend.s3.put_object(Bucket=s3_backend.bucket, Key=f"strata/results/many/{i:04}", Body=b"")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(1001)))
    await write_in_chunks(storage, "results/other/result.parquet", b"x", [1])
    assert len(await storage.list("results/many")) == 1001

    await storage.delete_prefix("results/many")

    assert await storage.list() == ["results/other/result.parquet"]


BAD_KEYS = [
    "",
    "/etc/passwd",
    "../outside",
    "datasets/../../outside",
    "datasets//v1",
    "datasets/v1/",
    "./datasets",
    "datasets/./v1",
    "datasets\\..\\outside",
    "datasets/a\x00b",
    "datasets/a\nb",
    "datasets/.strata-tmp-x",
]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_bad_keys_are_refused_everywhere(backend: Backend, key: str) -> None:
    storage = backend.storage
    with pytest.raises(ValueError):
        async with storage.writer(key) as out:
            await out.write(b"nope")
    with pytest.raises(ValueError):
        await read_all(storage, key)
    for call in (storage.size, storage.exists, storage.delete):
        with pytest.raises(ValueError):
            await call(key)
    for sync_call in (storage.engine_path, storage.display_url, storage.local_path):
        with pytest.raises(ValueError):
            sync_call(key)
    with pytest.raises(ValueError):
        await storage.presigned_get_url(key, 60)
    if key not in ("", "datasets/v1/"):  # as folders these two are fine ("" is the root, a trailing slash is allowed)
        with pytest.raises(ValueError):
            await storage.list(key)
        with pytest.raises(ValueError):
            await storage.delete_prefix(key)
    assert backend.stored() == []
    if backend.root is not None:
        assert [p.name for p in backend.root.parent.iterdir()] in ([], ["storage"])


# ------------------------------------------------------------------------------------------ engines, clients


async def test_duckdb_reads_a_parquet_file_written_through_the_storage(backend: Backend) -> None:
    storage = backend.storage
    table = pa.table({"id": list(range(10_000)), "name": [f"row {i}" for i in range(10_000)]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=2_500)
    data = buffer.getvalue()
    key = "datasets/d9/v1/data.parquet"
    await write_in_chunks(storage, key, data, [64 * 1024])

    def query() -> tuple[Any, ...] | None:
        con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
        try:
            storage.register_with_duckdb(con)
            storage.register_with_duckdb(con)  # twice on one connection is fine
            return con.execute(
                "SELECT count(*), sum(id), max(name) FROM read_parquet(?)", [storage.engine_path(key)]
            ).fetchone()
        finally:
            con.close()

    assert await asyncio.to_thread(query) == (10_000, sum(range(10_000)), "row 9999")


async def test_paths_and_urls_name_the_object_without_credentials(backend: Backend) -> None:
    storage = backend.storage
    key = "datasets/d1/v1/data file.parquet"
    if backend.root is not None:
        assert storage.local_path(key) == backend.root / key
        assert storage.engine_path(key) == str(backend.root / key)
        assert storage.display_url(key) == (backend.root / key).as_uri()
        assert storage.url == backend.root.as_uri()
        assert type(storage.fsspec_filesystem()).__name__ == "LocalFileSystem"
    else:
        assert storage.local_path(key) is None
        assert storage.engine_path(key) == f"s3://{backend.bucket}/strata/{key}"
        assert storage.display_url(key) == f"s3://{backend.bucket}/strata/datasets/d1/v1/data%20file.parquet"
        assert storage.url == f"s3://{backend.bucket}/strata"
        assert "test" not in storage.display_url(key) + storage.url + repr(storage)
        fs = storage.fsspec_filesystem()
        assert fs is storage.fsspec_filesystem() and not fs.asynchronous


async def test_presigned_put_then_get_against_s3(s3_backend: Backend) -> None:
    storage = s3_backend.storage
    data = random.Random(2).randbytes(300_000)
    key = "datasets/d5/v1/original.csv"

    put_url = await storage.presigned_put_url(key, 60)
    get_url = await storage.presigned_get_url(key, 60)
    assert "X-Amz-Signature=" in put_url and "X-Amz-Expires=60" in put_url  # SigV4, not boto3's SigV2 default
    async with httpx.AsyncClient() as client:
        put = await client.put(put_url, content=data)
        assert put.status_code == 200
        assert await storage.size(key) == len(data)
        got = await client.get(get_url)
    assert got.status_code == 200 and got.content == data
    with pytest.raises(ValueError):
        await storage.presigned_get_url(key, 8 * 24 * 3600)


async def test_file_storage_refuses_presigned_urls(file_backend: Backend) -> None:
    with pytest.raises(PresignedUrlsUnsupported) as caught:
        await file_backend.storage.presigned_put_url("datasets/d5/v1/original.csv", 60)
    error = caught.value
    assert isinstance(error, StrataError)
    assert (error.status, error.code) == (409, "PRESIGNED_UNSUPPORTED")
    assert "S3" in error.to_dict()["message"]
    with pytest.raises(PresignedUrlsUnsupported):
        await file_backend.storage.presigned_get_url("datasets/d5/v1/original.csv", 60)


# ------------------------------------------------------------------------------------------------- the URL


def test_from_url_understands_file_and_s3_urls(tmp_path: Path) -> None:
    local = Storage.from_url(f"file://{tmp_path}/a/../store%20room")
    assert isinstance(local, FileStorage) and local.root == tmp_path / "store room"
    assert isinstance(Storage.from_url(f"file://localhost{tmp_path}"), FileStorage)
    assert default_storage_url(tmp_path) == (tmp_path / "storage").as_uri()

    remote = Storage.from_url("s3://bucket-name/some/prefix/", s3_endpoint_url="http://127.0.0.1:1")
    assert isinstance(remote, S3Storage)
    assert (remote.bucket, remote.prefix, remote.url) == ("bucket-name", "some/prefix", "s3://bucket-name/some/prefix")
    assert Storage.from_url("s3://bucket-name").engine_path("k") == "s3://bucket-name/k"


@pytest.mark.parametrize(
    "url",
    [
        "relative/folder",
        "/absolute/but/not/a/url",
        "file:relative",
        "file://host/folder",
        "s3://",
        "s3://key:secret@bucket/prefix",
        "s3://bucket/prefix/../../x",
        "s3://bucket/prefix?region=eu-west-1",
        "gs://bucket/prefix",
    ],
)
def test_from_url_refuses_what_it_cannot_use_safely(url: str) -> None:
    with pytest.raises(ValueError):
        Storage.from_url(url)


def test_from_url_wants_both_s3_credentials_or_neither() -> None:
    with pytest.raises(ValueError, match="both"):
        Storage.from_url("s3://bucket-name", s3_key="key-only")
