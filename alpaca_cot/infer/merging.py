"""Fold an adapter into its base model and save a plain transformers checkpoint.

Methods whose update is a linear change of existing weights (LoRA, AdaLoRA, IA3, ...)
fold in; prompt-learning methods (prompt, p-tuning, prefix) add inputs rather than
change weights, so they are refused with a one-line reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import check_new_folder, save_pretrained_atomic
from ..run_folder import read_run_manifest
from .loading import load_for_inference

logger = logging.getLogger(__name__)

# Largest max-abs logit difference accepted between merged and base + adapter, by compute dtype.
MERGE_TOLERANCE = {"torch.float32": 1e-3, "torch.bfloat16": 0.25, "torch.float16": 0.05}


@dataclass
class MergeResult:
    """Where the merged model went and how closely it matches base + adapter."""

    path: Path
    max_logit_difference: float
    tolerance: float


def merge_adapter(
    lora_dir: str,
    merged_dir: str,
    model_name_or_path: str | None = None,
    model_type: str | None = None,
    trust_remote_code: bool = False,
) -> MergeResult:
    """Merge ``lora_dir`` into its base and write model + tokenizer to ``merged_dir`` (atomically)."""
    target = Path(merged_dir)
    check_new_folder("--merged_dir", target)
    if read_run_manifest(Path(lora_dir)).get("saved") == "model":
        raise UserError(f"--lora_dir: {lora_dir} is already a whole fine-tuned model (full/freeze run); "
                        f"use it directly with --model_name_or_path {lora_dir}")
    # Merging needs full-precision weights: a 4/8-bit base is reloaded unquantized.
    loaded = load_for_inference(lora_dir, model_name_or_path, model_type, trust_remote_code=trust_remote_code,
                                quantized=False)
    config = loaded.model.peft_config["default"]
    if config.is_prompt_learning:
        raise UserError(
            f"--lora_dir: a {config.peft_type.value} adapter adds virtual tokens instead of changing weights, "
            "so it cannot be folded into the base; serve it with --lora_dir instead"
        )
    if not getattr(config, "mergeable", True):
        raise UserError(
            f"--lora_dir: a {config.peft_type.value} adapter is non-linear in its input, so it cannot be folded "
            "into the base weights; serve it with --lora_dir instead"
        )
    probe = _probe_ids(loaded)
    weights_dtype = next(loaded.model.parameters()).dtype  # bf16 on a GPU: its rounding sets the tolerance
    expected = _logits(loaded.model, probe)
    model = loaded.model.merge_and_unload()
    difference = (_logits(model, probe) - expected).abs().max().item()
    tolerance = MERGE_TOLERANCE[str(weights_dtype)]
    if not difference <= tolerance:  # also catches NaN
        raise RuntimeError(f"merged model disagrees with base + adapter: max logit difference {difference:.3g} "
                           f"> {tolerance:g}; nothing was saved")
    save_pretrained_atomic(model, loaded.tokenizer, target)  # the original forgot the tokenizer
    logger.info("merged %s into %s -> %s", lora_dir, loaded.base_model, target)
    return MergeResult(target, difference, tolerance)


def _probe_ids(loaded: Any) -> Any:
    import torch

    ids = loaded.tokenizer("Below is an instruction. Merging must not change a single answer.")["input_ids"]
    return torch.tensor([ids], device=next(loaded.model.parameters()).device)


def _logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()
