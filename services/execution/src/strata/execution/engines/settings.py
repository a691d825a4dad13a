"""What every engine is configured with; the service's pydantic ``Settings`` builds one :class:`EngineSettings`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """Limits of one run, the same for every query of the service.

    ``memory_limit`` is a DuckDB-style size (``"1GB"``, ``"512MiB"``); ``max_bytes_to_read`` (ClickHouse only, 0 =
    unlimited) bounds what one query may read; ``workdir`` holds the engines' spill files.
    """

    workdir: Path
    threads: int = 2
    memory_limit: str = "1GB"
    clickhouse_url: str | None = None
    max_bytes_to_read: int = 0

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError("threads must be at least 1")
        if self.max_bytes_to_read < 0:
            raise ValueError("max_bytes_to_read must be 0 (unlimited) or positive")
        parse_size(self.memory_limit)

    @property
    def memory_limit_bytes(self) -> int:
        return parse_size(self.memory_limit)


def parse_size(text: str) -> int:
    """``"1GB"`` → 10**9, ``"1GiB"`` → 2**30, ``"512MB"``, ``"1024"`` (bytes). DuckDB reads both units the same way."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. '1GB', '512MiB')")
    number, unit, suffix = match.groups()
    power = "KMGT".find(unit.upper()) + 1 if unit else 0
    base = 1024 if suffix and suffix.upper() == "IB" else 1000
    return int(float(number) * base**power)
