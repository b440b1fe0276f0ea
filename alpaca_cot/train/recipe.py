"""The training recipe behind ``uniform_finetune.py``, in phases over a :class:`~.plan.RunPlan`.

``run_finetune(plan)``: tokenize the data (``prepare_train_set``), load and wrap the model with the chosen
PEFT method (``build_model``), set up the transformers ``Trainer`` (``build_trainer``), train, then save the
adapter, tokenizer and the run's manifest atomically into the output folder (``finish_run``).
"""

from __future__ import annotations

import logging
import math
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from transformers import TrainerCallback

from .. import __version__
from ..data import DataOptions, PreparedData, prepare_data
from ..data.packing import pack_dataset, packing_efficiency
from ..files import write_json_atomic
from ..infer.loading import LoadedModel
from ..infer.scoring import ExactMatch, exact_match
from ..models import load_model, load_tokenizer
from ..run_folder import RUN_MANIFEST, disk_full_explained, save_run_folder
from .arguments import batch_collator, configure_reporting, training_arguments
from .attention import PER_SAMPLE_ATTENTION, use_per_sample_attention
from .callbacks import AdaLoraBudgetCallback, LossProgressCallback
from .checkpoints import CheckpointCommitCallback
from .cpu_adapters import adapter_input_casts_off, use_bits_dropout
from .distributed import device_map_for, explain_peer_failure, gathered_state_dict, join_process_group
from .plan import RunPlan
from .resume import ResumableTrainer

logger = logging.getLogger(__name__)


@dataclass
class TrainSet:
    """The tokenized data a run trains on, and the step arithmetic it implies."""

    data: PreparedData
    train: Any  # packed rows, or the tokenized examples
    rows: int | None  # rows (or examples) per epoch; None for a stream
    total_steps: int

    @property
    def has_validation(self) -> bool:
        """Whether a validation split exists (``--val_set_size``)."""
        return self.data.validation is not None and len(self.data.validation) > 0


@dataclass
class BuiltModel:
    """The model ready to train, with what was measured while building it."""

    model: Any
    trainable_params: int
    total_params: int
    gradient_checkpointing: bool
    heldout_before: ExactMatch | None


def load_training_tokenizer(plan: RunPlan) -> Any:
    """The base model's tokenizer, padding on the right (generation pads its own batches left)."""
    tokenizer = load_tokenizer(plan.model_path, plan.family, plan.flags.trust_remote_code)
    tokenizer.padding_side = "right"
    return tokenizer


def prepare_train_set(plan: RunPlan, tokenizer: Any) -> TrainSet:
    """Tokenize (or load from cache) the plan's sources, pack them if the plan says so, count the steps."""
    flags = plan.flags
    data = prepare_data(list(plan.sources), tokenizer, plan.template, flags.cutoff_len, flags.val_set_size,
                        flags.seed, DataOptions.from_args(flags))
    train = data.train
    if plan.packing:
        train = pack_dataset(data.train, plan.packing_len)
        if data.train_size is not None:
            logger.info("packed %d examples into %d rows of %d tokens (%.1f%% full)", data.train_size, len(train),
                        plan.packing_len, 100 * packing_efficiency(train, plan.packing_len))
    rows = len(train) if data.train_size is not None else None
    total_steps = _total_steps(plan, rows)
    logger.info("%s training %s (%d validation); global batch %d = %d per device x %d accumulation x %d "
                "processes; %d optimizer steps", rows or "streamed", "rows" if plan.packing else "examples",
                len(data.validation or []), plan.global_batch, flags.per_gpu_train_batch_size,
                flags.gradient_accumulation_steps, plan.world_size, total_steps)
    return TrainSet(data, train, rows, total_steps)


def _total_steps(plan: RunPlan, rows: int | None) -> int:
    flags = plan.flags
    if flags.max_steps > 0:  # a stream (--streaming) has no length: the checks require --max_steps
        return flags.max_steps
    per_step = flags.per_gpu_train_batch_size * plan.world_size
    steps_per_epoch = math.ceil(math.ceil(rows / per_step) / flags.gradient_accumulation_steps)
    return max(1, math.ceil(steps_per_epoch * flags.epochs))


def score_heldout(plan: RunPlan, model: Any, tokenizer: Any, when: str) -> ExactMatch:
    """Exact-match accuracy of the model's greedy answers on the plan's held-out records."""
    logger.info("scoring %d held-out records %s training", len(plan.heldout), when)
    loaded = LoadedModel(model, tokenizer, plan.family, plan.template, plan.flags.model_name_or_path)
    return exact_match(loaded, list(plan.heldout))


def build_model(plan: RunPlan, tokenizer: Any, total_steps: int) -> BuiltModel:
    """Load the base as the plan says, score it on held-out records, then wrap it with the PEFT method."""
    from transformers import set_seed

    flags, method = plan.flags, plan.method
    set_seed(flags.seed)  # the adapter's initial weights: same seed, same run (also across process counts)
    model = load_model(plan.model_path, plan.family, plan.precision.torch_load_dtype, plan.quantization_bit,
                       device_map_for(flags, plan.on_cuda), flags.trust_remote_code)
    peft_config = method.build_config(flags, plan.family, model, total_steps) if method.build_config else None
    before = score_heldout(plan, model, tokenizer, "before") if plan.score_heldout else None
    model, checkpointing = prepare_for_training(model, plan)
    if peft_config is None:  # full / freeze: the model's own weights train
        method.select_trainable(flags, model)
    else:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    if not plan.on_cuda:
        use_cpu_fast_paths(model, plan.packing)
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return BuiltModel(model, trainable, total, checkpointing, before)


def prepare_for_training(model: Any, plan: RunPlan) -> tuple[Any, bool]:
    """The original's "prepare for training": k-bit preparation, gradient checkpointing without cache.

    Returns the model and whether checkpointing is on: ``--gradient_checkpointing`` unset means only where
    activations would not fit otherwise (1B+ parameters on a GPU), and never for a method it breaks.
    """
    wanted = plan.flags.gradient_checkpointing
    if wanted is None:
        wanted = plan.on_cuda and sum(p.numel() for p in model.parameters()) >= 1_000_000_000
    checkpointing = bool(wanted and plan.method.gradient_checkpointing)
    if plan.quantization_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if checkpointing:
        model.config.use_cache = False
    return model, checkpointing


def use_cpu_fast_paths(model: Any, packing: bool) -> None:
    """What CPU training does differently (GPUs keep the block-diagonal mask or flash varlen, torch's dropout).

    Packed rows attend with one causal SDPA call per sample, and adapters' dropouts become
    ``BitsDropout`` (torch's draws its mask on one CPU thread). Call it on the (PEFT-wrapped) model.
    """
    if packing and use_per_sample_attention(model):
        logger.info("packed rows attend sample by sample (attention %s)", PER_SAMPLE_ATTENTION)
    use_bits_dropout(model)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; PEFT's count knows how 4-bit weights are packed."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def build_trainer(plan: RunPlan, model: Any, tokenizer: Any, train_set: TrainSet, training_args: Any) -> Any:
    """The Trainer with our callbacks (progress, committed checkpoints, AdaLoRA budget) and LoRA+ optimizer."""
    import torch
    from transformers.trainer_callback import PrinterCallback

    flags = plan.flags
    callbacks: list[TrainerCallback] = [LossProgressCallback(), CheckpointCommitCallback(flags.save_total_limit)]
    if plan.method.reallocates_rank:
        callbacks.append(AdaLoraBudgetCallback(model))
    optimizer = None
    if flags.loraplus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        # LoRA+: the B matrices learn loraplus_lr_ratio times faster than the A matrices.
        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=flags.learning_rate,
                                              loraplus_lr_ratio=flags.loraplus_lr_ratio)
    trainer = ResumableTrainer(
        model=model, args=training_args, optimizers=(optimizer, None), train_dataset=train_set.train,
        eval_dataset=train_set.data.validation if train_set.has_validation else None,
        data_collator=batch_collator(tokenizer, model, plan.packing, plan.on_cuda), processing_class=tokenizer,
        callbacks=callbacks, loss_chunk_size=flags.loss_chunk_size,
    )
    trainer.remove_callback(PrinterCallback)  # our callback logs instead of printing raw dicts
    return trainer


def train(plan: RunPlan, trainer: Any, model: Any) -> tuple[Any, dict[str, Any] | None]:
    """Run the Trainer (from the plan's resume point); return its result and the gathered weights if sharded."""
    cpu_bf16 = plan.precision.trainer_bf16 and not plan.on_cuda
    # Restored afterwards: generation outside autocast needs the input in the adapter's dtype.
    with disk_full_explained(plan.output_dir), explain_peer_failure(), \
            adapter_input_casts_off(model, active=cpu_bf16):
        result = trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
        state_dict = gathered_state_dict(trainer)
    return result, state_dict


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "alpaca_cot": __version__}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def run_summary(plan: RunPlan, trainer: Any, train_set: TrainSet, built: BuiltModel, result: Any) -> dict[str, Any]:
    """What the run did: steps, losses, parameters, data sizes, held-out score before training."""
    # A run shorter than --logging_steps logs no loss: its mean stands for the first and last.
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry] or [result.training_loss]
    return {
        "output_dir": str(plan.output_dir),
        "main_process": trainer.is_world_process_zero(),
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "trainable_params": built.trainable_params,
        "total_params": built.total_params,
        "global_batch": plan.global_batch,
        "train_examples": train_set.data.train_size,
        "train_rows": train_set.rows,
        "packing": plan.packing,
        "gradient_checkpointing": built.gradient_checkpointing,
        "train_seconds": result.metrics.get("train_runtime"),
        "example": train_set.data.example,
        "heldout_before": built.heldout_before.accuracy if built.heldout_before else None,
    }


def finish_run(plan: RunPlan, trainer: Any, tokenizer: Any, train_set: TrainSet, built: BuiltModel,
               summary: dict[str, Any], state_dict: dict[str, Any] | None) -> None:
    """Save adapter, tokenizer and manifest (rank 0); score the trained model; the manifest records it all."""
    manifest = {
        "alpaca_cot_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **plan.manifest_fields(),
        "data": train_set.data.manifest,
        "versions": _package_versions(),
        "result": summary,
    }
    main = trainer.is_world_process_zero()
    if main:
        with disk_full_explained(plan.output_dir):
            save_run_folder(trainer.model, tokenizer, plan.output_dir, manifest, state_dict)
    if plan.score_heldout:
        after = score_heldout(plan, trainer.model, tokenizer, "after")
        summary.update(heldout_after=after.accuracy, heldout_records=after.total,
                       heldout_examples=after.predictions[:3])
        if main:
            write_json_atomic(plan.output_dir / RUN_MANIFEST, manifest)


def run_finetune(plan: RunPlan) -> dict[str, Any]:
    """Train as the plan says; return a summary (losses, held-out metric, output folder)."""
    started = time.time()
    report_to = configure_reporting(plan.flags.report_to, plan.output_dir)
    logger.info("model %s (family %s, template %s), method %s", plan.model_path, plan.family.name,
                plan.template.name, plan.method.name)
    tokenizer = load_training_tokenizer(plan)
    train_set = prepare_train_set(plan, tokenizer)
    # Before the model: with ZeRO-3 the arguments make from_pretrained load the weights already sharded.
    join_process_group(plan.flags.ddp_timeout, plan.on_cuda)
    training_args = training_arguments(plan, train_set.total_steps, train_set.has_validation, report_to)
    built = build_model(plan, tokenizer, train_set.total_steps)
    trainer = build_trainer(plan, built.model, tokenizer, train_set, training_args)
    result, state_dict = train(plan, trainer, built.model)
    summary = run_summary(plan, trainer, train_set, built, result)
    finish_run(plan, trainer, tokenizer, train_set, built, summary, state_dict)
    summary["wall_seconds"] = time.time() - started
    return summary
