"""Opaque cursors for keyset pagination: the last row's sort value and id, base64 JSON, checked on the way in."""

from __future__ import annotations

import base64
import json

from .errors import BadRequest


def encode_cursor(values: list[str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, size: int = 2) -> list[str]:
    """The values a cursor carries; a 400 for anything a client made up or mangled."""
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, TypeError):
        values = None
    if not isinstance(values, list) or len(values) != size or not all(isinstance(v, str) for v in values):
        raise BadRequest("The cursor is not valid.", details=[{"loc": ["query", "cursor"]}])
    return values
