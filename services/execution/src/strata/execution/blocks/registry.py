"""The built-in blocks by id and version (custom blocks live in the database; the API merges the two)."""

from __future__ import annotations

import builtins

from .base import Block
from .builtin import BUILTINS


class UnknownBlock(LookupError):
    """No block with that id (and version)."""


_BY_KEY: dict[tuple[str, int], Block] = {(b.id, b.version): b for b in BUILTINS}


def get(id: str, version: int | None = None) -> Block:
    """The block ``id`` at ``version``, or its latest version."""
    if version is not None:
        block = _BY_KEY.get((id, version))
        if block is None:
            raise UnknownBlock(f"There is no block {id!r} version {version}.")
        return block
    versions = [b for (key, _), b in _BY_KEY.items() if key == id]
    if not versions:
        raise UnknownBlock(f"There is no block {id!r}.")
    return max(versions, key=lambda b: b.version)


def list(category: str | None = None) -> builtins.list[Block]:
    """The latest version of each block (of a category), by id."""
    latest: dict[str, Block] = {}
    for block in BUILTINS:
        if category is not None and block.category != category:
            continue
        if block.id not in latest or block.version > latest[block.id].version:
            latest[block.id] = block
    return [latest[k] for k in sorted(latest)]


def categories() -> builtins.list[str]:
    return sorted({b.category for b in BUILTINS})


__all__ = ["UnknownBlock", "categories", "get", "list"]
