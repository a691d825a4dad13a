"""What the engines share: the Parquet result writer, cancellation, positions in the user's SQL, message scrubbing."""

from __future__ import annotations

import heapq
import logging
import threading
import time
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from .base import Execution, Interrupted

log = logging.getLogger(__name__)

#: Rows per Parquet row group of a result (DuckDB's own default; ~1 MB per numeric column).
ROW_GROUP_SIZE = 122_880


class ParquetSink:
    """Writes record batches to a Parquet file, keeping at most ``max_rows`` rows.

    :meth:`add` returns ``False`` once a row beyond ``max_rows`` arrived: the caller stops reading and the result is
    ``truncated``. At most one row group is held in memory. Dictionary encoding is off: on mixed data it made the
    files bigger (zstd does the job) and the writer twice as slow.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_rows: int,
        row_group_size: int = ROW_GROUP_SIZE,
        transform: Callable[[pa.RecordBatch], pa.RecordBatch] | None = None,
    ) -> None:
        self.path = path
        self.max_rows = max(0, max_rows)
        self.row_group_size = row_group_size
        self.rows = 0
        self.truncated = False
        self._transform = transform
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0

    def add(self, batch: pa.RecordBatch) -> bool:
        if batch.num_rows == 0:
            return True
        room = self.max_rows - self.rows
        if batch.num_rows > room:
            self.truncated = True
            batch = batch.slice(0, room)
        if batch.num_rows:
            self._buffer(batch)
        return not self.truncated

    def finish(self, schema: pa.Schema) -> None:
        """Write what is buffered and close the file (an empty result still gets a file, with ``schema``)."""
        if self._pending_rows:
            self._write(self._take(self._pending_rows))
        if self._writer is None:
            self._open(schema)
        assert self._writer is not None
        self._writer.close()

    def abort(self) -> None:
        """Close and delete the partial file."""
        writer, self._writer = self._writer, None
        self._pending = []
        try:
            if writer is not None:
                writer.close()
        finally:
            self.path.unlink(missing_ok=True)

    def _buffer(self, batch: pa.RecordBatch) -> None:
        if self._transform is not None:
            batch = self._transform(batch)
        if self._schema is None:
            self._schema = batch.schema
        elif not batch.schema.equals(self._schema):
            # ClickHouse may send a block with another Arrow type for the same column (LowCardinality, Nullable)
            batch = batch.cast(self._schema)
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        while self._pending_rows >= self.row_group_size:
            self._write(self._take(self.row_group_size))
        self.rows += batch.num_rows

    def _take(self, n: int) -> pa.Table:
        table = pa.Table.from_batches(self._pending, schema=self._schema)
        rest = table.slice(n)
        self._pending = rest.to_batches()
        self._pending_rows = rest.num_rows
        return table.slice(0, n)

    def _open(self, schema: pa.Schema) -> None:
        self._writer = pq.ParquetWriter(
            str(self.path), schema, compression="zstd", use_dictionary=False, write_statistics=True
        )

    def _write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._open(table.schema)
        assert self._writer is not None
        self._writer.write_table(table, row_group_size=self.row_group_size)


def replace_in_strings(batch: pa.RecordBatch, replacements: dict[str, str]) -> pa.RecordBatch:
    """``batch`` with every occurrence of the keys replaced in its string columns (plans that name our files)."""
    if not replacements:
        return batch
    columns = []
    for column in batch.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            for old, new in sorted(replacements.items(), key=lambda kv: -len(kv[0])):
                column = pc.replace_substring(column, old, new)
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)


# ------------------------------------------------------------------------------------------- positions, messages


def char_index(text: str, byte_offset: int) -> int:
    """The character index of a UTF-8 byte offset into ``text`` (engines count bytes)."""
    return len(text.encode()[: max(0, byte_offset)].decode(errors="ignore"))


def line_col(text: str, index: int) -> tuple[int, int]:
    """1-based (line, column) of the character ``index`` in ``text``."""
    index = max(0, min(index, len(text)))
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


class Scrubber:
    """Replaces server-side names (file paths, object URLs, credentials) in what users see."""

    def __init__(self, replacements: dict[str, str]) -> None:
        # longest first, so that a path is replaced before the folder it is in
        self._replacements = sorted(((k, v) for k, v in replacements.items() if k), key=lambda kv: -len(kv[0]))

    def __call__(self, text: str) -> str:
        for old, new in self._replacements:
            text = text.replace(old, new)
        return text.strip()


# ------------------------------------------------------------------------------------------------- cancellation


class CancellableExecution(Execution):
    """Cancellation that cannot be lost.

    An engine interrupts the statement that runs *now*: a cancel that lands between our last check and the start of
    the statement would be forgotten. So :meth:`cancel` sets a flag the run checks between steps, interrupts, and
    keeps interrupting (every 100 ms) until :meth:`run` has ended.
    """

    _REINTERRUPT_S = 0.1
    _REINTERRUPT_FOR_S = 30.0
    #: whether interrupting is instant (DuckDB) or a statement of its own (``KILL QUERY``): then even the first
    #: interrupt runs in the background thread, so that ``cancel()`` never blocks the event loop
    _INTERRUPT_IS_INSTANT = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._finished = threading.Event()
        self._retrying = False
        self._deadline_hit = False

    def cancel(self) -> None:
        self._cancelled.set()
        if self._finished.is_set():
            return
        if self._INTERRUPT_IS_INSTANT:
            self._interrupt()
        with self._lock:
            if self._retrying:
                return
            self._retrying = True
        threading.Thread(target=self._keep_interrupting, name="strata-engine-cancel", daemon=True).start()

    def _keep_interrupting(self) -> None:
        until = time.monotonic() + self._REINTERRUPT_FOR_S
        if not self._INTERRUPT_IS_INSTANT:
            self._interrupt()
        while not self._finished.wait(self._REINTERRUPT_S) and time.monotonic() < until:
            self._interrupt()

    def _on_deadline(self) -> None:
        self._deadline_hit = True
        self.cancel()

    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise self._interrupted()

    def _interrupted(self) -> Interrupted:
        if self._deadline_hit:
            return Interrupted("the query ran longer than its time limit")
        return Interrupted("the query was cancelled")

    @abstractmethod
    def _interrupt(self) -> None:
        """Interrupt the engine's running statement, if there is one (thread-safe; a no-op otherwise)."""


class _Deadlines:
    """One daemon thread for every run's time limit (starting a thread per run costs ~0.7 ms)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], Any]]] = []
        self._seq = 0
        self._thread: threading.Thread | None = None

    def schedule(self, seconds: float, callback: Callable[[], Any]) -> int:
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (time.monotonic() + seconds, self._seq, callback))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="strata-engine-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()
            return self._seq

    def cancel(self, handle: int) -> None:
        with self._cond:
            # drop the entry now: its callback holds the run (and the run its engine) until then
            kept = [entry for entry in self._heap if entry[1] != handle]
            if len(kept) != len(self._heap):
                heapq.heapify(kept)
                self._heap = kept
                self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                _, _, callback = heapq.heappop(self._heap)
            try:
                callback()
            except Exception:
                log.exception("a query deadline callback failed")
            # the callback holds its run and engine: not until the next deadline fires (or for good, at exit)
            del callback


_DEADLINES = _Deadlines()


class Deadline:
    """The engine's own time limit for one run: ``callback`` is called after ``seconds`` unless cancelled."""

    def __init__(self, seconds: float, callback: Callable[[], Any]) -> None:
        self._handle = _DEADLINES.schedule(seconds, callback) if seconds > 0 else None

    def cancel(self) -> None:
        if self._handle is not None:
            _DEADLINES.cancel(self._handle)
            self._handle = None
