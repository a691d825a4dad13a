"""The streamed multipart parser: what reaches storage, and that a bad upload leaves nothing behind."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from strata.common.errors import StrataError
from strata.datasets.upload import receive

BOUNDARY = "strataBoundary7MA4YWxkTrZu0gW"


def multipart(*parts: tuple[str, str | None, bytes]) -> bytes:
    out = bytearray()
    for name, filename, data in parts:
        out += f"--{BOUNDARY}\r\n".encode()
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"Content-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + data + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


class Store:
    """Records what a storage writer would commit; an exception inside the writer discards the object."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.discarded: list[str] = []

    @asynccontextmanager
    async def writer(self, key: str) -> AsyncIterator[Any]:
        buffer = bytearray()

        class W:
            async def write(self, chunk: bytes) -> None:
                buffer.extend(chunk)

        try:
            yield W()
        except BaseException:
            self.discarded.append(key)
            raise
        self.objects[key] = bytes(buffer)


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def run(body: bytes, store: Store, *, chunk: int = 1000, max_bytes: int = 10**9, ctype: str | None = None):  # type: ignore[no-untyped-def]
    return await receive(
        content_type=ctype or f"multipart/form-data; boundary={BOUNDARY}",
        body=chunks(body, chunk),
        open_writer=store.writer,
        key_for=lambda fmt: f"datasets/d1/v1/original.{fmt}",
        max_bytes=max_bytes,
    )


CSV = b"agent,region,rating\n" + b"".join(f"a{i},eu,{i % 5}\n".encode() for i in range(5000))


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 20])
async def test_fields_and_file_reach_storage_whole(chunk: int) -> None:
    store = Store()
    body = multipart(("name", None, b"Support calls"), ("description", None, b"q3"), ("file", "calls.csv", CSV))
    got = await run(body, store, chunk=chunk)
    assert got.fields == {"name": "Support calls", "description": "q3"}
    assert (got.filename, got.format, got.size) == ("calls.csv", "csv", len(CSV))
    assert got.sha256 == hashlib.sha256(CSV).hexdigest()
    assert store.objects == {"datasets/d1/v1/original.csv": CSV}


async def test_format_field_before_the_file_wins_over_the_extension() -> None:
    store = Store()
    got = await run(multipart(("format", None, b"tsv"), ("file", "export.txt", b"a\tb\n1\t2\n")), store)
    assert got.format == "tsv"


@pytest.mark.parametrize(
    "parts, code",
    [
        ((("file", "big.csv", CSV),), "FILE_TOO_LARGE"),
        ((("file", "empty.csv", b""),), "EMPTY_FILE"),
        ((("name", None, b"x"),), "BAD_REQUEST"),
        ((("file", "bin.csv", b"\x00\x01\x02binary" * 10),), "CONTENT_DOES_NOT_MATCH_FORMAT"),
        ((("file", "fake.parquet", b"not parquet at all"),), "CONTENT_DOES_NOT_MATCH_FORMAT"),
        ((("file", "fake.xlsx", b"<html>"),), "CONTENT_DOES_NOT_MATCH_FORMAT"),
        ((("file", "obj.json", b'{"a": 1}'),), "CONTENT_DOES_NOT_MATCH_FORMAT"),
        ((("file", "../../etc/passwd.csv", b"a\n1\n"),), "INVALID_FILENAME"),
        ((("file", "a\x00b.csv", b"a\n1\n"),), "INVALID_FILENAME"),
        ((("file", "data.exe", b"a\n1\n"),), "UNSUPPORTED_FORMAT"),
        ((("format", None, b"sql"), ("file", "x.csv", b"a\n1\n")), "UNSUPPORTED_FORMAT"),
        ((("file", "a.csv", b"a\n1\n"), ("file", "b.csv", b"a\n1\n")), "BAD_REQUEST"),
        ((("name", None, b"x" * 70_000), ("file", "a.csv", b"a\n1\n")), "BAD_REQUEST"),
    ],
)
async def test_bad_uploads_are_refused_and_leave_nothing(parts: Any, code: str) -> None:
    store = Store()
    with pytest.raises(StrataError) as err:
        await run(multipart(*parts), store, max_bytes=len(CSV) - 1)
    assert err.value.code == code
    assert err.value.status in (400, 413, 415)
    assert store.objects == {}


async def test_not_multipart_and_malformed_bodies() -> None:
    store = Store()
    with pytest.raises(StrataError) as err:
        await run(b"{}", store, ctype="application/json")
    assert err.value.status == 415
    with pytest.raises(StrataError) as err:
        await run(b"--" + BOUNDARY.encode() + b"\r\ngarbage without headers end", store)
    assert err.value.status == 400 and store.objects == {}


async def test_a_client_that_disconnects_leaves_nothing() -> None:
    store = Store()

    async def cut_off() -> AsyncIterator[bytes]:
        body = multipart(("file", "calls.csv", CSV))
        yield body[: len(body) // 2]
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await receive(
            content_type=f"multipart/form-data; boundary={BOUNDARY}",
            body=cut_off(),
            open_writer=store.writer,
            key_for=lambda fmt: "k",
            max_bytes=10**9,
        )
    assert store.objects == {} and store.discarded == ["k"]
