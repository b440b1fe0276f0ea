"""Model-family registry and model loading.

One row per family: how to recognise it from ``config.json``, how to load it,
which modules LoRA targets by default, which prompt template it uses and how
its tokenizer's missing pad token is filled. Scripts never branch on a family
name; they read its row. Add a family by adding a row to ``FAMILIES``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .embedded import EMBEDDED_MODELS, resolve_embedded_model
from .errors import UserError, unknown_name
from .registry import build_registry

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
    # parallel ones beside the attention projections.
    bottleneck_sequential: tuple[str, ...]
    bottleneck_input_side: tuple[str, ...]
    bottleneck_pfeiffer: tuple[str, ...]
    bottleneck_parallel: tuple[str, ...]
    template: str = "alpaca"  # default --template
    model_class: str = "AutoModelForCausalLM"  # transformers class that loads it
    trust_remote_code: bool = False  # the checkpoint ships its own modelling code
    use_fast_tokenizer: bool = True
    pad_fallback: str = "unk"  # token used as pad when the tokenizer has none: unk | eos
    fp16_unstable: bool = False  # activations overflow in fp16: --compute_dtype fp16 becomes bf16 (or fp32)



# Module names shared by the LLaMA-style architectures (q/k/v/o attention, gated MLP).
_LLAMA_STYLE = {
    "lora_targets": ("q_proj", "v_proj"),
    "ia3_targets": ("k_proj", "v_proj", "down_proj"), "ia3_feedforward": ("down_proj",),
    "bottleneck_sequential": ("gate_proj", "up_proj", "down_proj"), "bottleneck_input_side": ("gate_proj", "up_proj"),
    "bottleneck_pfeiffer": ("down_proj",), "bottleneck_parallel": ("q_proj", "k_proj", "v_proj"),
}

FAMILIES: dict[str, ModelFamily] = build_registry(
    "model family",
    # LLaMA 1/2/3, Vicuna, SmolLM: the original padded with id 0 (<unk>).
    ModelFamily(name="llama", config_model_types=("llama",), **_LLAMA_STYLE),
    ModelFamily(name="mistral", config_model_types=("mistral",), **_LLAMA_STYLE),
    ModelFamily(name="qwen2", config_model_types=("qwen2",), pad_fallback="eos", **_LLAMA_STYLE),
    ModelFamily(name="qwen3", config_model_types=("qwen3",), pad_fallback="eos", **_LLAMA_STYLE),
    ModelFamily(name="gemma", config_model_types=("gemma", "gemma2"), fp16_unstable=True, **_LLAMA_STYLE),
    ModelFamily(name="bloom", config_model_types=("bloom",), lora_targets=("query_key_value",),
                ia3_targets=("query_key_value", "dense_4h_to_h"), ia3_feedforward=("dense_4h_to_h",),
                bottleneck_sequential=("dense_h_to_4h", "dense_4h_to_h"), bottleneck_input_side=("dense_h_to_4h",),
                bottleneck_pfeiffer=("dense_4h_to_h",), bottleneck_parallel=("query_key_value",)),
    # GLM-4 (native in transformers): fused gate/up projection.
    ModelFamily(name="glm4", config_model_types=("glm4",), lora_targets=("q_proj", "v_proj"),
                ia3_targets=("k_proj", "v_proj", "down_proj"), ia3_feedforward=("down_proj",),
                bottleneck_sequential=("gate_up_proj", "down_proj"), bottleneck_input_side=("gate_up_proj",),
                bottleneck_pfeiffer=("down_proj",), bottleneck_parallel=("q_proj", "k_proj", "v_proj"),
                pad_fallback="eos"),
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
    local = Path(model_path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text(encoding="utf-8"))
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(model_path, "config.json")).read_text(encoding="utf-8"))
    except Exception as exc:  # offline, unknown repo, gated repo: all user-fixable
        raise UserError(
            f"--model_name_or_path: cannot read config.json of {model_path!r} "
            f"({type(exc).__name__}); check the id, your network, or use a local folder"
        ) from exc


def detect_family(model_config: dict[str, Any], model_path: str) -> ModelFamily:
    """Pick the family whose ``config_model_types`` contains the checkpoint's ``model_type``."""
    model_type = str(model_config.get("model_type", ""))
    for family in FAMILIES.values():
        if model_type in family.config_model_types:
            return family
    raise UserError(
        f"cannot tell the model family of {model_path} (config.json model_type {model_type!r}); "
        f"pass --model_type, one of: {', '.join(FAMILIES)}"
    )


def resolve_family(model_type: str | None, model_path: str) -> ModelFamily:
    """``--model_type`` if given, else the family detected from the checkpoint."""
    if model_type:
        return get_family(model_type)
    return detect_family(read_model_config(model_path), model_path)


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

    tokenizer = AutoTokenizer.from_pretrained(
        model_path, use_fast=family.use_fast_tokenizer, trust_remote_code=trust_remote_code
    )
    fill_pad_token(tokenizer, family)
    return tokenizer


def _quantization_config(quantization_bit: int | None, compute_dtype: Any) -> Any:
    if quantization_bit is None:
        return None
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise UserError("--quantization_bit needs bitsandbytes: `pip install bitsandbytes`") from exc
    if quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


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

    if family.trust_remote_code and not trust_remote_code:
        raise UserError(
            f"{family.name} models run Python code shipped in the checkpoint; "
            "pass --trust_remote_code if you trust its source"
        )
    loader = getattr(transformers, family.model_class)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    quantization = _quantization_config(quantization_bit, dtype)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return loader.from_pretrained(model_path, **kwargs)
    except OSError as exc:  # missing weights, offline hub, bad folder
        raise UserError(f"--model_name_or_path: cannot load {model_path}: {str(exc).splitlines()[0]}") from exc


def linear_module_names(model: Any) -> list[str]:
    """Short names of the Linear layers of ``model`` (what --lora_target_modules may name)."""
    import torch

    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)
