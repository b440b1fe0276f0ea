"""A training run resolved once: ``plan_run(args)`` turns the flags into a frozen, typed ``RunPlan``.

Everything that can be decided before a model loads is decided here (data sources, family, template, method,
precision, packing, output folder, resume point, processes), and every problem found on the way is
reported together. The phases of ``recipe`` read the plan (the method's and the Trainer's own settings from
its copy of the flags); the run folder's manifest saves it.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checks import Problems
from ..data import load_records
from ..data.catalog import DataSource, parse_data_spec, resolve_data
from ..errors import UserError
from ..methods import PeftMethod, get_method
from ..models import ModelFamily, resolve_family, resolve_model_path, resolve_template
from ..run_folder import (
    CHECKPOINT_COMPLETE,
    check_resume_base,
    check_training_output,
    find_last_checkpoint,
    is_complete_checkpoint,
)
from ..templates import AnyTemplate
from .distributed import silence_other_ranks, world_size

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """How the run computes: the Trainer's mixed precision and the dtype the base model loads in."""

    compute_dtype: str  # bf16 | fp16 | fp32 (``--compute_dtype auto`` resolved for this machine)
    load_dtype: str  # a torch dtype name: bfloat16 | float16 | float32
    trainer_fp16: bool
    trainer_bf16: bool

    @property
    def torch_load_dtype(self) -> Any:
        """``load_dtype`` as a ``torch.dtype``."""
        import torch

        return getattr(torch, self.load_dtype)


@dataclass(frozen=True)
class RunPlan:
    """Everything a training run decided before loading a model; what the run folder's manifest records."""

    flags: Namespace  # the flags as the user gave them (after --config); a private copy, never rewritten
    sources: tuple[DataSource, ...]
    model_path: str  # a local folder, or a hub id (as resolve_model_path gives it)
    family: ModelFamily
    template: AnyTemplate
    method: PeftMethod
    quantization_bit: int | None  # what --quantization_bit and the method imply together (qlora: 4)
    precision: Precision
    packing: bool
    packing_len: int
    output_dir: Path
    resume_from: Path | None
    heldout: tuple[dict[str, str], ...]  # records scored before and after training (--heldout_eval)
    score_heldout: bool  # scoring generates in one process from whole weights: off under torchrun / sharding
    world_size: int
    on_cuda: bool

    @property
    def global_batch(self) -> int:
        """Examples (or packed rows) per optimizer step, over all processes."""
        return self.flags.per_gpu_train_batch_size * self.flags.gradient_accumulation_steps * self.world_size

    def manifest_fields(self) -> dict[str, Any]:
        """What the run folder's manifest records of the plan: the flags as given and what was resolved."""
        return {
            "base_model": self.flags.model_name_or_path,
            "model_type": self.family.name,
            "template": self.template.name,
            "peft_type": self.method.name,
            "saved": "model" if self.method.select_trainable else "adapter",
            "quantization_bit": self.quantization_bit,
            "trust_remote_code": self.flags.trust_remote_code,
            "precision": {"compute": self.precision.compute_dtype, "load": self.precision.load_dtype},
            "packing": self.packing,
            "world_size": self.world_size,
            "resumed_from": str(self.resume_from) if self.resume_from else None,
            "settings": vars(self.flags),
        }


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


def resolve_precision(compute_dtype: str, family: ModelFamily, on_cuda: bool, weights_train: bool) -> Precision:
    """``--compute_dtype`` for this machine, family and method.

    ``weights_train``: the model's own weights train (full / freeze), so they keep fp32 master copies (bf16
    autocast on the CPU, fp16 AMP on CUDA); a frozen base under an adapter is simply loaded in bf16.
    """
    import torch

    if compute_dtype == "auto":
        compute_dtype = default_compute_dtype(on_cuda)
    if on_cuda and family.fp16_unstable and compute_dtype == "fp16":
        compute_dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        logger.info("%s models overflow in fp16: training in %s instead", family.name, compute_dtype)
    if not on_cuda and compute_dtype == "fp16":
        logger.info("--compute_dtype fp16 needs CUDA: training in fp32 on the CPU")
        compute_dtype = "fp32"
    if compute_dtype == "fp32":
        return Precision("fp32", "float32", False, False)
    if compute_dtype == "fp16":
        return Precision("fp16", "float32" if weights_train else "float16", True, False)
    # bf16: CUDA loads the base in bf16; the CPU autocasts, so a frozen base needs no fp32 copy (nor the casts)
    return Precision("bf16", "float32" if weights_train and not on_cuda else "bfloat16", False, True)


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


def resolve_resume_point(flag: Any, output_dir: Path) -> Path | None:
    """``--resume_from_checkpoint``: off, the newest complete checkpoint in ``output_dir`` (True), or a path."""
    if flag in (None, False):
        return None
    if flag is True or flag == "True":
        found = find_last_checkpoint(output_dir)
        if found is None:
            raise UserError(f"--resume_from_checkpoint: no complete checkpoint in {output_dir}")
        return found
    path = Path(flag)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume_from_checkpoint: {path} is not a complete checkpoint (no trainer_state.json)")
    if not is_complete_checkpoint(path):
        logger.warning("%s has no %s: a kill while it was being saved may have torn it", path, CHECKPOINT_COMPLETE)
    return path


def heldout_records(sources: tuple[DataSource, ...], count: int) -> tuple[dict[str, str], ...]:
    """The first ``count`` held-out records of the sources that have a held-out split."""
    with_split = [s for s in sources if s.heldout is not None]
    if not with_split:
        names = ", ".join(s.name for s in sources)
        raise UserError(f"--heldout_eval: none of the datasets ({names}) has a held-out split; use --heldout_eval 0")
    records: list[dict[str, str]] = []
    for source in with_split:
        records += load_records(source.heldout)
    return tuple(records[:count])


def _packing(args: Namespace, method: PeftMethod, family: ModelFamily) -> bool:
    if args.packing and not method.packs_samples:
        logger.info("packing off: --peft_type %s prepends virtual tokens to every row", method.name)
    elif args.packing and not family.packs_samples:
        logger.info("packing off: %s models take no block-diagonal attention mask", family.name)
    return bool(args.packing and method.packs_samples and family.packs_samples)


def _resolve_output(args: Namespace, model_path: str | None, problems: Problems) -> tuple[Path, Path | None]:
    output_dir = Path(args.output_dir or default_output_dir(args))
    resume = problems.attempt(lambda: resolve_resume_point(args.resume_from_checkpoint, output_dir))
    if model_path is not None:
        problems.attempt(lambda: check_training_output(output_dir, model_path, resume is not None,
                                                       args.overwrite_output_dir))
        if resume is not None:
            problems.attempt(lambda: check_resume_base(resume, args.model_name_or_path, Path(model_path)))
    return output_dir, resume


def plan_run(args: Namespace) -> RunPlan:
    """Resolve every flag of a training run before anything loads; all problems in one error.

    ``args`` come from ``cli.parse_finetune_args``, which has already checked the flags among themselves
    (``checks.check_finetune_flags``); what is resolved here reads files: data, model, output folder.
    """
    import torch

    silence_other_ranks()
    args = copy.deepcopy(args)
    on_cuda, ranks = torch.cuda.is_available(), world_size()
    problems = Problems()
    method = get_method(args.peft_type)
    sources = problems.attempt(lambda: tuple(resolve_data(args.data)))
    model_path = problems.attempt(lambda: resolve_model_path(args.model_name_or_path))
    family = template = None
    if model_path is not None:
        family = problems.attempt(lambda: resolve_family(args.model_type, model_path, args.trust_remote_code))
    if family is not None:
        template = problems.attempt(lambda: resolve_template(args.template, family))
    heldout: tuple[dict[str, str], ...] = ()
    if sources is not None and args.heldout_eval:
        heldout = problems.attempt(lambda: heldout_records(sources, args.heldout_eval)) or ()
    output_dir, resume = _resolve_output(args, model_path, problems)
    problems.raise_if_any()
    sharded = bool(args.deepspeed or args.fsdp)
    if heldout and (ranks > 1 or sharded):
        logger.info("--heldout_eval is skipped under torchrun, --deepspeed and --fsdp: "
                    "it generates in one process from whole weights")
    return RunPlan(
        flags=args, sources=sources, model_path=model_path, family=family, template=template, method=method,
        quantization_bit=method.base_bits(args.quantization_bit),
        precision=resolve_precision(args.compute_dtype, family, on_cuda, method.select_trainable is not None),
        packing=_packing(args, method, family), packing_len=args.packing_len or args.cutoff_len,
        output_dir=output_dir, resume_from=resume, heldout=heldout,
        score_heldout=bool(heldout) and ranks == 1 and not sharded, world_size=ranks, on_cuda=on_cuda)
