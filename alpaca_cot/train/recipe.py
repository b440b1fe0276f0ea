"""Training: model preparation, Trainer setup, checkpoints and the saved run.

``run_finetune`` is the whole recipe behind ``uniform_finetune.py``: resolve data
and model (all cheap checks first), tokenize with masking, wrap the model with the
chosen PEFT method, train with the transformers ``Trainer``, and save the adapter,
tokenizer and a manifest of the run atomically into ``--output_dir``.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import re
import shutil
import tempfile
import time
from argparse import Namespace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformers import DataCollatorForSeq2Seq, TrainerCallback

from .. import __version__
from ..data import IGNORE_INDEX, DataOptions, check_data_args, load_records, prepare_data
from ..data.catalog import DataSource, parse_data_spec, resolve_data
from ..data.packing import pack_dataset, packing_efficiency
from ..errors import UserError
from ..files import write_json_atomic
from ..infer.loading import LoadedModel
from ..infer.scoring import exact_match
from ..methods import PeftMethod, get_method
from ..models import load_model, load_tokenizer, resolve_family, resolve_model_path, resolve_template
from ..run_folder import (
    CHECKPOINT_COMPLETE,
    RUN_MANIFEST,
    check_resume_base,
    check_training_output,
    disk_full_explained,
    find_last_checkpoint,
    is_complete_checkpoint,
)
from .attention import PER_SAMPLE_ATTENTION, PackedCollator, use_per_sample_attention
from .callbacks import AdaLoraBudgetCallback, LossProgressCallback
from .checkpoints import CheckpointCommitCallback
from .cpu_adapters import adapter_input_casts_off, use_bits_dropout
from .distributed import (
    check_parallel_setup,
    device_map_for,
    explain_peer_failure,
    gathered_state_dict,
    is_main_process,
    join_process_group,
    parallel_training_arguments,
    silence_other_ranks,
    world_size,
)
from .resume import ResumableTrainer

logger = logging.getLogger(__name__)


def default_output_dir(args: Namespace) -> str:
    """The original's layout: ``saved_models/{model}_{data}_{lr}/{peft_type}``."""
    model = Path(args.model_name_or_path.rstrip("/")).name
    names = []
    for spec in args.data:
        target = parse_data_spec(spec)[0]  # `alpaca:0.5` names the folder `alpaca`
        name = Path(target).stem if os.sep in target or "." in target else target
        names.append(re.sub(r"[*?\[\]]+", "", name) or "data")  # a glob's wildcards make poor folder names
    data = "-".join(names)
    return str(Path("saved_models") / f"{model}_{data}_{args.learning_rate:g}" / args.peft_type)


def _resume_path(args: Namespace, output_dir: Path) -> str | None:
    if args.resume_from_checkpoint in (None, False):
        return None
    if args.resume_from_checkpoint is True or args.resume_from_checkpoint == "True":
        found = find_last_checkpoint(output_dir)
        if found is None:
            raise UserError(f"--resume_from_checkpoint: no complete checkpoint in {output_dir}")
        return str(found)
    path = Path(args.resume_from_checkpoint)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume_from_checkpoint: {path} is not a complete checkpoint (no trainer_state.json)")
    if not is_complete_checkpoint(path):
        logger.warning("%s has no %s: a kill while it was being saved may have torn it", path, CHECKPOINT_COMPLETE)
    return str(path)


def _precision(compute_dtype: str, on_cuda: bool, weights_train: bool = False) -> tuple[Any, bool, bool]:
    """(dtype to load the base in, Trainer fp16, Trainer bf16).

    ``weights_train``: the model's own weights are trained (full / freeze), so on the CPU they keep
    fp32 master copies under bf16 autocast; a frozen base under an adapter is simply loaded in bf16.
    """
    import torch

    if compute_dtype == "auto":
        compute_dtype = default_compute_dtype(on_cuda)
    if on_cuda:
        if compute_dtype == "bf16":
            return torch.bfloat16, False, True
        if compute_dtype == "fp16":
            return torch.float16, True, False
        return torch.float32, False, False
    if compute_dtype == "bf16":  # CPU autocast to bf16; a frozen base needs no fp32 copy (nor the casts)
        return (torch.float32 if weights_train else torch.bfloat16), False, True
    if compute_dtype == "fp16":
        logger.info("--compute_dtype fp16 needs CUDA: training in fp32 on the CPU")
    return torch.float32, False, False


def default_compute_dtype(on_cuda: bool) -> str:
    """``--compute_dtype auto``: bf16 where the hardware computes it natively, else fp16 on CUDA, fp32 on CPU."""
    import torch

    if on_cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), where bf16 autocast is fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _configure_reporting(report_to: str, output_dir: Path) -> list[str]:
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


def _heldout_records(sources: list[DataSource], count: int) -> list[dict[str, str]]:
    with_split = [s for s in sources if s.heldout is not None]
    if not with_split:
        names = ", ".join(s.name for s in sources)
        raise UserError(f"--heldout_eval: none of the datasets ({names}) has a held-out split; use --heldout_eval 0")
    records: list[dict[str, str]] = []
    for source in with_split:
        records += load_records(source.heldout)
    return records[:count]


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "alpaca_cot": __version__}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def save_run(model: Any, tokenizer: Any, output_dir: Path, manifest: dict[str, Any],
             state_dict: dict[str, Any] | None = None) -> None:
    """Save adapter, tokenizer and manifest; each file lands by rename, the manifest last.

    ``state_dict``: the gathered weights when training sharded them (ZeRO-3, FSDP).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=output_dir))
    try:
        model.save_pretrained(staging, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / RUN_MANIFEST, manifest)
        (output_dir / RUN_MANIFEST).unlink(missing_ok=True)  # no manifest vouches for a half-swapped folder
        for item in sorted(staging.iterdir(), key=lambda p: p.name == RUN_MANIFEST):
            target = output_dir / item.name
            if item.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _apply_method_constraints(args: Namespace, method: PeftMethod) -> None:
    """Flags that depend on the method: qlora fixes 4 bits; full/freeze and LoRA+ have limits."""
    if method.quantization_bit:
        if args.quantization_bit not in (None, method.quantization_bit):
            raise UserError(f"--peft_type {method.name} trains on a {method.quantization_bit}-bit base; "
                            f"drop --quantization_bit {args.quantization_bit}")
        args.quantization_bit = method.quantization_bit
    if method.select_trainable and args.quantization_bit:
        raise UserError(f"--peft_type {method.name} trains the model's own weights, which cannot be 4/8-bit; "
                        "drop --quantization_bit or use lora/qlora")
    if args.loraplus_lr_ratio is not None and not method.lora_family:
        raise UserError(f"--loraplus_lr_ratio applies to LoRA methods, not --peft_type {method.name}")


def _count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; PEFT's count knows how 4-bit weights are packed."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _prepare_for_training(model: Any, args: Namespace, method_allows_checkpointing: bool) -> Any:
    """The original's "prepare for training": k-bit preparation, gradient checkpointing without cache."""
    if args.gradient_checkpointing is None:  # default: only where activations would not fit otherwise
        import torch

        large = sum(p.numel() for p in model.parameters()) >= 1_000_000_000
        args.gradient_checkpointing = bool(torch.cuda.is_available() and large)
    use_checkpointing = args.gradient_checkpointing and method_allows_checkpointing
    if args.quantization_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=use_checkpointing)
    elif use_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if use_checkpointing:
        model.config.use_cache = False
    return model


def _training_arguments(args: Namespace, output_dir: Path, total_steps: int, has_validation: bool, fp16: bool,
                        bf16: bool, report_to: list[str], packing: bool) -> Any:
    """Trainer settings from the flags; intervals scale with the run so small data never gets a 0 interval."""
    import torch
    from transformers import TrainingArguments

    interval = args.save_steps or max(1, total_steps // 10)
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.per_gpu_train_batch_size,
        per_device_eval_batch_size=args.per_gpu_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        warmup_steps=min(100, total_steps // 10),
        lr_scheduler_type="linear",
        logging_steps=args.logging_steps or max(1, min(10, total_steps // 50)),
        save_strategy="steps",
        save_steps=interval,
        save_total_limit=None,  # CheckpointCommitCallback rotates, after a checkpoint is complete
        eval_strategy="steps" if has_validation else "no",
        eval_steps=interval if has_validation else None,
        load_best_model_at_end=has_validation,
        metric_for_best_model="eval_loss" if has_validation else None,
        fp16=fp16,
        bf16=bf16,
        # packed rows are all about full: grouping by length only helps padded batches
        train_sampling_strategy="group_by_length" if args.group_by_length and not packing else "random",
        torch_compile=args.torch_compile,
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        data_seed=args.seed,
        report_to=report_to,
        disable_tqdm=True,  # LossProgressCallback draws the one bar
        remove_unused_columns=False,
        ddp_find_unused_parameters=False if world_size() > 1 else None,
        log_level="warning" if is_main_process() else "error",
        **parallel_training_arguments(args),
    )


def use_cpu_fast_paths(model: Any, packing: bool) -> None:
    """What CPU training does differently (GPUs keep the block-diagonal mask or flash varlen, torch's dropout).

    Packed rows attend with one causal SDPA call per sample, and adapters' dropouts become
    ``BitsDropout`` (torch's draws its mask on one CPU thread). Call it on the (PEFT-wrapped) model.
    """
    if packing and use_per_sample_attention(model):
        logger.info("packed rows attend sample by sample (attention %s)", PER_SAMPLE_ATTENTION)
    use_bits_dropout(model)


def _collator(tokenizer: Any, model: Any, packing: bool, on_cuda: bool) -> Any:
    """Packed rows: boundaries kept by the attention backend's own means; otherwise pad each batch."""
    if packing:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return PackedCollator(pad_id if pad_id is not None else 0, model.config._attn_implementation,
                              pad_to_multiple_of=8 if on_cuda else None)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                  pad_to_multiple_of=8 if on_cuda else None)


def run_finetune(args: Namespace) -> dict[str, Any]:
    """Train as the flags say; return a summary (losses, held-out metric, output folder)."""
    import torch
    from transformers import set_seed

    started = time.time()
    silence_other_ranks()
    # Everything cheap is checked before the model is loaded.
    check_data_args(args)
    sources = resolve_data(args.data)
    method = get_method(args.peft_type)
    _apply_method_constraints(args, method)
    check_parallel_setup(args, method, torch.cuda.is_available())
    model_path = resolve_model_path(args.model_name_or_path)
    family = resolve_family(args.model_type, model_path, args.trust_remote_code)
    template = resolve_template(args.template, family)
    heldout = _heldout_records(sources, args.heldout_eval) if args.heldout_eval else []
    output_dir = Path(args.output_dir or default_output_dir(args))
    resume = _resume_path(args, output_dir)
    check_training_output(output_dir, str(model_path), resume is not None, args.overwrite_output_dir)
    if resume is not None:
        check_resume_base(Path(resume), args.model_name_or_path, Path(model_path))
    on_cuda = torch.cuda.is_available()
    compute_dtype = default_compute_dtype(on_cuda) if args.compute_dtype == "auto" else args.compute_dtype
    if family.fp16_unstable and compute_dtype == "fp16" and on_cuda:
        compute_dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        logger.info("%s models overflow in fp16: training in %s instead", family.name, compute_dtype)
    load_dtype, fp16, bf16 = _precision(compute_dtype, on_cuda, weights_train=method.select_trainable is not None)
    if method.select_trainable and fp16:
        load_dtype = torch.float32  # fp16 AMP needs fp32 master weights when the weights themselves train
    report_to = _configure_reporting(args.report_to, output_dir)
    logger.info("model %s (family %s, template %s), method %s", model_path, family.name, template.name, method.name)

    tokenizer = load_tokenizer(model_path, family, args.trust_remote_code)
    tokenizer.padding_side = "right"  # training pads on the right; generation pads its own batches left
    data = prepare_data(sources, tokenizer, template, args.cutoff_len, args.val_set_size, args.seed,
                        DataOptions.from_args(args))
    train = data.train
    packing = args.packing and method.packs_samples and family.packs_samples
    if args.packing and not method.packs_samples:
        logger.info("packing off: --peft_type %s prepends virtual tokens to every row", method.name)
    elif args.packing and not family.packs_samples:
        logger.info("packing off: %s models take no block-diagonal attention mask", family.name)
    if packing:
        packing_len = args.packing_len or args.cutoff_len
        train = pack_dataset(data.train, packing_len)
        if data.train_size is not None:
            logger.info("packed %d examples into %d rows of %d tokens (%.1f%% full)", data.train_size, len(train),
                        packing_len, 100 * packing_efficiency(train, packing_len))
    train_rows = len(train) if data.train_size is not None else None
    ranks = world_size()
    global_batch = args.per_gpu_train_batch_size * args.gradient_accumulation_steps * ranks
    if args.max_steps > 0:  # a stream (--streaming) has no length: check_data_args requires --max_steps
        total_steps = args.max_steps
    else:
        steps_per_epoch = math.ceil(math.ceil(train_rows / (args.per_gpu_train_batch_size * ranks))
                                    / args.gradient_accumulation_steps)
        total_steps = max(1, math.ceil(steps_per_epoch * args.epochs))
    logger.info("%s training %s (%d validation); global batch %d = %d per device x %d accumulation x %d "
                "processes; %d optimizer steps", train_rows or "streamed", "rows" if packing else "examples",
                len(data.validation or []), global_batch, args.per_gpu_train_batch_size,
                args.gradient_accumulation_steps, ranks, total_steps)

    has_validation = data.validation is not None and len(data.validation) > 0
    # Before the model: with ZeRO-3 the arguments make from_pretrained load the weights already sharded.
    join_process_group(args.ddp_timeout, on_cuda)
    training_args = _training_arguments(args, output_dir, total_steps, has_validation, fp16, bf16, report_to,
                                        packing)
    set_seed(args.seed)  # the adapter's initial weights: same seed, same run (also across process counts)
    device_map = device_map_for(args, on_cuda)
    model = load_model(model_path, family, load_dtype, args.quantization_bit, device_map, args.trust_remote_code)
    peft_config = method.build_config(args, family, model, total_steps) if method.build_config else None

    before = None
    # Scoring generates in one process, from whole weights.
    score_heldout = bool(heldout) and ranks == 1 and not (args.deepspeed or args.fsdp)
    if heldout and not score_heldout:
        logger.info("--heldout_eval is skipped under torchrun, --deepspeed and --fsdp: "
                    "it generates in one process from whole weights")
    if score_heldout:
        logger.info("scoring %d held-out records before training", len(heldout))
        before = exact_match(LoadedModel(model, tokenizer, family, template, args.model_name_or_path), heldout)

    model = _prepare_for_training(model, args, method.gradient_checkpointing)
    if peft_config is None:  # full / freeze: the model's own weights train
        method.select_trainable(args, model)
    else:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    if not on_cuda:
        use_cpu_fast_paths(model, packing)
    trainable, total = _count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    callbacks: list[TrainerCallback] = [LossProgressCallback(), CheckpointCommitCallback(args.save_total_limit)]
    if method.reallocates_rank:
        callbacks.append(AdaLoraBudgetCallback(model))
    optimizer = None
    if args.loraplus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        # LoRA+: the B matrices learn loraplus_lr_ratio times faster than the A matrices.
        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=args.learning_rate,
                                              loraplus_lr_ratio=args.loraplus_lr_ratio)
    trainer = ResumableTrainer(
        model=model,
        args=training_args,
        optimizers=(optimizer, None),
        train_dataset=train,
        eval_dataset=data.validation if has_validation else None,
        data_collator=_collator(tokenizer, model, packing, on_cuda),
        processing_class=tokenizer,
        callbacks=callbacks,
        loss_chunk_size=args.loss_chunk_size,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our callback logs instead of printing raw dicts
    # Restored afterwards: generation outside autocast needs the input in the adapter's dtype.
    with disk_full_explained(output_dir), explain_peer_failure(), \
            adapter_input_casts_off(model, active=bf16 and not on_cuda):
        result = trainer.train(resume_from_checkpoint=resume)
        state_dict = gathered_state_dict(trainer)
    # A run shorter than --logging_steps logs no loss: its mean stands for the first and last.
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry] or [result.training_loss]

    summary: dict[str, Any] = {
        "output_dir": str(output_dir),
        "main_process": trainer.is_world_process_zero(),
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "trainable_params": trainable,
        "total_params": total,
        "global_batch": global_batch,
        "train_examples": data.train_size,
        "train_rows": train_rows,
        "packing": packing,
        "train_seconds": result.metrics.get("train_runtime"),
        "example": data.example,
        "heldout_before": before.accuracy if before else None,
    }
    manifest = {
        "alpaca_cot_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": args.model_name_or_path,
        "model_type": family.name,
        "template": template.name,
        "peft_type": method.name,
        "saved": "model" if method.select_trainable else "adapter",
        "quantization_bit": args.quantization_bit,
        "trust_remote_code": args.trust_remote_code,
        "settings": vars(args),
        "data": data.manifest,
        "versions": _package_versions(),
        "result": summary,
    }
    if trainer.is_world_process_zero():
        with disk_full_explained(output_dir):
            save_run(trainer.model, tokenizer, output_dir, manifest, state_dict)
    if score_heldout:
        logger.info("scoring %d held-out records after training", len(heldout))
        after = exact_match(LoadedModel(trainer.model, tokenizer, family, template, args.model_name_or_path),
                            heldout)
        summary["heldout_after"] = after.accuracy
        summary["heldout_records"] = after.total
        summary["heldout_examples"] = after.predictions[:3]
        if trainer.is_world_process_zero():
            write_json_atomic(output_dir / RUN_MANIFEST, manifest)
    summary["wall_seconds"] = time.time() - started
    return summary
