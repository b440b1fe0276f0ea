"""Model-family registry and model loading.

One row per family: how to recognise it from ``config.json``, how to load it,
which modules LoRA targets by default, which prompt template it uses and how
its tokenizer's missing pad token is filled. Scripts never branch on a family
name; they read its row. Add a family by adding a row to ``FAMILIES``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .embedded import EMBEDDED_MODELS, resolve_embedded_model
from .errors import UserError, unknown_name
from .files import read_json_file
from .registry import build_registry
from .remote.convert import converted_from
from .templates import ChatTemplate, Template, get_template

logger = logging.getLogger(__name__)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class ModelFamily:
    """Everything the toolkit needs to know about one LLM family."""

    name: str
    config_model_types: tuple[str, ...]  # `model_type` values in config.json that mean this family
    lora_targets: tuple[str, ...]  # default --lora_target_modules
    ia3_targets: tuple[str, ...]  # IA3 rescales these (attention keys/values and the MLP's output)
    ia3_feedforward: tuple[str, ...]  # the subset of ia3_targets that are feed-forward layers
    # Bottleneck adapters (the fork's placements): sequential ones on the MLP, input side on the
    # `bottleneck_input_side` layers and output side on the rest; Pfeiffer on one output layer;
    # parallel ones beside the attention projections. One field per `targets` of the extension's placement
    # table (alpaca_cot_peft/tables.py PLACEMENTS): `bottleneck_<targets>`.
    bottleneck_sequential: tuple[str, ...]
    bottleneck_input_side: tuple[str, ...]
    bottleneck_pfeiffer: tuple[str, ...]
    bottleneck_parallel: tuple[str, ...]
    template: str = "alpaca"  # default --template (the original's, for every family)
    own_template: str | None = None  # the family's own chat format, a --template name
    model_class: str = "AutoModelForCausalLM"  # transformers class that loads it (the checkpoint's auto_map entry)
    trust_remote_code: bool = False  # the checkpoint ships its own modelling/tokenizer code
    use_fast_tokenizer: bool = True  # False: the family only has a slow (Python/SentencePiece) tokenizer
    pad_fallback: str = "unk"  # token used as pad when the tokenizer has none: unk | eos
    fp16_unstable: bool = False  # activations overflow in fp16: --compute_dtype fp16 becomes bf16 (or fp32)
    # Telling apart generations that share a model_type (ChatGLM 1/2/3, Baichuan 1/2):
    config_keys: tuple[str, ...] = ()  # keys config.json must have
    config_values: tuple[tuple[str, Any], ...] = ()  # (key, value) pairs config.json must have
    config_name_hint: str = ""  # config.json cannot tell: the checkpoint's name or path must contain this
    config_architectures: tuple[str, ...] = ()  # `architectures` entries, when model_type names no family
    answer_prefix: str = ""  # special tokens before every answer, in every template (ChatGLM-6B's [gMASK]<sop>)
    # Packed rows (--packing) hand the model restarting position ids and a 4D block-diagonal mask;
    # BLOOM's ALiBi reads positions from a 2D mask, and remote code brings its own attention code.
    packs_samples: bool = True
    # Remote-code families: the module of alpaca_cot.remote that converts the checkpoint to a native architecture
    # or fixes its classes in memory (see alpaca_cot/remote/fixes.py).
    remote_support: str = ""
    # The generic row: claims every model_type transformers' AutoModelForCausalLM loads natively that no other row
    # claims. Its target fields name roles (alpaca_cot/module_roles.py ROLES) found in the loaded model, and
    # resolve_family decides packs_samples from the model class.
    generic: bool = False


# Checkpoints that ship their own modelling and tokenizer code: opt-in, slow tokenizers, and no
# packed rows (their attention code takes a 2D padding mask only).
_REMOTE_CODE = {"trust_remote_code": True, "use_fast_tokenizer": False, "packs_samples": False}

# Module names shared by the LLaMA-style architectures (q/k/v/o attention, gated MLP).
_LLAMA_STYLE = {
    "lora_targets": ("q_proj", "v_proj"),
    "ia3_targets": ("k_proj", "v_proj", "down_proj"), "ia3_feedforward": ("down_proj",),
    "bottleneck_sequential": ("gate_proj", "up_proj", "down_proj"), "bottleneck_input_side": ("gate_proj", "up_proj"),
    "bottleneck_pfeiffer": ("down_proj",), "bottleneck_parallel": ("q_proj", "k_proj", "v_proj"),
}
# GLM (ChatGLM 1/2/3) and BLOOM: fused `query_key_value`, MLP dense_h_to_4h / dense_4h_to_h.
_GLM_STYLE = {
    "lora_targets": ("query_key_value",),
    "ia3_targets": ("query_key_value", "dense_4h_to_h"), "ia3_feedforward": ("dense_4h_to_h",),
    "bottleneck_sequential": ("dense_h_to_4h", "dense_4h_to_h"), "bottleneck_input_side": ("dense_h_to_4h",),
    "bottleneck_pfeiffer": ("dense_4h_to_h",), "bottleneck_parallel": ("query_key_value",),
}
_BAICHUAN_STYLE = {**_LLAMA_STYLE, "lora_targets": ("W_pack",), "ia3_targets": ("W_pack", "down_proj"),
                   "bottleneck_parallel": ("W_pack",)}

FAMILIES: dict[str, ModelFamily] = build_registry(
    "model family",
    # LLaMA 1/2/3, Vicuna, SmolLM: the original padded with id 0 (<unk>).
    ModelFamily(name="llama", config_model_types=("llama",), **_LLAMA_STYLE),
    ModelFamily(name="mistral", config_model_types=("mistral",), **_LLAMA_STYLE),
    ModelFamily(name="qwen2", config_model_types=("qwen2",), pad_fallback="eos", **_LLAMA_STYLE),
    ModelFamily(name="qwen3", config_model_types=("qwen3",), pad_fallback="eos", **_LLAMA_STYLE),
    ModelFamily(name="gemma", config_model_types=("gemma", "gemma2"), fp16_unstable=True, **_LLAMA_STYLE),
    ModelFamily(name="bloom", config_model_types=("bloom",), packs_samples=False, **_GLM_STYLE),
    # GLM-4 (native in transformers): fused gate/up projection.
    ModelFamily(name="glm4", config_model_types=("glm4",), lora_targets=("q_proj", "v_proj"),
                ia3_targets=("k_proj", "v_proj", "down_proj"), ia3_feedforward=("down_proj",),
                bottleneck_sequential=("gate_up_proj", "down_proj"), bottleneck_input_side=("gate_up_proj",),
                bottleneck_pfeiffer=("down_proj",), bottleneck_parallel=("q_proj", "k_proj", "v_proj"),
                pad_fallback="eos"),
    # Remote-code families: the checkpoint's own Python files define model and tokenizer (auto_map), so
    # --trust_remote_code is required. ChatGLM 1/2/3 all say model_type "chatglm"; v1 has 2D positions, v2/v3
    # multi-query attention and identical configs, so ChatGLM3 is told by its name.
    ModelFamily(name="chatglm", remote_support="chatglm",
                config_model_types=("chatglm",), config_keys=("position_encoding_2d",),
                config_architectures=("ChatGLMModel",), model_class="AutoModel", **_REMOTE_CODE,
                own_template="chatglm", answer_prefix="[gMASK]<sop>", **_GLM_STYLE),
    ModelFamily(name="chatglm2", remote_support="glm2",
                config_model_types=("chatglm",), config_keys=("multi_query_attention",),
                model_class="AutoModel", **_REMOTE_CODE, own_template="chatglm2", **_GLM_STYLE),
    ModelFamily(name="chatglm3", remote_support="glm2",
                config_model_types=("chatglm",), config_keys=("multi_query_attention",),
                config_name_hint="chatglm3", model_class="AutoModel", **_REMOTE_CODE,
                own_template="chatglm3", **_GLM_STYLE),
    # MOSS (CodeGen architecture): fused q/v/k `qkv_proj`, `out_proj`, MLP `fc_in`/`fc_out`. The original
    # README's q_proj/v_proj targets do not exist in MOSS. Its tokenizer has no pad: it pads with its EOS <eom>
    # (masked from the loss like every pad; <|endoftext|> is its BOS and UNK).
    ModelFamily(name="moss", remote_support="moss",
                config_model_types=("moss",), config_architectures=("MossForCausalLM",),
                lora_targets=("qkv_proj",), ia3_targets=("qkv_proj", "fc_out"), ia3_feedforward=("fc_out",),
                bottleneck_sequential=("fc_in", "fc_out"), bottleneck_input_side=("fc_in",),
                bottleneck_pfeiffer=("fc_out",), bottleneck_parallel=("qkv_proj",), **_REMOTE_CODE,
                pad_fallback="eos", own_template="moss"),
    ModelFamily(name="internlm", remote_support="internlm",
                config_model_types=("internlm",), config_architectures=("InternLMForCausalLM",),
                **{**_LLAMA_STYLE, "lora_targets": ("q_proj", "k_proj", "v_proj", "o_proj")},
                **_REMOTE_CODE, pad_fallback="eos", own_template="internlm"),
    # InternLM2 fuses q/k/v into `wqkv`; its MLP is w1 (gate), w3 (up), w2 (down).
    ModelFamily(name="internlm2", remote_support="internlm2",
                config_model_types=("internlm2",),
                config_architectures=("InternLM2ForCausalLM",), lora_targets=("wqkv", "wo"),
                ia3_targets=("wqkv", "w2"), ia3_feedforward=("w2",), bottleneck_sequential=("w1", "w3", "w2"),
                bottleneck_input_side=("w1", "w3"), bottleneck_pfeiffer=("w2",), bottleneck_parallel=("wqkv",),
                **_REMOTE_CODE, pad_fallback="eos", own_template="internlm2"),
    # Baichuan fuses q/k/v into `W_pack`; slow SentencePiece tokenizer. Baichuan2's vocabulary has 125,696
    # tokens (Baichuan-1's 64,000); its real configs have no key of their own.
    ModelFamily(name="baichuan", remote_support="baichuan",
                config_model_types=("baichuan",),
                config_architectures=("BaiChuanForCausalLM", "BaichuanForCausalLM"), **_BAICHUAN_STYLE,
                **_REMOTE_CODE, own_template="baichuan"),
    ModelFamily(name="baichuan2", remote_support="baichuan",
                config_model_types=("baichuan",), config_values=(("vocab_size", 125696),),
                **_BAICHUAN_STYLE, **_REMOTE_CODE, own_template="baichuan2"),
    # Any other causal LM transformers loads natively. The model types listed are those tests/test_generic_models.py
    # trains, reloads, generates and merges; the others are claimed at detection (native_causal_lm_types).
    # LoRA: every projection of the attention; IA3 and bottleneck adapters where the LLaMA rows put them.
    ModelFamily(name="generic", generic=True,
                config_model_types=("cohere", "deepseek_v3", "falcon", "gemma3_text", "gpt2", "gpt_neox", "granite",
                                    "mixtral", "olmo2", "phi3", "qwen2_moe", "stablelm", "starcoder2"),
                lora_targets=("attention",), ia3_targets=("attention_inputs", "feedforward_output"),
                ia3_feedforward=("feedforward_output",), bottleneck_sequential=("feedforward",),
                bottleneck_input_side=("feedforward_inputs",), bottleneck_pfeiffer=("feedforward_output",),
                bottleneck_parallel=("attention_inputs",)),
)


def get_family(name: str) -> ModelFamily:
    """Return the registry row for ``--model_type name``."""
    if name not in FAMILIES:
        raise unknown_name("model type", name, FAMILIES, "--model_type")
    return FAMILIES[name]


def resolve_model_path(name_or_path: str) -> str:
    """Turn ``--model_name_or_path`` into something ``from_pretrained`` accepts.

    Embedded model names become their cached local copy; local folders must hold a
    ``config.json``; anything else that looks like ``owner/name`` is a hub id.
    """
    if name_or_path in EMBEDDED_MODELS:
        return str(resolve_embedded_model(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"--model_name_or_path: {path} has no config.json; point it at a "
                "transformers checkpoint folder (or a merged model)"
            )
        return str(path)
    if path.exists() or not _HUB_ID.fullmatch(name_or_path):
        raise UserError(
            f"--model_name_or_path: {name_or_path} does not exist (not a local checkpoint folder "
            f"nor a hub id owner/name); embedded models: {', '.join(EMBEDDED_MODELS)}"
        )
    return name_or_path


def read_model_config(model_path: str) -> dict[str, Any]:
    """Read the raw ``config.json`` of a local folder or hub id, without running any remote code."""
    return read_checkpoint_json(model_path, "config.json")


def read_checkpoint_json(model_path: str, filename: str, required: bool = True) -> dict[str, Any]:
    """A JSON file of a local checkpoint folder or hub id (``{}`` when absent and not ``required``)."""
    local = Path(model_path) / filename
    if local.is_file():
        return read_json_file(local, "--model_name_or_path", "the checkpoint is damaged: fetch that file again")
    if Path(model_path).is_dir():
        if not required:
            return {}
        raise UserError(f"--model_name_or_path: {model_path} has no {filename}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(model_path, filename)).read_text(encoding="utf-8"))
    except EntryNotFoundError as exc:
        if not required:
            return {}
        raise UserError(f"--model_name_or_path: {model_path!r} has no {filename}") from exc
    except Exception as exc:  # offline, unknown repo, gated repo: all user-fixable
        raise UserError(
            f"--model_name_or_path: cannot read {filename} of {model_path!r} "
            f"({type(exc).__name__}); check the id, your network, or use a local folder"
        ) from exc


def detect_family(model_config: dict[str, Any], model_path: str) -> ModelFamily:
    """The family of a checkpoint from its ``config.json``: ``model_type`` (else ``architectures``), then the
    rows' ``config_keys`` and name hints; the most specific matching row wins. Our native copy of a remote-code
    checkpoint names the family it came from. A ``model_type`` no row claims that transformers loads natively
    gets the generic row."""
    converted = converted_from(model_config)
    if converted and converted.get("family") in FAMILIES:
        return FAMILIES[converted["family"]]
    model_type = str(model_config.get("model_type", ""))
    architectures = set(model_config.get("architectures") or [])
    name = f"{model_path} {model_config.get('_name_or_path', '')}".lower()
    by_type = [f for f in FAMILIES.values() if model_type in f.config_model_types]
    if not by_type:
        by_type = [f for f in FAMILIES.values() if architectures & set(f.config_architectures)]
    if not by_type and model_type in native_causal_lm_types():
        by_type = [f for f in FAMILIES.values() if f.generic]
    candidates = [f for f in by_type if all(key in model_config for key in f.config_keys)
                  and all(model_config.get(key) == value for key, value in f.config_values)
                  and (not f.config_name_hint or f.config_name_hint in name)]
    if not candidates:
        raise UserError(
            f"cannot tell the model family of {model_path} (config.json model_type {model_type!r}); "
            f"pass --model_type, one of: {', '.join(FAMILIES)}"
        )
    return max(candidates, key=lambda f: (len(f.config_keys) + len(f.config_values), bool(f.config_name_hint)))


def check_remote_code(family: ModelFamily, trust_remote_code: bool, model_path: str = "") -> None:
    """Refuse a family whose checkpoints run their own Python code unless the user allowed it."""
    if family.trust_remote_code and not trust_remote_code:
        where = f" ({model_path})" if model_path else ""
        raise UserError(
            f"{family.name} models run Python code shipped inside the checkpoint{where} to build the model and "
            "tokenizer; pass --trust_remote_code to allow it if you trust that checkpoint's source"
        )


def resolve_family(model_type: str | None, model_path: str, trust_remote_code: bool | None = None) -> ModelFamily:
    """``--model_type`` if given, else the family detected from the checkpoint.

    With ``trust_remote_code`` given, a family that needs remote code is refused here, before anything loads.
    """
    model_config = None if model_type else read_model_config(model_path)
    family = get_family(model_type) if model_type else detect_family(model_config, model_path)
    if trust_remote_code is not None:
        check_remote_code(family, trust_remote_code, model_path)
    if family.generic:
        family = _generic_row_for(family, model_config or read_model_config(model_path))
    return family


def native_causal_lm_types() -> frozenset[str]:
    """``model_type`` values transformers' ``AutoModelForCausalLM`` loads without remote code as a decoder.

    Encoders with a causal-LM head (BERT, RoBERTa, ...) are left out: loaded that way without ``is_decoder`` they
    attend both ways and would learn to copy the tokens they predict.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - frozenset(MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def native_causal_lm_class(model_type: str) -> Any:
    """The transformers class ``AutoModelForCausalLM`` builds for ``model_type``, or None (remote code)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name, None) if name else None


def _generic_row_for(family: ModelFamily, model_config: dict[str, Any]) -> ModelFamily:
    """The generic row for one checkpoint: packed rows only for a model class whose attention goes through
    transformers' attention interface (which takes the collator's 4D mask and restarting position ids as
    they are); the others (e.g. Falcon's, StableLM's own attention code) train unpacked."""
    model_type = str(model_config.get("model_type", ""))
    model_class = native_causal_lm_class(model_type)
    packs = bool(getattr(model_class, "_supports_attention_backend", False))
    class_name = model_class.__name__ if model_class else "no native class"
    logger.info("model_type %r has no family row of its own: using the generic row (%s; adapter targets found in "
                "the model's attention and feed-forward modules; %s)", model_type, class_name,
                "packs samples" if packs else "no packing: its attention code takes no 4D mask")
    return dataclasses.replace(family, packs_samples=packs)


def resolve_template(name: str | None, family: ModelFamily) -> Template | ChatTemplate:
    """``--template name`` (default: the family's) with the family's answer prefix put before every answer."""
    template = get_template(name or family.template)
    if family.answer_prefix and isinstance(template, Template):
        prefix = family.answer_prefix
        template = dataclasses.replace(template, single_turn=template.single_turn + prefix,
                                       single_turn_with_input=template.single_turn_with_input + prefix,
                                       user_turn=template.user_turn + prefix)
    return template


def fill_pad_token(tokenizer: Any, family: ModelFamily) -> None:
    """Give the tokenizer a pad token if it lacks one; pads are always masked from the loss."""
    if tokenizer.pad_token_id is not None:
        return
    if family.pad_fallback == "unk" and tokenizer.unk_token_id is not None:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        raise UserError(f"the {family.name} tokenizer has no pad, unk or eos token to pad with")


def load_tokenizer(model_path: str, family: ModelFamily, trust_remote_code: bool = False) -> Any:
    """Load the tokenizer of ``model_path`` with the family's settings."""
    from transformers import AutoTokenizer

    check_remote_code(family, trust_remote_code, model_path)
    if family.remote_support:
        from .remote import load_remote_tokenizer

        tokenizer = load_remote_tokenizer(model_path, family)
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            model_path, use_fast=family.use_fast_tokenizer, trust_remote_code=trust_remote_code
        )
    fill_pad_token(tokenizer, family)
    return tokenizer


# --quantization_bit -> the BitsAndBytesConfig keywords of that width, given the compute dtype
QUANTIZATIONS: dict[int, Callable[[Any], dict[str, Any]]] = {
    4: lambda compute_dtype: {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                              "bnb_4bit_compute_dtype": compute_dtype},  # NF4, double-quantized (QLoRA's)
    8: lambda compute_dtype: {"load_in_8bit": True, "llm_int8_threshold": 6.0},
}


def _quantization_config(quantization_bit: int | None, compute_dtype: Any) -> Any:
    if quantization_bit is None:
        return None
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise UserError("--quantization_bit needs bitsandbytes: `pip install bitsandbytes`") from exc
    return BitsAndBytesConfig(**QUANTIZATIONS[quantization_bit](compute_dtype))


def load_model(
    model_path: str,
    family: ModelFamily,
    dtype: Any,
    quantization_bit: int | None = None,
    device_map: Any = None,
    trust_remote_code: bool = False,
) -> Any:
    """Load the model of ``model_path`` with the family's loader class."""
    import transformers
    from safetensors import SafetensorError

    check_remote_code(family, trust_remote_code, model_path)
    loader = getattr(transformers, family.model_class)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    quantization = _quantization_config(quantization_bit, dtype)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        if family.remote_support:
            from .remote import load_remote_model

            model = load_remote_model(model_path, family, kwargs)
        else:
            model = loader.from_pretrained(model_path, **kwargs)
    except OSError as exc:  # missing weights, offline hub, bad folder
        raise UserError(f"--model_name_or_path: cannot load {model_path}: {str(exc).splitlines()[0]}") from exc
    except SafetensorError as exc:  # a truncated or corrupt download
        files = ", ".join(sorted(p.name for p in Path(model_path).glob("*.safetensors"))) or "its .safetensors files"
        raise UserError(f"--model_name_or_path: the weights in {model_path} ({files}) are unreadable ({exc}); the "
                        "download is truncated or corrupt: fetch it again") from exc
    check_finite_tensors(model, model_path)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)
    return model


def check_finite_tensors(model: Any, model_path: str) -> None:
    """Stop on a loaded weight holding NaN or inf, or a buffer holding NaN, naming it: training on one only
    spreads it. Checked in slices of 16M values, so the check's own mask stays small beside a large embedding."""
    import itertools

    import torch

    named = itertools.chain((("weight", *item) for item in model.named_parameters()),
                            (("buffer", *item) for item in model.named_buffers()))
    for kind, name, tensor in named:
        if not tensor.is_floating_point() or tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        # a buffer may be a mask holding -inf on purpose; NaN is never meant
        bad_values = (lambda part: ~torch.isfinite(part)) if kind == "weight" else torch.isnan
        bad = sum(int(bad_values(part).sum()) for part in flat.split(1 << 24))
        if bad:
            raise UserError(f"--model_name_or_path: {model_path}: {kind} {name} holds {bad} non-finite value(s) "
                            "(NaN or inf) after loading; the checkpoint is corrupt or overflowed when it was saved: "
                            "re-download or re-convert it")


def _contiguous_input(module: Any, args: tuple) -> tuple | None:
    """Give the output head a contiguous input.

    transformers slices the last position (``hidden[:, -1:, :]``) for generation and ``logits_to_keep``;
    on that strided 3D view torch's CPU bf16 matmul expands the weight once per batch row: 50 prompts
    against a 49k-token vocabulary cost 2.8 GB. The copy of the slice costs nothing.
    """
    if args and hasattr(args[0], "is_contiguous") and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def linear_module_names(model: Any) -> list[str]:
    """Short names of the Linear layers of ``model`` (what --lora_target_modules may name)."""
    import torch

    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)
