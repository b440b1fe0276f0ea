"""ChatGLM2-6B and ChatGLM3-6B (model_type "chatglm" with multi-query attention) under transformers 5.

Their architecture is the one transformers ships as ``GlmForCausalLM`` (added for GLM-4, which kept ChatGLM2's
layout): pre-norm RMSNorm blocks, grouped-query attention with a bias on q/k/v only, rotary embeddings on the first
half of each head with interleaved pairs, a SwiGLU MLP whose fused projection holds the gate then the up half, and
an untied output layer. So a checkpoint is converted once to it (:func:`native_conversion`). Checkpoints it cannot
express exactly (P-tuning prefixes, quantized weights, LayerNorm or post-norm variants) run the checkpoint's own
classes, fixed in memory by ``MODEL_FIXES``; those fixed classes are also the reference the conversion is tested
against.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

from ..errors import UserError
from .fixes import GENERATION_MIXIN_FIX, LAYER_COUNT_ALIAS_FIX, Fix, NativeConversion

logger = logging.getLogger(__name__)

IMPORT_FIXES: tuple[Fix, ...] = ()

_ROPE_BASE = 10000.0  # ChatGLM's RotaryEmbedding.forward_impl default; chatglm3-6b-32k scales it by rope_ratio


# ---------------------------------------------------------------------------------------------------------------
# In-memory fixes of the checkpoint's own classes (target: ChatGLMForConditionalGeneration)
# ---------------------------------------------------------------------------------------------------------------

def _lacks_class_attribute(name: str) -> Any:
    def present(cls: type) -> bool:
        return not hasattr(cls.config_class, name)
    return present


def _config_max_length(cls: type) -> None:
    # The model stores it as max_sequence_length and never reads it again; None keeps it out of the saved config.
    cls.config_class.max_length = None


def _config_use_cache(cls: type) -> None:
    cls.config_class.use_cache = True  # transformers 4's PretrainedConfig default


def _never_calls_post_init(cls: type) -> bool:
    return "post_init" not in cls.__init__.__code__.co_names


def _call_post_init(cls: type) -> None:
    original_init = cls.__init__

    @functools.wraps(original_init)
    def init_then_post_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.post_init()

    cls.__init__ = init_then_post_init


def _generation_uses_removed_api(cls: type) -> bool:
    from transformers import GenerationMixin

    update = vars(cls).get("_update_model_kwargs_for_generation")
    return (update is not None and "_extract_past_from_model_output" in update.__code__.co_names
            and not hasattr(GenerationMixin, "_extract_past_from_model_output"))


def _prepare_inputs_with_legacy_cache(self: Any, input_ids: Any, next_sequence_length: int | None = None,
                                      cache: Any = None, attention_mask: Any = None, position_ids: Any = None,
                                      use_cache: bool | None = None, **kwargs: Any) -> dict[str, Any]:
    """One generation step's inputs: generate keeps the model's own tuple of per-layer (key, value) as ``cache``;
    with it only the new tokens (and their positions) are fed."""
    past = cache if isinstance(cache, tuple) else None
    if past is not None and next_sequence_length is not None:
        input_ids = input_ids[:, -next_sequence_length:]
    if position_ids is None:
        position_ids = self.get_position_ids(input_ids, device=input_ids.device)
    position_ids = position_ids[..., -input_ids.shape[1]:]
    return {"input_ids": input_ids, "past_key_values": past, "position_ids": position_ids,
            "attention_mask": attention_mask, "return_last_logit": True, "use_cache": use_cache}


def _no_default_dynamic_cache(cls: type) -> bool:
    return False  # the model returns and reads its own tuple of per-layer (key, value), never a Cache object


def _generate_with_legacy_cache(cls: type) -> None:
    from transformers import GenerationMixin

    # generate's own update stores outputs["cache"] (the model's tuple) in model_kwargs["cache"]
    cls._update_model_kwargs_for_generation = GenerationMixin._update_model_kwargs_for_generation
    cls.prepare_inputs_for_generation = _prepare_inputs_with_legacy_cache
    cls._supports_default_dynamic_cache = classmethod(_no_default_dynamic_cache)


MODEL_FIXES: tuple[Fix, ...] = (
    Fix(defect="ChatGLMForConditionalGeneration.__init__ reads config.max_length, which transformers 5 configs "
               "no longer have", present=_lacks_class_attribute("max_length"), cure=_config_max_length),
    Fix(defect="forward falls back to config.use_cache, which transformers 5 pops from config.json as a generation "
               "parameter", present=_lacks_class_attribute("use_cache"), cure=_config_use_cache),
    LAYER_COUNT_ALIAS_FIX,
    Fix(defect="the model never calls post_init() (transformers 5: no attribute 'all_tied_weights_keys')",
        present=_never_calls_post_init, cure=_call_post_init),
    GENERATION_MIXIN_FIX,
    Fix(defect="generation calls _extract_past_from_model_output (removed from transformers) and reads its KV cache "
               "as past_key_values, while transformers 5 generate passes it as cache: every token recomputes the "
               "whole sequence", present=_generation_uses_removed_api, cure=_generate_with_legacy_cache),
)


# ---------------------------------------------------------------------------------------------------------------
# Native conversion to GlmForCausalLM
# ---------------------------------------------------------------------------------------------------------------

# ChatGLMConfig.__init__'s defaults (chatglm2-6b and chatglm3-6b ship the same): what the model uses for a key
# config.json leaves out
_UPSTREAM_DEFAULTS: dict[str, Any] = {
    "num_layers": 28, "padded_vocab_size": 65024, "hidden_size": 4096, "ffn_hidden_size": 13696, "kv_channels": 128,
    "num_attention_heads": 32, "seq_length": 2048, "hidden_dropout": 0.0, "attention_dropout": 0.0,
    "layernorm_epsilon": 1e-5, "rmsnorm": True, "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True, "add_bias_linear": False, "add_qkv_bias": False, "multi_query_attention": False,
    "multi_query_group_num": 1, "fp32_residual_connection": False, "quantization_bit": 0, "pre_seq_len": None,
}


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    return {**_UPSTREAM_DEFAULTS, **config}


def _inexpressible(config: dict[str, Any]) -> str | None:
    """Why GlmForCausalLM cannot compute exactly what this checkpoint's code computes, or None."""
    if config.get("model_type") != "chatglm" or "multi_query_attention" not in config:
        return "not a ChatGLM2/3 config"  # ChatGLM-6B has no multi_query_attention key
    config = _with_defaults(config)
    heads, groups, head_dim = config["num_attention_heads"], _kv_heads(config), config["kv_channels"] or 0
    reasons = {
        "kv_channels null (upstream cannot build that model either)": not head_dim,
        "P-tuning prefix encoder (pre_seq_len)": config["pre_seq_len"] is not None,
        "quantized weights (quantization_bit)": bool(config["quantization_bit"]),
        "LayerNorm instead of RMSNorm": not config["rmsnorm"],
        "no final norm (post_layer_norm false)": not config["post_layer_norm"],
        "residual from the normed input": bool(config["apply_residual_connection_post_layernorm"]),
        "bias on the output and MLP projections": bool(config["add_bias_linear"]),
        "fp32 residual stream": bool(config["fp32_residual_connection"]),
        "hidden dropout": bool(config["hidden_dropout"]),
        "head size not a multiple of 4 (half-head interleaved rotary)": head_dim % 4 != 0,
        "heads not divisible into key/value groups": not groups or heads % groups != 0,
    }
    return next((reason for reason, applies in reasons.items() if applies), None)


def _kv_heads(config: dict[str, Any]) -> int:
    return config["multi_query_group_num"] if config["multi_query_attention"] else config["num_attention_heads"]


def _native_config(upstream: dict[str, Any]) -> dict[str, Any]:
    """GlmConfig fields for the same computation."""
    config = _with_defaults(upstream)
    native = {
        "architectures": ["GlmForCausalLM"],
        "model_type": "glm",
        "vocab_size": config["padded_vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["ffn_hidden_size"],
        "num_hidden_layers": config["num_layers"],
        "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": _kv_heads(config),
        "head_dim": config["kv_channels"],
        "hidden_act": "silu",
        "attention_bias": bool(config["add_qkv_bias"]),
        "attention_dropout": config["attention_dropout"],
        "rms_norm_eps": config["layernorm_epsilon"],
        "max_position_embeddings": config["seq_length"],
        # ChatGLM rotates kv_channels // 2 dims of each head, pairs interleaved: Glm's partial rotary does the same.
        # Long-context checkpoints (chatglm3-6b-32k, glm-4-9b) multiply the base by their config's rope_ratio.
        "rope_parameters": {"rope_type": "default", "rope_theta": _ROPE_BASE * (config.get("rope_ratio") or 1),
                            "partial_rotary_factor": 0.5},
        "tie_word_embeddings": False,  # ChatGLM's output_layer is its own Linear
        "use_cache": True,
        "pad_token_id": config.get("pad_token_id"),
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
    }
    dtype = config.get("torch_dtype") or config.get("dtype")
    if dtype:
        native["dtype"] = dtype
    return native


_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # [gate; up], as Glm's chunk(2) reads it
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_MODEL_RENAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "encoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def _split_qkv(tensor: Any, config: dict[str, Any]) -> tuple[Any, Any, Any]:
    """query_key_value rows (weight or bias) as q, k, v.

    Multi-query layout: all query heads, then the key groups, then the value groups. Without multi-query
    attention ChatGLM views the rows per head as [q; k; v] of head_dim each.
    """
    config = _with_defaults(config)
    head_dim, heads = config["kv_channels"], config["num_attention_heads"]
    if config["multi_query_attention"]:
        kv_rows = _kv_heads(config) * head_dim
        return tuple(part.clone() for part in tensor.split([heads * head_dim, kv_rows, kv_rows], dim=0))
    per_head = tensor.reshape(heads, 3, head_dim, *tensor.shape[1:])
    return tuple(per_head[:, part].reshape(heads * head_dim, *tensor.shape[1:]) for part in range(3))


def _native_tensors(name: str, tensor: Any, config: dict[str, Any]) -> dict[str, Any]:
    """One upstream tensor as GlmForCausalLM tensors."""
    short = name.removeprefix("transformer.")
    if short == "rotary_pos_emb.inv_freq":
        return {}  # recomputed by both implementations; upstream only reads its dtype
    if short in _MODEL_RENAMES:
        return {_MODEL_RENAMES[short]: tensor}
    layer = _LAYER.fullmatch(short)
    if layer is None:
        raise UserError(f"ChatGLM2/3 conversion: unexpected tensor {name!r} in the checkpoint; is it a "
                        "ChatGLM2/3 checkpoint? (pass --model_type if it was detected wrongly)")
    prefix, part = f"model.layers.{layer[1]}.", layer[2]
    if part in _LAYER_RENAMES:
        return {prefix + _LAYER_RENAMES[part]: tensor}
    fused = re.fullmatch(r"self_attention\.query_key_value\.(weight|bias)", part)
    if fused is None:
        raise UserError(f"ChatGLM2/3 conversion: unexpected tensor {name!r} in the checkpoint; is it a "
                        "ChatGLM2/3 checkpoint? (pass --model_type if it was detected wrongly)")
    q, k, v = _split_qkv(tensor, config)
    return {f"{prefix}self_attn.{proj}_proj.{fused[1]}": value for proj, value in zip("qkv", (q, k, v))}


# Upstream module names (what --lora_target_modules and the family row say) -> their converted counterparts
UPSTREAM_MODULE_NAMES: dict[str, tuple[str, ...]] = {
    "query_key_value": ("q_proj", "k_proj", "v_proj"),
    "dense": ("o_proj",),
    "dense_h_to_4h": ("gate_up_proj",),
    "dense_4h_to_h": ("down_proj",),
}

_CONVERSION = NativeConversion(architecture="GlmForCausalLM", config=_native_config, tensors=_native_tensors)


def native_conversion(config: dict[str, Any]) -> NativeConversion | None:
    """GlmForCausalLM for a ChatGLM2/3 checkpoint it computes exactly, else None (the fixed remote classes run)."""
    reason = _inexpressible(config)
    if reason is not None:
        logger.info("ChatGLM2/3 checkpoint kept on its own code (no exact native equivalent): %s", reason)
        return None
    return _CONVERSION
