"""The Trainer's settings from a run plan: ``TrainingArguments``, reporting backends, the batch collator."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import DataCollatorForSeq2Seq

from ..data import IGNORE_INDEX
from ..errors import UserError
from .attention import PackedCollator
from .distributed import is_main_process, parallel_training_arguments
from .plan import RunPlan

logger = logging.getLogger(__name__)


def configure_reporting(report_to: str, output_dir: Path) -> list[str]:
    """The Trainer's ``report_to`` for ``--report_to``; wandb logs offline when no login exists (never prompts)."""
    if report_to == "none" or not is_main_process():
        return []
    if report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise UserError("--report_to wandb needs wandb: `pip install wandb`, or pass --report_to none") from exc
        netrc = Path.home() / ".netrc"
        logged_in = os.environ.get("WANDB_API_KEY") or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
        if not logged_in and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"  # never block a run on a login prompt
            logger.info("wandb: no API key, logging offline to %s (sync later with `wandb sync`)", output_dir)
        os.environ.setdefault("WANDB_DIR", str(output_dir))
        os.environ.setdefault("WANDB_PROJECT", "alpaca-cot")
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError as exc:
            raise UserError("--report_to tensorboard needs `pip install tensorboard`") from exc
    return [report_to]


def training_arguments(plan: RunPlan, total_steps: int, has_validation: bool, report_to: list[str]) -> Any:
    """Trainer settings from the plan; intervals scale with the run so small data never gets a 0 interval."""
    from transformers import TrainingArguments

    flags = plan.flags
    interval = flags.save_steps or max(1, total_steps // 10)
    return TrainingArguments(
        output_dir=str(plan.output_dir),
        per_device_train_batch_size=flags.per_gpu_train_batch_size,
        per_device_eval_batch_size=flags.per_gpu_train_batch_size,
        gradient_accumulation_steps=flags.gradient_accumulation_steps,
        num_train_epochs=flags.epochs,
        max_steps=flags.max_steps,
        learning_rate=flags.learning_rate,
        warmup_steps=min(100, total_steps // 10),
        lr_scheduler_type="linear",
        logging_steps=flags.logging_steps or max(1, min(10, total_steps // 50)),
        save_strategy="steps",
        save_steps=interval,
        save_total_limit=None,  # CheckpointCommitCallback rotates, after a checkpoint is complete
        eval_strategy="steps" if has_validation else "no",
        eval_steps=interval if has_validation else None,
        load_best_model_at_end=has_validation,
        metric_for_best_model="eval_loss" if has_validation else None,
        fp16=plan.precision.trainer_fp16,
        bf16=plan.precision.trainer_bf16,
        # packed rows are all about full: grouping by length only helps padded batches
        train_sampling_strategy="group_by_length" if flags.group_by_length and not plan.packing else "random",
        torch_compile=flags.torch_compile,
        use_cpu=not plan.on_cuda,
        seed=flags.seed,
        data_seed=flags.seed,
        report_to=report_to,
        disable_tqdm=True,  # LossProgressCallback draws the one bar
        remove_unused_columns=False,
        ddp_find_unused_parameters=False if plan.world_size > 1 else None,
        log_level="warning" if is_main_process() else "error",
        **parallel_training_arguments(flags),
    )


def batch_collator(tokenizer: Any, model: Any, packing: bool, on_cuda: bool) -> Any:
    """Packed rows: boundaries kept by the attention backend's own means; otherwise pad each batch."""
    if packing:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return PackedCollator(pad_id if pad_id is not None else 0, model.config._attn_implementation,
                              pad_to_multiple_of=8 if on_cuda else None)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                  pad_to_multiple_of=8 if on_cuda else None)
