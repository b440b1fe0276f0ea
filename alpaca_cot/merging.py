"""Fold an adapter into its base model and save a plain transformers checkpoint.

Methods whose update is a linear change of existing weights (LoRA, AdaLoRA, IA3, ...)
fold in; prompt-learning methods (prompt, p-tuning, prefix) add inputs rather than
change weights, so they are refused with a one-line reason.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError
from .inference import load_for_inference

logger = logging.getLogger(__name__)


def merge_adapter(
    lora_dir: str,
    merged_dir: str,
    model_name_or_path: str | None = None,
    model_type: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Merge ``lora_dir`` into its base and write model + tokenizer to ``merged_dir`` (atomically)."""
    target = Path(merged_dir)
    if target.exists() and any(target.iterdir()):
        raise UserError(f"--merged_dir: {target} exists and is not empty; choose a new folder")
    # Merging needs full-precision weights: a 4/8-bit base is reloaded unquantized.
    loaded = load_for_inference(lora_dir, model_name_or_path, model_type, trust_remote_code=trust_remote_code,
                                quantized=False)
    config = loaded.model.peft_config["default"]
    if config.is_prompt_learning:
        raise UserError(
            f"--lora_dir: a {config.peft_type.value} adapter adds virtual tokens instead of changing weights, "
            "so it cannot be folded into the base; serve it with --lora_dir instead"
        )
    model = loaded.model.merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)  # the original forgot the tokenizer
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("merged %s into %s -> %s", lora_dir, loaded.base_model, target)
    return target
