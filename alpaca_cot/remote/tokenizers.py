"""PLACEHOLDER: the remote-code tokenizers' fixes, by family module name (a family row's ``remote_support``)."""

from __future__ import annotations

from .fixes import Fix

# Fixes applied before a tokenizer's Python file is imported (no argument), and to its class.
TOKENIZER_IMPORT_FIXES: dict[str, tuple[Fix, ...]] = {}
TOKENIZER_FIXES: dict[str, tuple[Fix, ...]] = {}
