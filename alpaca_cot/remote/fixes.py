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
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

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


# Two threads loading one family must not wrap a method twice: fixes are applied one call at a time.
_FIXING = threading.RLock()


def apply_fixes(fixes: tuple[Fix, ...], target: Any = None, what: str = "") -> list[str]:
    """Cure each present defect of ``target`` (a class, or nothing for environment fixes); returns the defects
    cured now. A class remembers what was cured, so calling again costs nothing.

    A probe that fails on code unlike the upstream revision it was written for stops with one line naming the
    defect, instead of a traceback from inside the checkpoint's classes.
    """
    with _FIXING:
        done: set[str] = set(vars(target).get("_alpaca_cot_fixed", ())) if target is not None else set()
        cured = []
        for fix in fixes:
            if fix.defect in done:
                continue
            try:
                present = fix.present(target) if target is not None else fix.present()
            except Exception as exc:  # noqa: BLE001 - any failure means "code we do not know"
                raise UserError(f"remote code{f' ({what})' if what else ''}: cannot check for the known defect "
                                f"\"{fix.defect}\" ({type(exc).__name__}: {exc}); this checkpoint's code differs "
                                "from the upstream revisions we support: please report it") from exc
            if present:
                fix.cure(target) if target is not None else fix.cure()
                cured.append(fix.defect)
                logger.info("remote code%s: fixed in memory: %s", f" ({what})" if what else "", fix.defect)
            done.add(fix.defect)
        if target is not None:
            target._alpaca_cot_fixed = frozenset(done)
        return cured


def _generation_mixin_missing(model_class: type) -> bool:
    """transformers 5's PreTrainedModel no longer brings ``generate``: a class must inherit GenerationMixin."""
    from transformers import GenerationMixin

    return hasattr(model_class, "prepare_inputs_for_generation") and not issubclass(model_class, GenerationMixin)


def _inherit_generation_mixin(model_class: type) -> None:
    from transformers import GenerationMixin

    # what transformers' Auto classes do for remote code, done to the class itself (our loaders use it directly)
    model_class.__bases__ = (*model_class.__bases__, GenerationMixin)


# Every remote-code family's model class: written before transformers 4.50 took generate() out of PreTrainedModel.
GENERATION_MIXIN_FIX = Fix(
    defect="the causal-LM class does not inherit GenerationMixin: no generate() since transformers 4.50",
    present=_generation_mixin_missing,
    cure=_inherit_generation_mixin,
)


def _num_hidden_layers_missing(model_class: type) -> bool:
    config_class = model_class.config_class
    return "num_hidden_layers" not in config_class.attribute_map and not hasattr(config_class, "num_hidden_layers")


def _alias_num_hidden_layers(model_class: type) -> None:
    config_class = model_class.config_class
    config_class.attribute_map = {**config_class.attribute_map, "num_hidden_layers": "num_layers"}


# ChatGLM 1/2/3 configs.
LAYER_COUNT_ALIAS_FIX = Fix(
    defect="ChatGLMConfig names its layer count num_layers; transformers 5 (the generation cache) and PEFT read "
           "num_hidden_layers",
    present=_num_hidden_layers_missing,
    cure=_alias_num_hidden_layers,
)
