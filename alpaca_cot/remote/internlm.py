"""InternLM (v1: internlm-7b, internlm-chat-7b, internlm-20b): converted once to native ``LlamaForCausalLM``.

InternLM v1 is LLaMA with optional biases on q/k/v/o and, in its first code revision (the one without a
``rotary`` config key), a rotary base hard-coded to 10,000 whatever ``rope_theta`` says. Its weight names are
already LLaMA's, so the conversion is a config mapping. Checkpoints whose rotary embedding LLaMA cannot express
exactly (the later revision's ``rotary: {"type": "dynamic"}`` NTK scaling, equal to LLaMA's only up to
``max_position_embeddings``) keep the checkpoint's own classes, fixed here in memory.

The fixes of the own classes (rotary buffers, generate, KV cache) are shared with InternLM2.
"""

from __future__ import annotations

import functools
import inspect
import sys
from types import ModuleType
from typing import Any

from .fixes import GENERATION_MIXIN_FIX, Fix, NativeConversion

# InternLMConfig's defaults (configuration_internlm.py), used when a config.json leaves a key out
_INTERNLM_DEFAULTS: dict[str, Any] = {
    "vocab_size": 103168, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02,
    "rms_norm_eps": 1e-6, "use_cache": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False, "bias": True,
}
_DEFAULT_ROPE_BASE = 10000.0  # InternLMRotaryEmbedding's default, the base of the code without a `rotary` key
_ROTARY_INIT_ARGS = "_alpaca_cot_init_args"  # where a rotary module keeps the arguments it was built with
_PATCHED = "_alpaca_cot_patched"


# --- fixes shared by InternLM and InternLM2 ---------------------------------------------------------------------

def _remote_module(model_class: type) -> ModuleType:
    return sys.modules[model_class.__module__]


def _rotary_classes(model_class: type) -> list[type]:
    import torch

    module = _remote_module(model_class)
    return [value for name, value in vars(module).items()
            if "RotaryEmbedding" in name and inspect.isclass(value) and issubclass(value, torch.nn.Module)
            and value.__module__ == module.__name__]


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def rotary_buffers_left_empty(model_class: type) -> bool:
    """transformers >= 5 builds the model on the meta device and re-creates non-persistent buffers as empty
    tensors, filled only through ``_init_weights``; these classes compute their rotary buffers in ``__init__``."""
    return _transformers_major() >= 5 and bool(_rotary_classes(model_class))


def _record_init_arguments(rotary_class: type) -> None:
    original = rotary_class.__init__
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        # a subclass's __init__ calls its parent's: keep the outermost call's arguments, those of type(self)
        if _ROTARY_INIT_ARGS not in vars(self):
            object.__setattr__(self, _ROTARY_INIT_ARGS, (args, kwargs))
        original(self, *args, **kwargs)

    setattr(init, _PATCHED, True)
    rotary_class.__init__ = init


def _rebuild_rotary_buffers(module: Any) -> None:
    """Recompute ``module``'s buffers as its own ``__init__`` does, on a CPU twin built with the same arguments."""
    import torch

    args, kwargs = vars(module)[_ROTARY_INIT_ARGS]
    if "device" in kwargs:
        kwargs = {**kwargs, "device": None}  # built on the meta device: compute on the CPU
    with torch.device("cpu"), torch.no_grad():
        twin = type(module)(*args, **kwargs)
    for name, value in twin.named_buffers(recurse=False):
        placeholder = getattr(module, name, None)
        device = placeholder.device if placeholder is not None and placeholder.device.type != "meta" else None
        dtype = placeholder.dtype if placeholder is not None else value.dtype  # the dtype __init__ gave it
        module.register_buffer(name, value.to(device=device, dtype=dtype), persistent=False)


def _init_weights_owner(model_class: type) -> type:
    """The checkpoint's own class that defines ``_init_weights``; never a transformers class (patching one would
    reach every model in the process): without one of its own, the model class gets the override."""
    for klass in model_class.__mro__:
        if "_init_weights" in vars(klass) and klass.__module__ == model_class.__module__:
            return klass
    return model_class


def cure_rotary_buffers(model_class: type) -> None:
    """Record each rotary module's constructor arguments, and let ``_init_weights`` (which transformers calls
    for every module after loading) recompute the rotary buffers from them."""
    for rotary_class in _rotary_classes(model_class):
        _record_init_arguments(rotary_class)
    owner = _init_weights_owner(model_class)
    original = owner._init_weights
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def init_weights(self: Any, module: Any) -> None:
        if _ROTARY_INIT_ARGS in vars(module):
            _rebuild_rotary_buffers(module)
            return
        original(self, module)

    setattr(init_weights, _PATCHED, True)
    owner._init_weights = init_weights


ROTARY_BUFFERS_FIX = Fix(
    defect="rotary inv_freq/cos/sin buffers are left uninitialised by from_pretrained (non-persistent buffers "
           "computed in __init__, which transformers 5 runs on the meta device)",
    present=rotary_buffers_left_empty,
    cure=cure_rotary_buffers,
)


def _legacy_cache_dropped(model_class: type) -> bool:
    """transformers 5's generate hands the cache to the model as ``cache``; this code reads ``past_key_values``
    (tuples), so without the fix every step recomputes the whole sequence, silently."""
    parameters = inspect.signature(model_class.prepare_inputs_for_generation).parameters
    return _transformers_major() >= 5 and "past_key_values" in parameters and "cache" not in parameters


def _cure_legacy_cache(model_class: type) -> None:
    original = model_class.prepare_inputs_for_generation

    @functools.wraps(original)
    def prepare_inputs_for_generation(self: Any, input_ids: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        cache = kwargs.pop("cache", None)  # the tuple the model returned last step, under transformers 5's name
        if past_key_values is None and isinstance(cache, (tuple, list)):
            past_key_values = cache
        # transformers 5 also passes position ids of the whole sequence, which this code would not slice to the
        # new tokens; it derives them from the attention mask itself, as it did when it was written
        kwargs.pop("position_ids", None)
        return original(self, input_ids, past_key_values=past_key_values, **kwargs)

    model_class.prepare_inputs_for_generation = prepare_inputs_for_generation
    # a DynamicCache object would reach this code as past_key_values, which it indexes as tuples
    model_class._supports_default_dynamic_cache = classmethod(lambda cls: False)


LEGACY_CACHE_FIX = Fix(
    defect="prepare_inputs_for_generation reads past_key_values, but transformers 5's generate passes the cache "
           "as `cache` (every step recomputes the whole sequence) and whole-sequence position_ids",
    present=_legacy_cache_dropped,
    cure=_cure_legacy_cache,
)

IMPORT_FIXES: tuple[Fix, ...] = ()
MODEL_FIXES: tuple[Fix, ...] = (ROTARY_BUFFERS_FIX, GENERATION_MIXIN_FIX, LEGACY_CACHE_FIX)


# --- native conversion ------------------------------------------------------------------------------------------

def _rope_base(config: dict[str, Any]) -> float | None:
    """The rotary base InternLM's code uses for this config, or None where LLaMA's RoPE would differ."""
    rotary = config.get("rotary")
    if rotary is not None:  # the later code revision: {"base": ..., "type": "origin" | "dynamic"}
        # "dynamic" rescales the base past max_position_embeddings in its own way, not exactly LLaMA's
        return float(rotary.get("base", _DEFAULT_ROPE_BASE)) if rotary.get("type") == "origin" else None
    # the first revision ignores rope_theta and rope_scaling; a config setting them to something else was
    # written for code we have not seen, so it keeps its own classes
    if config.get("rope_scaling") or float(config.get("rope_theta", _DEFAULT_ROPE_BASE)) != _DEFAULT_ROPE_BASE:
        return None
    return _DEFAULT_ROPE_BASE


def llama_config(config: dict[str, Any], defaults: dict[str, Any], rope: dict[str, Any],
                 num_key_value_heads: int) -> dict[str, Any]:
    """A native LLaMA config.json with the shapes, ids and norms of ``config`` (upstream ``defaults`` filling
    what it leaves out); ``rope`` is LLaMA's ``rope_parameters``."""
    value = {**defaults, **config}.get
    heads = value("num_attention_heads")
    native = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "head_dim": value("hidden_size") // heads, "num_key_value_heads": num_key_value_heads,
        "attention_bias": bool(value("bias")), "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1,
        "rope_parameters": rope,
    }
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
                "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings"):
        native[key] = value(key)
    dtype = config.get("torch_dtype") or config.get("dtype")
    if dtype:
        native["dtype"] = dtype
    return native


# upstream module name -> LLaMA module names (for --lora_target_modules): InternLM v1 already uses LLaMA's
UPSTREAM_MODULE_NAMES: dict[str, tuple[str, ...]] = {}


def _native_config(config: dict[str, Any]) -> dict[str, Any]:
    heads = config.get("num_attention_heads", _INTERNLM_DEFAULTS["num_attention_heads"])
    rope = {"rope_type": "default", "rope_theta": _rope_base(config)}
    return llama_config(config, _INTERNLM_DEFAULTS, rope, num_key_value_heads=heads)  # v1 ignores kv heads


def _native_tensors(name: str, tensor: Any, config: dict[str, Any]) -> dict[str, Any]:
    if ".rotary_emb." in name:  # old checkpoints may hold rotary buffers; LLaMA computes its own
        return {}
    return {name: tensor}


def native_conversion(config: dict[str, Any]) -> NativeConversion | None:
    """``LlamaForCausalLM`` for InternLM v1 checkpoints with a plain rotary embedding, else None."""
    if _rope_base(config) is None:
        return None
    return NativeConversion(architecture="LlamaForCausalLM", config=_native_config, tensors=_native_tensors)
