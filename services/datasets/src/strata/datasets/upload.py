"""Receiving an upload: a multipart body parsed as it arrives and streamed to storage, hashed on the way.

Nothing is buffered whole: each chunk of the request goes through python-multipart's push parser, and the file
part's bytes go straight to a storage writer. The first bytes are sniffed against the declared format, so a binary
file named ``.csv`` is refused before anything is stored. Over the size limit, on a client that disconnects, or on
any other failure, the writer is abandoned and nothing is left behind.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import unicodedata
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from strata.common.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

FORMATS = ("csv", "tsv", "json", "ndjson", "xlsx", "parquet")
EXTENSIONS = {
    "csv": "csv",
    "tsv": "tsv",
    "tab": "tsv",
    "json": "json",
    "ndjson": "ndjson",
    "jsonl": "ndjson",
    "xlsx": "xlsx",
    "parquet": "parquet",
    "pq": "parquet",
}
TEXT_FORMATS = frozenset({"csv", "tsv", "json", "ndjson"})
MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 20
SNIFF_BYTES = 8192


class EmptyFile(BadRequest):
    code, default_message = "EMPTY_FILE", "The file is empty."


class InvalidFilename(BadRequest):
    code = "INVALID_FILENAME"


class UnknownFormat(UnsupportedMediaType):
    code = "UNSUPPORTED_FORMAT"


class ContentMismatch(UnsupportedMediaType):
    code = "CONTENT_DOES_NOT_MATCH_FORMAT"


class FileTooLarge(PayloadTooLarge):
    code = "FILE_TOO_LARGE"


@dataclass
class ReceivedUpload:
    fields: dict[str, str]
    filename: str
    format: str
    key: str
    size: int
    sha256: str


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


def clean_filename(raw: str) -> str:
    """The file's name as the user may see it again. Paths, parent references and control characters are refused
    rather than quietly rewritten: such a name is a sign of a broken or hostile client."""
    name = unicodedata.normalize("NFC", raw)
    if not name or len(name) > 255:
        raise InvalidFilename("The file name must have 1 to 255 characters.")
    if "\x00" in name or any(unicodedata.category(c) == "Cc" for c in name):
        raise InvalidFilename("The file name contains control characters.")
    if "/" in name or "\\" in name or name in (".", "..") or ".." in name.split("."):
        raise InvalidFilename("The file name must not contain a path.")
    return name


def format_of(filename: str, declared: str | None) -> str:
    if declared:
        if declared not in FORMATS:
            raise UnknownFormat(f"Unknown format {declared!r}; use one of {', '.join(FORMATS)}.")
        return declared
    ext = posixpath.splitext(filename)[1].lstrip(".").lower()
    if ext not in EXTENSIONS:
        raise UnknownFormat(
            f"Cannot tell the format of {filename!r}: name it .csv, .tsv, .json, .ndjson, .xlsx or .parquet, "
            "or send a 'format' field."
        )
    return EXTENSIONS[ext]


def sniff(fmt: str, head: bytes) -> None:
    """Refuse content that cannot be the declared format (before it is stored)."""
    if fmt == "parquet" and not head.startswith(b"PAR1"):
        raise ContentMismatch("This is not a Parquet file (it does not start with PAR1).")
    if fmt == "xlsx" and not head.startswith(b"PK\x03\x04"):
        raise ContentMismatch("This is not an XLSX file (it is not a zip archive).")
    if fmt in TEXT_FORMATS:
        if b"\x00" in head:
            raise ContentMismatch(f"This does not look like {fmt.upper()} text: it contains binary data.")
        if fmt == "json" and head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] not in (b"[", b""):
            raise ContentMismatch("A JSON upload must be an array of objects ('[...]'); use .ndjson for one per line.")


async def receive(
    *,
    content_type: str | None,
    body: AsyncIterator[bytes],
    open_writer: Callable[[str], Any],
    key_for: Callable[[str], str],
    max_bytes: int,
) -> ReceivedUpload:
    """Parse a ``multipart/form-data`` body with one ``file`` part and small text fields.

    ``open_writer(key)`` returns the storage's async writer context manager; ``key_for(format)`` names the object.
    """
    mime, params = parse_options_header(content_type or "")
    if mime != b"multipart/form-data":
        raise UnsupportedMediaType("Send the file as multipart/form-data with a 'file' part.")
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("The multipart body has no boundary.")

    events: list[tuple[str, Any]] = []
    header_field = bytearray()
    header_value = bytearray()

    def on_header_end() -> None:
        events.append(
            ("header", (bytes(header_field).decode("latin-1").lower(), bytes(header_value).decode("utf-8", "replace")))
        )
        header_field.clear()
        header_value.clear()

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": lambda: events.append(("begin", None)),
            "on_header_field": lambda data, start, end: header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: header_value.extend(data[start:end]),
            "on_header_end": on_header_end,
            "on_headers_finished": lambda: events.append(("headers_done", None)),
            "on_part_data": lambda data, start, end: events.append(("data", bytes(data[start:end]))),
            "on_part_end": lambda: events.append(("end", None)),
        },
        max_header_count=16,
    )
    fields: dict[str, str] = {}
    digest = hashlib.sha256()
    size = 0
    upload: ReceivedUpload | None = None
    part: _Part | None = None
    writer: Any = None
    head = bytearray()

    async with AsyncExitStack() as stack:

        async def flush_head() -> None:
            assert upload is not None and writer is not None
            sniff(upload.format, bytes(head))
            await writer.write(bytes(head))
            head.clear()

        # Leaving this block with an exception (too large, malformed, client gone) makes the writer discard the
        # object; returning commits it.
        async for chunk in body:
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise BadRequest(f"The multipart body is malformed: {exc}") from None
            for kind, value in events:
                if kind == "begin":
                    part = _Part()
                elif kind == "header" and part is not None:
                    part.headers[value[0]] = value[1]
                elif kind == "headers_done" and part is not None:
                    disposition, dparams = parse_options_header(part.headers.get("content-disposition", ""))
                    if disposition != b"form-data":
                        raise BadRequest("Every part needs 'Content-Disposition: form-data'.")
                    part.name = dparams.get(b"name", b"").decode("utf-8", "replace")
                    raw_filename = dparams.get(b"filename")
                    if raw_filename is not None:
                        if part.name != "file" or upload is not None:
                            raise BadRequest("Send exactly one file, in the part named 'file'.")
                        filename = clean_filename(raw_filename.decode("utf-8", "replace"))
                        fmt = format_of(filename, fields.get("format"))
                        key = key_for(fmt)
                        upload = ReceivedUpload(fields, filename, fmt, key, 0, "")
                        writer = await stack.enter_async_context(open_writer(key))
                        part.filename = filename
                    elif len(fields) >= MAX_FIELDS:
                        raise BadRequest(f"At most {MAX_FIELDS} form fields.")
                elif kind == "data" and part is not None:
                    if part.filename is not None:
                        size += len(value)
                        if size > max_bytes:
                            raise FileTooLarge(f"The file is larger than the limit of {max_bytes} bytes.")
                        digest.update(value)
                        if len(head) < SNIFF_BYTES and size - len(value) < SNIFF_BYTES:
                            head.extend(value)
                            if len(head) >= SNIFF_BYTES:
                                await flush_head()
                        else:
                            await writer.write(value)
                    else:
                        part.data.extend(value)
                        if len(part.data) > MAX_FIELD_BYTES:
                            raise BadRequest(f"The field {part.name!r} is too long.")
                elif kind == "end" and part is not None:
                    if part.filename is None:
                        fields[part.name] = part.data.decode("utf-8", "replace")
                    part = None
            events.clear()
        parser.finalize()
        if upload is None:
            raise BadRequest("The request has no file: send it in a part named 'file'.")
        if size == 0:
            raise EmptyFile()
        if head:
            await flush_head()
        upload.size, upload.sha256 = size, digest.hexdigest()
        return upload


_NAME_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")


def valid_name(name: str) -> str:
    name = name.strip()
    if not _NAME_RE.match(name):
        raise BadRequest("The dataset name must have 1 to 200 printable characters.")
    return name
