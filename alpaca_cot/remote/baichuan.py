"""Baichuan-1 and Baichuan2: two attention designs behind one ``model_type`` ("baichuan").

- RoPE checkpoints (Baichuan-7B, Baichuan2-7B) are LLaMA with q/k/v fused into one ``W_pack`` projection: they are
  converted once to a native ``LlamaForCausalLM``. Baichuan2's output head is a ``NormHead`` (rows L2-normalised at
  every forward); the conversion stores the normalised rows, which is exact for inference and for any training
  that leaves the head frozen (LoRA and the other adapters here), not for training the head itself.
- ALiBi checkpoints (Baichuan-13B, Baichuan2-13B) have no native equivalent (transformers' ALiBi models differ in
  layout and mask): their own classes are used, with the in-memory fixes below.

Their ``config.json`` tells them apart: the RoPE code reads ``max_position_embeddings`` (its rotary table size),
the ALiBi code ``model_max_length`` only, and the 13B configs have no ``max_position_embeddings`` key.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

from .fixes import GENERATION_MIXIN_FIX, Fix, NativeConversion

# Baichuan2's vocabulary (Baichuan-1: 64,000), which vLLM uses to tell the generations apart.
BAICHUAN2_VOCAB_SIZE = 125696
_STREAMING_ONLY_PACKAGE = "transformers_stream_generator"  # Baichuan-13B's chat(stream=True) helper
_ROPE_THETA = 10000.0  # upstream's RotaryEmbedding default: its callers pass no base


# ---------------------------------------------------------------------------------------------------------------------
# Import fix: the streaming helper imported inside a method only
# ---------------------------------------------------------------------------------------------------------------------

def _stream_generator_unusable() -> bool:
    """transformers_stream_generator is missing, or installed but broken (it imports DisjunctiveConstraint, which
    transformers 5 removed): transformers' import check then refuses Baichuan-13B's modelling file."""
    from transformers import dynamic_module_utils

    if getattr(dynamic_module_utils.get_imports, "_alpaca_cot_skips", None) == _STREAMING_ONLY_PACKAGE:
        return False
    try:
        importlib.import_module(_STREAMING_ONLY_PACKAGE)
    except ImportError:
        return True
    return False


def _imported_only_inside_functions(filename: str, package: str) -> bool:
    """Every import of ``package`` in ``filename`` sits in a function body: the module itself loads without it."""
    tree = ast.parse(Path(filename).read_text(encoding="utf-8"))
    in_functions = {id(node) for function in ast.walk(tree)
                    if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) for node in ast.walk(function)}
    imports = [node for node in ast.walk(tree) if package in _imported_packages(node)]
    return bool(imports) and all(id(node) in in_functions for node in imports)


def _imported_packages(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[0] for alias in node.names}
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return {node.module.split(".")[0]}
    return set()


def _skip_lazy_stream_generator_check() -> None:
    """transformers' check lists every import, method bodies included; drop this one package from it, and only for
    files that import it inside functions (Baichuan-13B: in ``chat(stream=True)``, which then raises the real
    ImportError when called). Any other missing package, or this one imported at module level, still fails."""
    from transformers import dynamic_module_utils

    original = dynamic_module_utils.get_imports

    @functools.wraps(original)
    def get_imports(filename: Any) -> list[str]:
        imports = original(filename)
        if _STREAMING_ONLY_PACKAGE in imports and _imported_only_inside_functions(filename, _STREAMING_ONLY_PACKAGE):
            imports = [name for name in imports if name != _STREAMING_ONLY_PACKAGE]
        return imports

    get_imports._alpaca_cot_skips = _STREAMING_ONLY_PACKAGE
    dynamic_module_utils.get_imports = get_imports


IMPORT_FIXES: tuple[Fix, ...] = (
    Fix(defect="Baichuan-13B's modelling file imports transformers_stream_generator (only inside chat(stream=True)), "
               "and transformers refuses to load the file when that package is missing or cannot import under "
               "transformers 5 (DisjunctiveConstraint is gone)",
        present=_stream_generator_unusable, cure=_skip_lazy_stream_generator_check),
)


# ---------------------------------------------------------------------------------------------------------------------
# Model fixes
# ---------------------------------------------------------------------------------------------------------------------

def _sibling(cls: type, name: str) -> Any:
    """A class of the checkpoint's modelling module (the one ``cls`` comes from), or None."""
    return getattr(sys.modules.get(cls.__module__), name, None)


def _rotary_tables_are_attributes(cls: type) -> bool:
    """Baichuan2-7B's RotaryEmbedding keeps inv_freq / cos / sin as plain attributes computed in ``__init__``:
    transformers 5 builds models on the meta device, so they stay meta tensors nothing loads or moves."""
    import torch

    rotary = _sibling(cls, "RotaryEmbedding")
    if rotary is None:
        return False
    try:
        with torch.device("meta"):
            probe = rotary(8, max_position_embeddings=4)
    except TypeError:  # not the upstream constructor this fix knows
        return False
    return "inv_freq" not in dict(probe.named_buffers()) and isinstance(getattr(probe, "inv_freq", None), torch.Tensor)


def _rebuild_meta_rotary_tables(cls: type) -> None:
    """Rebuild the tables with the class's own ``__init__`` on the input's device the first time they are needed."""
    rotary = _sibling(cls, "RotaryEmbedding")
    original = rotary.forward

    @functools.wraps(original)
    def forward(self: Any, x: Any, seq_len: Any = None) -> Any:
        if self.inv_freq.is_meta:
            fresh = type(self)(2 * self.inv_freq.shape[0], max_position_embeddings=self.max_seq_len_cached,
                               device=x.device)
            self.inv_freq, self.cos_cached, self.sin_cached = fresh.inv_freq, fresh.cos_cached, fresh.sin_cached
        return original(self, x, seq_len=seq_len)

    rotary.forward = forward


def _checkpointing_flag_is_a_tuple(cls: type) -> bool:
    """Baichuan-13B's config stores ``gradient_checkpointing = gradient_checkpointing,`` (a one-element tuple, always
    true) and its model copies it: every training forward takes upstream's checkpointing branch whatever
    --gradient_checkpointing says, recomputing each layer and dropping any past_key_values (Baichuan2-13B's
    config.json even ships the tuple, as ``[false]``)."""
    config_class = getattr(cls, "config_class", None)
    return config_class is not None and isinstance(getattr(config_class(), "gradient_checkpointing", None),
                                                   (tuple, list))


def _unwrap_checkpointing_flag(cls: type) -> None:
    config_class = cls.config_class
    original = config_class.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        value = getattr(self, "gradient_checkpointing", False)
        while isinstance(value, (tuple, list)) and len(value) == 1:  # (False,), ([False],) from a saved config
            value = value[0]
        self.gradient_checkpointing = bool(value)

    config_class.__init__ = __init__


def _returns_tuple_for_default_return_dict(cls: type) -> bool:
    """Baichuan-13B's forward tests ``if not return_dict`` without falling back to the config's ``return_dict``, so
    callers that pass ``return_dict=None`` (PEFT's wrappers do) get a tuple with no ``.logits``."""
    return "use_return_dict" not in inspect.getsource(cls.forward)


def _default_return_dict_from_config(cls: type) -> None:
    original = cls.forward

    @functools.wraps(original)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("return_dict") is None:
            kwargs["return_dict"] = getattr(self.config, "return_dict", True)
        return original(self, *args, **kwargs)

    cls.forward = forward


def _looks_like_loss_kwargs_consumer(cls: type) -> bool:
    """``forward(..., **kwargs)`` swallows everything, so the Trainer believes the model normalises its loss by
    ``num_items_in_batch`` and stops dividing by the accumulation steps: the logged loss is multiplied by them."""
    parameters = inspect.signature(cls.forward).parameters.values()
    swallows = any(parameter.kind == inspect.Parameter.VAR_KEYWORD for parameter in parameters)
    return swallows and "accepts_loss_kwargs" not in dir(cls) and "num_items_in_batch" not in inspect.getsource(
        cls.forward)


def _declare_no_loss_kwargs(cls: type) -> None:
    cls.accepts_loss_kwargs = False  # what the Trainer reads before it inspects the signature


def _misses_generate_cache(cls: type) -> bool:
    """The model reads and returns legacy ``past_key_values`` tuples; transformers 5 ``generate`` keeps its cache
    under ``cache`` and never hands it back, so each step silently recomputes the whole sequence."""
    return "cache" not in inspect.signature(cls.forward).parameters


def _bridge_generate_cache(cls: type) -> None:
    """Take transformers' ``cache`` (a Cache object): give the model its contents as legacy tuples, store the new
    keys and values the model returns, and hand the same cache back under ``cache``. transformers' own
    ``prepare_inputs_for_generation`` replaces upstream's, which looks for ``past_key_values``."""
    from transformers import GenerationMixin

    original = cls.forward

    @functools.wraps(original)
    def forward(self: Any, *args: Any, cache: Any = None, **kwargs: Any) -> Any:
        if cache is None:
            return original(self, *args, **kwargs)
        past_length = cache.get_seq_length()
        past = tuple((layer.keys, layer.values) for layer in cache.layers) if past_length else None
        outputs = original(self, *args, **{**kwargs, "past_key_values": past, "use_cache": True, "return_dict": True})
        for index, (keys, values) in enumerate(outputs["cache"]):
            cache.update(keys[:, :, past_length:], values[:, :, past_length:], index)
        outputs["cache"] = cache
        return outputs

    cls.forward = forward
    cls.prepare_inputs_for_generation = GenerationMixin.prepare_inputs_for_generation
    if "_reorder_cache" in vars(cls):  # upstream reorders tuples; beam search then reorders the Cache itself
        del cls._reorder_cache


MODEL_FIXES: tuple[Fix, ...] = (
    GENERATION_MIXIN_FIX,
    Fix(defect="RotaryEmbedding computes its tables as plain attributes in __init__: built on the meta device by "
               "transformers 5, forward fails with 'Cannot copy out of meta tensor'",
        present=_rotary_tables_are_attributes, cure=_rebuild_meta_rotary_tables),
    Fix(defect="BaichuanConfig stores gradient_checkpointing as a one-element tuple (always true): every training "
               "forward checkpoints, unasked",
        present=_checkpointing_flag_is_a_tuple, cure=_unwrap_checkpointing_flag),
    Fix(defect="forward returns a tuple when return_dict is None instead of using the config's return_dict",
        present=_returns_tuple_for_default_return_dict, cure=_default_return_dict_from_config),
    Fix(defect="forward(**kwargs) makes the Trainer think the model takes loss kwargs: logged loss multiplied by "
               "the gradient accumulation steps",
        present=_looks_like_loss_kwargs_consumer, cure=_declare_no_loss_kwargs),
    Fix(defect="legacy past_key_values tuples: transformers 5 generate passes its cache as `cache`, so without a "
               "bridge every step recomputes the whole sequence",
        present=_misses_generate_cache, cure=_bridge_generate_cache),
)


# ---------------------------------------------------------------------------------------------------------------------
# Native conversion of the RoPE checkpoints
# ---------------------------------------------------------------------------------------------------------------------

def uses_rotary_positions(config: dict[str, Any]) -> bool:
    """RoPE (Baichuan-7B, Baichuan2-7B) rather than ALiBi (Baichuan-13B, Baichuan2-13B), from config.json alone."""
    return "max_position_embeddings" in config


def _has_norm_head(config: dict[str, Any]) -> bool:
    """Baichuan2 (NormHead) rather than Baichuan-1 (plain head). Among RoPE checkpoints the class names them:
    Baichuan-7B's is BaiChuanForCausalLM, Baichuan2-7B's BaichuanForCausalLM; else the vocabulary size."""
    auto_map = config.get("auto_map") or {}
    names = {*(config.get("architectures") or []),
             *(entry.rsplit(".", 1)[-1] for entry in auto_map.values() if isinstance(entry, str))}
    if "BaiChuanForCausalLM" in names:
        return False
    return "BaichuanForCausalLM" in names or config.get("vocab_size") == BAICHUAN2_VOCAB_SIZE


def _llama_config(config: dict[str, Any]) -> dict[str, Any]:
    heads = config["num_attention_heads"]
    native = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config["vocab_size"], "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"], "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": config["hidden_size"] // heads,
        "hidden_act": config.get("hidden_act", "silu"), "max_position_embeddings": config["max_position_embeddings"],
        "rms_norm_eps": config.get("rms_norm_eps", 1e-6), "initializer_range": config.get("initializer_range", 0.02),
        "rope_parameters": {"rope_type": "default", "rope_theta": _ROPE_THETA},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "use_cache": config.get("use_cache", True),
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in config:
            native[key] = config[key]
    dtype = config.get("dtype", config.get("torch_dtype"))
    if dtype:
        native["dtype"] = dtype
    return native


def _llama_tensors(name: str, tensor: Any, config: dict[str, Any]) -> dict[str, Any]:
    """``W_pack`` rows are q, k, v one after the other (upstream unflattens its output to (3, hidden));
    Baichuan2's head rows are normalised once, in float32, as its NormHead does at every forward."""
    import torch

    if ".rotary_emb." in name:  # Baichuan-7B saves inv_freq; LLaMA computes it from rope_theta
        return {}
    if name.endswith(".self_attn.W_pack.weight"):
        prefix = name[: -len("W_pack.weight")]
        query, key, value = tensor.chunk(3, dim=0)
        return {f"{prefix}q_proj.weight": query, f"{prefix}k_proj.weight": key, f"{prefix}v_proj.weight": value}
    if name == "lm_head.weight" and _has_norm_head(config):
        return {name: torch.nn.functional.normalize(tensor.float(), dim=-1).to(tensor.dtype)}
    return {name: tensor}


_TO_LLAMA = NativeConversion(architecture="LlamaForCausalLM", config=_llama_config, tensors=_llama_tensors)

# Where the fused upstream module went in the converted model (for adapter target names).
UPSTREAM_MODULE_NAMES: dict[str, tuple[str, ...]] = {"W_pack": ("q_proj", "k_proj", "v_proj")}


def native_conversion(config: dict[str, Any]) -> NativeConversion | None:
    """``LlamaForCausalLM`` for the RoPE checkpoints (Baichuan-7B, Baichuan2-7B); None for the ALiBi ones, and for
    a Baichuan2 config asking for a z-loss (upstream adds it to the training loss; LLaMA has none)."""
    if not uses_rotary_positions(config) or config.get("z_loss_weight", 0):
        return None
    return _TO_LLAMA
