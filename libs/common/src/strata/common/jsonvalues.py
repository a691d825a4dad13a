"""Values from DuckDB or Arrow as JSON can carry them, the same way in every response that shows table data."""

from __future__ import annotations

import base64
import math
import uuid
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any


def json_value(value: Any) -> Any:
    """ISO 8601 for times, ISO 8601 durations, text for decimals and UUIDs, base64 for bytes, ``None`` for NaN/inf;
    maps and lists recursively."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return format(value, "f") if value.is_finite() else None
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, timedelta):
        return iso_duration(value)
    if isinstance(value, dict):
        return {str(json_value(k)): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return str(value)


def iso_duration(delta: timedelta) -> str:
    sign = "-" if delta < timedelta(0) else ""
    delta = abs(delta)
    seconds = delta.seconds + delta.microseconds / 1_000_000
    text = f"{seconds:f}".rstrip("0").rstrip(".")
    return f"{sign}P{delta.days}DT{text}S"
