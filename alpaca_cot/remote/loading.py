"""Loading a remote-code family's tokenizer and model: natively after a one-time conversion where an equivalent
native architecture exists, else through the checkpoint's own classes with the family's in-memory fixes."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .fixes import apply_fixes

if TYPE_CHECKING:  # the registry imports this package: no import at run time
    from ..models import ModelFamily

logger = logging.getLogger(__name__)


def family_support(family: ModelFamily) -> ModuleType:
    """The module of ``alpaca_cot.remote`` that adapts ``family`` (its row's ``remote_support``)."""
    return importlib.import_module(f"{__package__}.{family.remote_support}")


def _auto_map_entry(auto_map: dict[str, Any], keys: tuple[str, ...], what: str, model_path: str) -> str:
    for key in keys:
        entry = auto_map.get(key)
        if isinstance(entry, (list, tuple)):  # tokenizers: [slow class, fast class]
            entry = entry[0] or entry[1]
        if entry:
            return entry
    raise UserError(f"{model_path}: its auto_map names no {what} class ({' or '.join(keys)}); is this the "
                    "checkpoint's own folder, with its Python files?")


def _remote_class(model_path: str, reference: str, import_fixes: tuple, fixes: tuple, what: str) -> type:
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    apply_fixes(import_fixes, what=f"{what} imports")
    cls = get_class_from_dynamic_module(reference, model_path)
    apply_fixes(fixes, cls, what)
    return cls


def remote_model_class(model_path: str, family: ModelFamily) -> type:
    """The checkpoint's own model class (causal-LM head), with the family's fixes applied in memory."""
    from ..models import read_model_config

    support = family_support(family)
    auto_map = read_model_config(model_path).get("auto_map") or {}
    reference = _auto_map_entry(auto_map, ("AutoModelForCausalLM", "AutoModel"), "model", model_path)
    cls = _remote_class(model_path, reference, support.IMPORT_FIXES, support.MODEL_FIXES, f"{family.name} model")
    # as the Auto classes do: save_pretrained then copies the code files and writes auto_map
    cls.register_for_auto_class(next(key for key in ("AutoModelForCausalLM", "AutoModel") if auto_map.get(key)))
    return cls


def load_remote_tokenizer(model_path: str, family: ModelFamily) -> Any:
    """The checkpoint's own tokenizer class, fixed in memory, loaded from ``model_path``."""
    from ..models import read_checkpoint_json, read_model_config
    from .tokenizers import TOKENIZER_FIXES, TOKENIZER_IMPORT_FIXES

    auto_map = (read_checkpoint_json(model_path, "tokenizer_config.json", required=False).get("auto_map")
                or read_model_config(model_path).get("auto_map") or {})
    reference = _auto_map_entry(auto_map, ("AutoTokenizer",), "tokenizer", model_path)

    key = family.remote_support
    cls = _remote_class(model_path, reference, TOKENIZER_IMPORT_FIXES.get(key, ()), TOKENIZER_FIXES.get(key, ()),
                        f"{family.name} tokenizer")
    cls.register_for_auto_class("AutoTokenizer")  # as AutoTokenizer does: save_pretrained then copies the code file
    return cls.from_pretrained(model_path, trust_remote_code=True)


def load_remote_model(model_path: str, family: ModelFamily, kwargs: dict[str, Any]) -> Any:
    """The model of ``model_path``: the cached native conversion if the family has one for this checkpoint,
    else the checkpoint's own class with the family's fixes. ``kwargs`` go to ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    from ..models import read_model_config
    from .convert import converted_checkpoint, converted_from

    config = read_model_config(model_path)
    if converted_from(config):  # already our native copy (e.g. a run's base): no remote code at all
        return AutoModelForCausalLM.from_pretrained(model_path, **{**kwargs, "trust_remote_code": False})
    conversion = family_support(family).native_conversion(config)
    if conversion is not None:
        native = converted_checkpoint(model_path, family, conversion)
        return AutoModelForCausalLM.from_pretrained(native, **{**kwargs, "trust_remote_code": False})
    cls = remote_model_class(model_path, family)
    return cls.from_pretrained(model_path, **{**kwargs, "trust_remote_code": True})


def native_module_names(family: ModelFamily, model: Any, names: list[str]) -> list[str]:
    """``names`` of ``family``'s upstream modules as ``model`` calls them: our converted copy renames and splits
    fused layers (ChatGLM2's ``query_key_value`` is ``q_proj k_proj v_proj`` there); other models keep them."""
    from .convert import CONVERTED_FROM

    config = getattr(model, "config", None)
    if not getattr(family, "remote_support", "") or not getattr(config, CONVERTED_FROM, None):
        return list(names)
    renamed = getattr(family_support(family), "UPSTREAM_MODULE_NAMES", {})
    return list(dict.fromkeys(native for name in names for native in renamed.get(name, (name,))))
