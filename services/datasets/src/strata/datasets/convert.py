"""Turning an upload into a typed Parquet file with DuckDB (XLSX through fastexcel). Synchronous: run in a thread.

Failures raise :class:`IngestFailed` with a readable message and, where there is one, the line and column of the
first bad row, so the user can fix the file.
"""

from __future__ import annotations

import csv
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

MAX_XLSX_EXPANDED_BYTES = 2 * 1024**3
MAX_XLSX_RATIO = 200  # a real sheet compresses ~5-20x; a zip bomb 1000x and more
_LINE = re.compile(r"Line: (\d+)")
_COLUMN = re.compile(r'converting column "([^"]+)"')


_PATHS = re.compile(r'\s*in file "[^"]*"|\s*file = \S+')


@dataclass
class IngestFailed(Exception):
    message: str
    line: int | None = None
    column: str | None = None

    def __post_init__(self) -> None:
        # DuckDB names the server-side file in its errors: the user does not need our paths.
        self.message = _PATHS.sub("", self.message).replace("Invalid Input Error: ", "").strip()

    def to_dict(self) -> dict[str, Any]:
        return {"message": self.message, "line": self.line, "column": self.column}


def connect(threads: int = 2, memory_limit: str = "1GB") -> duckdb.DuckDBPyConnection:
    return duckdb.connect(
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "threads": threads,
            "memory_limit": memory_limit,
            # a COPY that fails mid-way can hang for good with asynchronous writes in flight (docs/pitfalls.md)
            "async_threads": 0,
        }
    )


def _literal(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _copy_sql(select: str, out: Path) -> str:
    return f"COPY ({select}) TO {_literal(out)} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 122880)"


def _delimiter(src: Path, fmt: str, options: dict[str, Any], encoding: str) -> str:
    if options.get("delimiter"):
        delimiter = str(options["delimiter"])
        if len(delimiter) != 1:
            raise IngestFailed("The delimiter must be one character.")
        return delimiter
    if fmt == "tsv":
        return "\t"
    with src.open("rb") as fh:
        head = fh.read(64 * 1024).decode(_python_encoding(encoding), errors="replace")
    try:
        return csv.Sniffer().sniff(head, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def _python_encoding(encoding: str) -> str:
    return {"utf-8": "utf-8-sig", "utf8": "utf-8-sig", "latin-1": "latin-1", "utf-16": "utf-16"}.get(encoding, encoding)


def _first_ragged_line(src: Path, delimiter: str, encoding: str, header: bool) -> tuple[int, int, int] | None:
    """(line, expected, found) for the first row whose field count differs from the first row's. Only on failure."""
    with src.open(encoding=_python_encoding(encoding), errors="replace", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        expected = None
        for row in reader:
            if expected is None:
                expected = len(row)
                continue
            if row and len(row) != expected:
                return reader.line_num, expected, len(row)
    return None


def _csv_failure(exc: duckdb.Error, src: Path, delimiter: str, encoding: str, header: bool) -> IngestFailed:
    text = str(exc)
    line_match, column_match = _LINE.search(text), _COLUMN.search(text)
    if "invalid unicode" in text.lower():
        return IngestFailed(
            f"The file is not {encoding} text; set options.encoding (e.g. latin-1 or utf-16).",
            int(line_match.group(1)) if line_match else None,
        )
    if line_match:
        detail = text.split("\n")[2] if text.count("\n") >= 2 else text.split("\n")[0]
        detail = detail.replace("Error when converting", "Cannot convert").strip()
        return IngestFailed(
            detail or "The CSV has a bad row.",
            int(line_match.group(1)),
            column_match.group(1) if column_match else None,
        )
    ragged = _first_ragged_line(src, delimiter, encoding, header)
    if ragged is not None:
        line, expected, found = ragged
        return IngestFailed(f"Row {line} has {found} fields where the first row has {expected}.", line)
    return IngestFailed("The file could not be read as CSV: " + text.split("\n")[0])


def convert(
    fmt: str, src: Path, out: Path, options: dict[str, Any], *, threads: int = 2, memory_limit: str = "256MB"
) -> int:
    """Write ``src`` (an upload of format ``fmt``) as typed Parquet to ``out``; returns its number of rows."""
    con = connect(threads=threads, memory_limit=memory_limit)
    try:
        if fmt in ("csv", "tsv"):
            encoding = str(options.get("encoding", "utf-8")).lower()
            header = bool(options.get("header", True))
            delimiter = _delimiter(src, fmt, options, encoding)
            args = {"delim": delimiter, "header": header, "encoding": encoding, "strict_mode": True}
            if "quote" in options:
                args["quote"] = str(options["quote"])
            if "skip_rows" in options:
                args["skip"] = int(options["skip_rows"])
            if "null_values" in options:
                args["nullstr"] = [str(v) for v in options["null_values"]]
            named = ", ".join(f"{k} := ${k}" for k in args)
            try:
                # Only our fixed option names are spliced; every value, the path included, is a bound parameter.
                select = f"SELECT * FROM read_csv($src, {named})"  # noqa: S608
                con.execute(_copy_sql(select, out), {"src": str(src), **args})
            except duckdb.Error as exc:
                raise _csv_failure(exc, src, delimiter, encoding, header) from None
            columns = con.execute("SELECT * FROM read_parquet($p) LIMIT 0", {"p": str(out)}).description or []
            if len(columns) == 1 and delimiter in str(columns[0][0]):
                raise _csv_failure(duckdb.InvalidInputException("single column"), src, delimiter, encoding, header)
        elif fmt in ("json", "ndjson"):
            layout = "array" if fmt == "json" else "newline_delimited"
            if fmt == "json":
                _check_json_array_ends(src)
            try:
                select = f"SELECT * FROM read_json($src, format := '{layout}')"  # noqa: S608 (one of two constants)
                con.execute(_copy_sql(select, out), {"src": str(src)})
            except duckdb.Error as exc:
                first = str(exc).split("\n")[0]
                line_match = _LINE.search(str(exc)) or re.search(r"line (\d+)", str(exc))
                raise IngestFailed(
                    f"The file is not valid {fmt.upper()}: {first}", int(line_match.group(1)) if line_match else None
                ) from None
        elif fmt == "parquet":
            try:
                con.execute(_copy_sql("SELECT * FROM read_parquet($src)", out), {"src": str(src)})
            except duckdb.Error as exc:
                raise IngestFailed("The file is not a readable Parquet file: " + str(exc).split("\n")[0]) from None
        elif fmt == "xlsx":
            table = _read_xlsx(src, options.get("sheet"))
            con.register("sheet", table)
            con.execute(_copy_sql("SELECT * FROM sheet", out))
        else:
            raise IngestFailed(f"Unknown format {fmt!r}.")
        rows = con.execute("SELECT count(*) FROM read_parquet($p)", {"p": str(out)}).fetchone()
        if rows is None or rows[0] == 0:
            raise IngestFailed("The file has no rows.")
        return int(rows[0])
    finally:
        con.close()


def _check_json_array_ends(src: Path) -> None:
    """DuckDB reads a JSON array that was cut off short without complaint; a whole upload ends with ']'."""
    with src.open("rb") as fh:
        fh.seek(max(0, src.stat().st_size - 256))
        tail = fh.read().rstrip()
    if not tail.endswith(b"]"):
        raise IngestFailed("The JSON array is not closed: the file looks cut off.")


def _read_xlsx(src: Path, sheet: Any) -> Any:
    import fastexcel

    try:
        with zipfile.ZipFile(src) as archive:
            infos = archive.infolist()
            expanded = sum(i.file_size for i in infos)
            compressed = max(1, sum(i.compress_size for i in infos))
    except zipfile.BadZipFile:
        raise IngestFailed("This is not an XLSX file (the zip archive is damaged).") from None
    if expanded > MAX_XLSX_EXPANDED_BYTES or expanded / compressed > MAX_XLSX_RATIO:
        raise IngestFailed(
            f"The XLSX expands to {expanded} bytes ({expanded / compressed:.0f}x its size): "
            "refused as a likely zip bomb."
        )
    try:
        reader = fastexcel.read_excel(str(src))
        selected = sheet if sheet is not None else 0
        if isinstance(selected, str) and selected not in reader.sheet_names:
            raise IngestFailed(f"No sheet named {selected!r}; the sheets are {', '.join(reader.sheet_names)}.")
        return reader.load_sheet(selected).to_arrow()
    except IngestFailed:
        raise
    except Exception as exc:  # fastexcel raises its own errors for broken workbooks; say what it said
        raise IngestFailed("The XLSX could not be read: " + str(exc).split("\n")[0]) from None
