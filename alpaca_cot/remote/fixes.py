"""Named in-memory fixes for upstream defects of remote-code classes, and native conversions.

A family module (``alpaca_cot.remote.<name>``) exports:

- ``IMPORT_FIXES``: :class:`Fix` es applied before the checkpoint's modelling files are imported (``present``
  and ``cure`` take no argument: they look at and mend the environment those files import from);
- ``MODEL_FIXES``: :class:`Fix` es of the model class (its ``config_class`` is reachable from it);
- ``native_conversion(config) -> NativeConversion | None``: the equivalent native architecture of a checkpoint
  with this ``config.json``, or ``None`` when there is none (the fixed remote classes are used then);
- ``UPSTREAM_MODULE_NAMES`` (optional): upstream module name -> its names in the converted model, for the fused
  or renamed layers (e.g. ``query_key_value`` -> ``q_proj, k_proj, v_proj``), so adapter targets written for the
  upstream checkpoint (the family row's, or ``--lora_target_modules``) work on the converted copy.

Tokenizer fixes live in ``alpaca_cot.remote.tokenizers``, by family module name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fix:
    """One upstream defect under the transformers we depend on, and its cure.

    ``cure`` runs only when ``present`` says the defect is there, so a checkpoint whose code was fixed
    upstream is left alone.
    """

    defect: str  # what upstream does wrong, worded as a bug report's title
    present: Callable[..., bool]
    cure: Callable[..., None]


@dataclass(frozen=True)
class NativeConversion:
    """How a remote-code checkpoint becomes an equivalent checkpoint of a native transformers architecture."""

    architecture: str  # the native class, e.g. "LlamaForCausalLM"
    config: Callable[[dict[str, Any]], dict[str, Any]]  # native config.json from the upstream one
    # one upstream tensor (name, value, upstream config) -> native tensors by name; {} drops it
    tensors: Callable[[str, Any, dict[str, Any]], dict[str, Any]]
    version: int = 1  # bump when the conversion changes: converted copies are cached by it


def apply_fixes(fixes: tuple[Fix, ...], target: Any = None, what: str = "") -> list[str]:
    """Cure each present defect of ``target`` (a class, or nothing for environment fixes); returns the defects
    cured now. A class remembers what was cured, so calling again costs nothing."""
    done: set[str] = set(vars(target).get("_alpaca_cot_fixed", ())) if target is not None else set()
    cured = []
    for fix in fixes:
        if fix.defect in done:
            continue
        present = fix.present(target) if target is not None else fix.present()
        if present:
            fix.cure(target) if target is not None else fix.cure()
            cured.append(fix.defect)
            logger.info("remote code%s: fixed in memory: %s", f" ({what})" if what else "", fix.defect)
        done.add(fix.defect)
    if target is not None:
        target._alpaca_cot_fixed = frozenset(done)
    return cured
