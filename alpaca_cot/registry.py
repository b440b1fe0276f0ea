"""Registries are plain dicts of frozen dataclass rows keyed by their command-line name."""

from __future__ import annotations

from typing import Protocol, TypeVar


class _Named(Protocol):
    name: str


Row = TypeVar("Row", bound=_Named)


def build_registry(kind: str, *rows: Row) -> dict[str, Row]:
    """``{row.name: row}``; a name registered twice fails at import, not at run time."""
    table: dict[str, Row] = {}
    for row in rows:
        if row.name in table:
            raise ValueError(f"{kind} {row.name!r} registered twice")
        table[row.name] = row
    return table
