"""InternLM2 (internlm2-7b/20b and their chat models): converted once to native ``LlamaForCausalLM``.

InternLM2 is LLaMA with grouped-query attention under other names, its q/k/v fused into one ``wqkv`` whose
output rows are grouped by key/value head: for each KV head, that group's query heads, then its key head, then
its value head. The conversion splits it into LLaMA's ``q_proj``/``k_proj``/``v_proj`` in LLaMA's head order
(query head ``h`` reads KV head ``h // group``, as ``repeat_kv`` does). Checkpoints whose RoPE scaling LLaMA
cannot express exactly (InternLM2's stateful dynamic NTK) keep the checkpoint's own classes, fixed here.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import UserError
from .fixes import GENERATION_MIXIN_FIX, Fix, NativeConversion
from .internlm import LEGACY_CACHE_FIX, ROTARY_BUFFERS_FIX, llama_config

# InternLM2Config's defaults (configuration_internlm2.py), used when a config.json leaves a key out
_INTERNLM2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 103168, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02,
    "rms_norm_eps": 1e-6, "use_cache": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False, "bias": True, "rope_theta": 10000,
}

# upstream name -> LLaMA name, for every tensor but the fused wqkv
_RENAMES = (
    (r"model\.tok_embeddings\.", "model.embed_tokens."),
    (r"output\.", "lm_head."),
    (r"model\.norm\.", "model.norm."),
    (r"model\.layers\.(\d+)\.attention_norm\.", r"model.layers.\1.input_layernorm."),
    (r"model\.layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"model\.layers\.(\d+)\.attention\.wo\.", r"model.layers.\1.self_attn.o_proj."),
    (r"model\.layers\.(\d+)\.feed_forward\.w1\.", r"model.layers.\1.mlp.gate_proj."),
    (r"model\.layers\.(\d+)\.feed_forward\.w3\.", r"model.layers.\1.mlp.up_proj."),
    (r"model\.layers\.(\d+)\.feed_forward\.w2\.", r"model.layers.\1.mlp.down_proj."),
)
_WQKV = re.compile(r"model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)")

# the fused upstream module names users pass as --lora_target_modules etc., and their LLaMA modules
UPSTREAM_MODULE_NAMES = {
    "wqkv": ("q_proj", "k_proj", "v_proj"), "wo": ("o_proj",),
    "w1": ("gate_proj",), "w3": ("up_proj",), "w2": ("down_proj",),
}


# --- fixes ------------------------------------------------------------------------------------------------------

def _rope_scaling_standardised(model_class: type) -> bool:
    """transformers 5 turns ``config.rope_scaling`` into its ``rope_parameters`` dict, never None."""
    return model_class.config_class().rope_scaling is not None


def _legacy_rope_scaling(config: Any) -> dict[str, Any] | None:
    """``rope_scaling`` as InternLM2's code reads it: None, or ``{"type", "factor"}``."""
    parameters = getattr(config, "rope_parameters", None) or {}
    kind = parameters.get("type") or parameters.get("rope_type")
    if kind in (None, "default"):
        return None
    return {"type": kind, "factor": parameters.get("factor")}


def _cure_rope_scaling(model_class: type) -> None:
    from transformers import PreTrainedConfig

    # keep transformers' setter (it stores the value as rope_parameters), read it back the legacy way
    model_class.config_class.rope_scaling = property(_legacy_rope_scaling, PreTrainedConfig.rope_scaling.fset)


ROPE_SCALING_FIX = Fix(
    defect="InternLM2Attention._init_rope raises KeyError 'type': transformers 5 returns its standardised "
           "rope_parameters ({'rope_type': 'default', ...}) as config.rope_scaling instead of None",
    present=_rope_scaling_standardised,
    cure=_cure_rope_scaling,
)


def _tied_keys_listed(model_class: type) -> bool:
    """transformers 5 reads ``_tied_weights_keys`` as a {tied: source} dict; transformers 4 took a list."""
    return isinstance(vars(model_class).get("_tied_weights_keys"), (list, tuple))


def _cure_tied_keys(model_class: type) -> None:
    # the only tie InternLM2 declares is its output head to its input embedding (tie_word_embeddings)
    model_class._tied_weights_keys = dict.fromkeys(model_class._tied_weights_keys, "model.tok_embeddings.weight")


TIED_KEYS_FIX = Fix(
    defect="InternLM2ForCausalLM._tied_weights_keys is a list; transformers 5 calls .keys() on it "
           "(AttributeError in save_pretrained)",
    present=_tied_keys_listed,
    cure=_cure_tied_keys,
)

IMPORT_FIXES: tuple[Fix, ...] = ()
MODEL_FIXES: tuple[Fix, ...] = (ROPE_SCALING_FIX, TIED_KEYS_FIX, ROTARY_BUFFERS_FIX, GENERATION_MIXIN_FIX,
                                 LEGACY_CACHE_FIX)


# --- native conversion ------------------------------------------------------------------------------------------

def _llama_rope(config: dict[str, Any]) -> dict[str, Any] | None:
    """LLaMA's ``rope_parameters`` equal to InternLM2's rotary embedding for ``config``, or None."""
    theta = float(config.get("rope_theta", _INTERNLM2_DEFAULTS["rope_theta"]))
    scaling = config.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    if scaling.get("type") == "linear":  # positions divided by the factor == LLaMA's linear inv_freq / factor
        return {"rope_type": "linear", "factor": float(scaling["factor"]), "rope_theta": theta}
    # "dynamic": InternLM2 rescales when the cached length passes max_position_embeddings and never goes
    # back, LLaMA rescales by the largest position and resets on short inputs: equal only below that length
    return None


def _head_counts(config: dict[str, Any]) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size)."""
    heads = config.get("num_attention_heads", _INTERNLM2_DEFAULTS["num_attention_heads"])
    kv_heads = config.get("num_key_value_heads") or heads
    return heads, kv_heads, config.get("hidden_size", _INTERNLM2_DEFAULTS["hidden_size"]) // heads


def _native_config(config: dict[str, Any]) -> dict[str, Any]:
    _, kv_heads, _ = _head_counts(config)
    return llama_config(config, _INTERNLM2_DEFAULTS, _llama_rope(config), num_key_value_heads=kv_heads)


def split_wqkv(fused: Any, config: dict[str, Any]) -> tuple[Any, Any, Any]:
    """q, k, v rows of a ``wqkv`` weight or bias: rows are ``(kv head, [group queries..., key, value], dim)``."""
    heads, kv_heads, head_dim = _head_counts(config)
    group = heads // kv_heads
    grouped = fused.reshape(kv_heads, group + 2, head_dim, *fused.shape[1:])
    rest = fused.shape[1:]
    return (grouped[:, :group].reshape(heads * head_dim, *rest), grouped[:, group].reshape(kv_heads * head_dim, *rest),
            grouped[:, group + 1].reshape(kv_heads * head_dim, *rest))


def _native_tensors(name: str, tensor: Any, config: dict[str, Any]) -> dict[str, Any]:
    fused = _WQKV.fullmatch(name)
    if fused:
        layer, kind = fused.groups()
        q, k, v = split_wqkv(tensor, config)
        prefix = f"model.layers.{layer}.self_attn"
        return {f"{prefix}.q_proj.{kind}": q, f"{prefix}.k_proj.{kind}": k, f"{prefix}.v_proj.{kind}": v}
    if ".rotary_emb." in name:  # buffers some checkpoints saved; LLaMA computes its own
        return {}
    for pattern, replacement in _RENAMES:
        renamed, count = re.subn(f"^{pattern}", replacement, name)
        if count:
            return {renamed: tensor}
    raise UserError(f"InternLM2 checkpoint: tensor {name!r} has no LLaMA counterpart; this checkpoint is not the "
                    "InternLM2 architecture we convert (use the checkpoint's own code: report it)")


def native_conversion(config: dict[str, Any]) -> NativeConversion | None:
    """``LlamaForCausalLM`` for InternLM2 checkpoints without dynamic RoPE scaling, else None."""
    heads, kv_heads, _ = _head_counts(config)
    if _llama_rope(config) is None or heads % kv_heads:
        return None
    return NativeConversion(architecture="LlamaForCausalLM", config=_native_config, tensors=_native_tensors)
