"""PLACEHOLDER: filled by the family's owner before landing."""

from __future__ import annotations

from typing import Any

from .fixes import Fix, NativeConversion

IMPORT_FIXES: tuple[Fix, ...] = ()
MODEL_FIXES: tuple[Fix, ...] = ()


def native_conversion(config: dict[str, Any]) -> NativeConversion | None:
    """The native equivalent of a checkpoint with this config.json, or None."""
    return None
