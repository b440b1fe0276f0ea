"""MOSS (fnlp/moss-moon-003-*): a CodeGen model under another name, converted once to native CodeGenForCausalLM.

MOSS's modelling file is Salesforce CodeGen's: the same fused ``qkv_proj`` split across CodeGen's 4 TPU shards
(per shard: query, value, key), partial GPT-J rotary on the first ``rotary_dim`` channels of each head from a
sinusoid table of ``n_positions`` rows, a parallel attention + MLP block under one ``ln_1``, gelu_new MLP with
biases, projections without biases, an untied ``lm_head`` with a bias. transformers' CodeGen has every one of
those, under the same parameter names, so the conversion is a rename of the config and the dropping of the
causal-mask buffers; LoRA / IA3 / bottleneck targets (``qkv_proj``, ``out_proj``, ``fc_in``, ``fc_out``) keep
their names. The checkpoint's own classes, fixed in memory below, remain the reference the conversion is tested
against.

MOSS's GPTQ uploads (``wbits`` 4 or 8 in config.json, e.g. moss-moon-003-sft-int8) hold packed integer weights
that only upstream's triton CUDA kernels run; :func:`native_conversion` refuses them with the way out.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from ..errors import UserError
from .fixes import Fix, NativeConversion

IMPORT_FIXES: tuple[Fix, ...] = ()

# config.json keys of MOSS that mean the same in transformers' CodeGenConfig
_SHARED_CONFIG_KEYS = ("vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head", "rotary_dim", "n_inner",
                       "activation_function", "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon",
                       "initializer_range", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id")
_FLOAT_WBITS = 32  # MossConfig's default: unquantised weights
# MossAttention's buffer: the lower-triangular mask CodeGen stored per layer (native CodeGen builds its own)
_DROPPED_TENSOR_SUFFIXES = (".attn.causal_mask", ".attn.masked_bias")


def _upstream(model_class: type, name: str) -> Any:
    """A class or function of the checkpoint's own modelling file (the module ``model_class`` comes from)."""
    return getattr(sys.modules[model_class.__module__], name)


# --- get_head_mask: removed from PreTrainedModel in transformers 5, called by MossModel.forward ----------------

def _head_mask_missing(model_class: type) -> bool:
    return not hasattr(_upstream(model_class, "MossModel"), "get_head_mask")


def _layer_head_masks(self: Any, head_mask: Any, num_hidden_layers: int) -> Any:
    """One head mask per layer, shaped to multiply (batch, heads, query, key) attention weights; None when unset
    (what transformers 4's ``get_head_mask`` returned)."""
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:  # (heads,): the same mask on every layer
        head_mask = head_mask.expand(num_hidden_layers, -1)
    return head_mask[:, None, :, None, None].to(self.dtype)


def _add_get_head_mask(model_class: type) -> None:
    _upstream(model_class, "MossModel").get_head_mask = _layer_head_masks


# --- tensors MossAttention makes in __init__ as plain attributes: from_pretrained leaves them on the meta device

_PLAIN_TENSOR_ATTRIBUTES = ("self.embed_positions = ", "self.scale_attn = ")


def _plain_tensors_in_attention(model_class: type) -> bool:
    attention_init = inspect.getsource(_upstream(model_class, "MossAttention").__init__)
    return any(assignment in attention_init for assignment in _PLAIN_TENSOR_ATTRIBUTES)


def _rebuild_plain_tensors_on_first_forward(model_class: type) -> None:
    import torch

    attention = _upstream(model_class, "MossAttention")
    create_table = _upstream(model_class, "create_sinusoidal_positions")
    upstream_forward = attention.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.embed_positions.is_meta:
            max_positions = self.causal_mask.shape[-1]
            self.embed_positions = create_table(max_positions, self.rotary_dim or self.embed_dim)
        if self.scale_attn.is_meta:  # upstream rounds sqrt(head_dim) to the dtype the model is built in
            head_dim = torch.tensor(self.head_dim, dtype=torch.float32)
            self.scale_attn = torch.sqrt(head_dim).to(self.qkv_proj.weight.dtype)
        return upstream_forward(self, *args, **kwargs)

    attention.forward = forward


# --- causal_mask: a persistent buffer whose value only __init__ sets ----------------------------------------

def _mask_not_initialised(model_class: type) -> bool:
    return "causal_mask" not in inspect.getsource(_upstream(model_class, "MossPreTrainedModel")._init_weights)


def _initialise_causal_mask(model_class: type) -> None:
    import torch
    from transformers import initialization

    pretrained = _upstream(model_class, "MossPreTrainedModel")
    attention = _upstream(model_class, "MossAttention")
    upstream_init = pretrained._init_weights

    def _init_weights(self: Any, module: Any) -> None:
        upstream_init(self, module)
        if isinstance(module, attention):
            size = module.causal_mask.shape[-1]
            lower_triangle = torch.ones(size, size, dtype=torch.bool, device=module.causal_mask.device).tril()
            initialization.copy_(module.causal_mask, lower_triangle.view(1, 1, size, size))  # skipped when loaded

    pretrained._init_weights = _init_weights


MODEL_FIXES: tuple[Fix, ...] = (
    Fix(defect="MossModel.forward calls self.get_head_mask, which transformers 5 removed (AttributeError)",
        present=_head_mask_missing, cure=_add_get_head_mask),
    Fix(defect="MossAttention keeps tensors made in __init__ (rotary sin/cos table, attention scale) as plain "
               "attributes: transformers 5 builds models on the meta device, so from_pretrained leaves them there "
               "(forward fails: 'Tensor on device meta is not on the expected device cpu')",
        present=_plain_tensors_in_attention, cure=_rebuild_plain_tensors_on_first_forward),
    Fix(defect="MossAttention.causal_mask is set only in __init__: from a checkpoint that does not store it "
               "(upstream lists it as ignorable) transformers 5 leaves it uninitialised, all False, so every "
               "token silently attends to the whole sequence, future included",
        present=_mask_not_initialised, cure=_initialise_causal_mask),
)


# --- the native conversion -----------------------------------------------------------------------------------

def _refuse_quantized(config: dict[str, Any]) -> None:
    wbits = config.get("wbits", _FLOAT_WBITS)
    if wbits != _FLOAT_WBITS:
        raise UserError(
            f"--model_name_or_path: this MOSS checkpoint is GPTQ-quantised (config.json wbits={wbits}, e.g. "
            "moss-moon-003-sft-int8/-int4): its packed integer weights run only on upstream's triton CUDA kernels, "
            "its loader turns torch.nn.init into no-ops for the whole process, and PEFT has no adapter for its "
            "custom QuantLinear layers. Use the float checkpoint (fnlp/moss-moon-003-sft or -base), with "
            "--quantization_bit 8 or 4 for a smaller memory footprint")


def _native_config(config: dict[str, Any]) -> dict[str, Any]:
    native = {key: config[key] for key in _SHARED_CONFIG_KEYS if key in config}
    dtype = config.get("dtype") or config.get("torch_dtype")
    return {**native, "model_type": "codegen", "architectures": ["CodeGenForCausalLM"],
            # MOSS's lm_head is its own matrix (with a bias); CodeGen's class would tie it to wte by default
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
            **({"dtype": dtype} if dtype else {})}


def _native_tensors(name: str, tensor: Any, config: dict[str, Any]) -> dict[str, Any]:
    if name.endswith(_DROPPED_TENSOR_SUFFIXES):
        return {}
    return {name: tensor}  # same module tree and names, same fused qkv layout


def native_conversion(config: dict[str, Any]) -> NativeConversion | None:
    """CodeGenForCausalLM for a float MOSS checkpoint with this config.json. Raises :class:`UserError` for a
    GPTQ-quantised one (``wbits`` 4 or 8): nothing here can run or train it, natively or through its own code."""
    _refuse_quantized(config)
    return NativeConversion(architecture="CodeGenForCausalLM", config=_native_config, tensors=_native_tensors)
