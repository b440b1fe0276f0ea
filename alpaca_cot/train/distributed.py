"""Training on several processes, and checkpoints that survive a kill at any moment.

``torchrun`` (or the original's ``python -m torch.distributed.launch``) starts one
process per device and tells each its rank through the environment; the Trainer
then trains data-parallel. This module holds what the recipe needs around that:
who the main process is, which combinations of ``--deepspeed`` / ``--fsdp`` /
quantization are supported (refused in one line before any model is loaded), a
clear message instead of a traceback when another process dies, and checkpoint
commits: a checkpoint counts only once every process has finished writing it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
from argparse import Namespace
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..errors import UserError

logger = logging.getLogger(__name__)

DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
# Quantized bases DeepSpeed ZeRO-3 and FSDP cannot shard: bitsandbytes packs the weights into
# integer tensors that these engines would have to flatten and split across ranks.
_SHARDING_REFUSES_QUANTIZATION = "shards the base weights, which cannot be 4/8-bit here"


def world_size() -> int:
    """Number of processes of a torchrun / torch.distributed.launch job (1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_rank() -> int:
    """This process's global rank (0 outside a distributed job)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its own machine: the GPU it drives."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 logs, reports and writes files."""
    return process_rank() == 0


def silence_other_ranks() -> None:
    """Progress bars and library warnings from rank 0 only, so N processes print one log."""
    if is_main_process():
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_deepspeed_config(value: str) -> Path:
    """``--deepspeed``: a JSON file, or the name of a shipped config (``zero2``, ``zero3``, ``zero3_offload``)."""
    path = Path(value)
    if not path.is_file() and (DEEPSPEED_CONFIGS / f"{value}.json").is_file():
        path = DEEPSPEED_CONFIGS / f"{value}.json"
    return path


def shipped_deepspeed_configs() -> list[str]:
    """Names of the DeepSpeed configs in ``configs/deepspeed``."""
    return sorted(p.stem for p in DEEPSPEED_CONFIGS.glob("*.json"))


def _read_deepspeed_config(value: str, problems: list[str]) -> dict[str, Any] | None:
    path = resolve_deepspeed_config(value)
    if not path.is_file():
        problems.append(f"--deepspeed: {value} is neither a file nor a shipped config "
                        f"({', '.join(shipped_deepspeed_configs())})")
        return None
    return _check_json_object(path, "--deepspeed", problems)


def _check_json_object(path: str | Path, flag: str, problems: list[str]) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None with the problem (missing, bad JSON and its line) noted."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{flag}: {path} does not exist")
        return None
    except json.JSONDecodeError as exc:
        problems.append(f"{flag}: {path}:{exc.lineno} is not valid JSON ({exc.msg})")
        return None
    if not isinstance(config, dict):
        problems.append(f"{flag}: {path} must hold a JSON object")
        return None
    return config


def zero_stage(config: dict[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it has none)."""
    return int(config.get("zero_optimization", {}).get("stage", 0))


def check_parallel_setup(args: Namespace, method: Any, cuda_available: bool) -> None:
    """Refuse unsupported --deepspeed / --fsdp combinations, all in one line, before any model is loaded.

    ``method`` is the ``--peft_type`` row; ``args.quantization_bit`` already holds what it implies
    (``qlora`` means 4).
    """
    problems: list[str] = []
    deepspeed, fsdp = getattr(args, "deepspeed", None), getattr(args, "fsdp", False)
    if getattr(args, "ddp_timeout", 1) < 1:
        problems.append(f"--ddp_timeout must be at least 1 second (got {args.ddp_timeout})")
    if deepspeed and fsdp:
        problems.append("--deepspeed and --fsdp are two ways of sharding the same model: pass one of them")
    if getattr(args, "fsdp_config", None) and not fsdp:
        problems.append("--fsdp_config needs --fsdp")
    if deepspeed:
        config = _read_deepspeed_config(deepspeed, problems)
        if importlib.util.find_spec("deepspeed") is None:
            problems.append("--deepspeed needs the deepspeed package: `pip install deepspeed` (on a CUDA machine)")
        if not cuda_available:
            problems.append("--deepspeed needs CUDA GPUs; on CPUs run data-parallel with torchrun alone")
        if config is not None:
            stage = zero_stage(config)
            if stage == 3 and args.quantization_bit:
                problems.append(f"--deepspeed ZeRO-3 {_SHARDING_REFUSES_QUANTIZATION} (--peft_type {method.name}, "
                                f"{args.quantization_bit}-bit): use ZeRO-2 (--deepspeed zero2) or plain torchrun")
            if "optimizer" in config and args.loraplus_lr_ratio is not None:
                problems.append(f"--loraplus_lr_ratio builds its own optimizer, but {deepspeed} defines one: "
                                "use a config without an \"optimizer\" section (zero2, zero3)")
    if fsdp:
        if not cuda_available:
            problems.append("--fsdp needs CUDA GPUs (accelerate runs FSDP on accelerators only; on CPUs it would "
                            "silently fall back to DDP): on CPUs run data-parallel with torchrun alone")
        elif world_size() == 1:
            problems.append("--fsdp shards the model across processes: start the run with "
                            "torchrun --nproc_per_node N uniform_finetune.py ... (N = GPUs, 1 is fine)")
        if args.quantization_bit:
            problems.append(f"--fsdp {_SHARDING_REFUSES_QUANTIZATION} (--peft_type {method.name}, "
                            f"{args.quantization_bit}-bit): use plain torchrun (DDP) or --deepspeed zero2")
        if getattr(args, "fsdp_config", None):
            _check_json_object(args.fsdp_config, "--fsdp_config", problems)
    if problems:
        raise UserError("; ".join(problems))


def parallel_training_arguments(args: Namespace) -> dict[str, Any]:
    """TrainingArguments fields for --deepspeed / --fsdp / --ddp_timeout; other ranks log errors only."""
    fields: dict[str, Any] = {"ddp_timeout": args.ddp_timeout, "log_level_replica": "error"}
    if args.deepspeed:
        fields["deepspeed"] = str(resolve_deepspeed_config(args.deepspeed))
    if args.fsdp:
        fsdp_config: dict[str, Any] = {"version": 2, "state_dict_type": "FULL_STATE_DICT",
                                       "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}
        if args.fsdp_config:
            fsdp_config.update(json.loads(Path(args.fsdp_config).read_text(encoding="utf-8")))
        fields["fsdp"] = True
        fields["fsdp_config"] = fsdp_config
    return fields


def join_process_group(timeout_s: int, cuda_available: bool) -> None:
    """Join the job's process group on CPUs with ``--ddp_timeout``.

    The Trainer passes ``ddp_timeout`` on to the process group on GPUs only; on CPUs (gloo) a
    stuck peer would otherwise hold the others for gloo's default 30 minutes.
    """
    import torch.distributed as dist

    if world_size() > 1 and not cuda_available and not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def device_map_for(args: Namespace, cuda_available: bool) -> dict[str, int] | None:
    """Each process loads the model onto its own GPU; DeepSpeed and FSDP place the weights themselves."""
    if not cuda_available or args.deepspeed or args.fsdp:
        return None
    return {"": local_rank()}


def gathered_state_dict(trainer: Any) -> dict[str, Any] | None:
    """The full state dict where the weights are sharded (ZeRO-3, FSDP), else None.

    A collective: every rank must call it, and only then may rank 0 save.
    """
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


@contextlib.contextmanager
def explain_peer_failure() -> Iterator[None]:
    """Turn a dead or stuck peer process into one line instead of a backend traceback."""
    try:
        yield
    except RuntimeError as exc:  # torch.distributed.DistError and gloo's errors are RuntimeErrors
        if world_size() == 1 or not _is_peer_failure(exc):
            raise
        raise UserError(f"rank {process_rank()}: another process of this {world_size()}-process job died or stopped "
                        f"answering ({_short_reason(exc)}); restart the job with --resume_from_checkpoint") from exc


def _short_reason(exc: BaseException) -> str:
    """Gloo's first sentence without its source location: 'Timed out waiting 5000ms for send operation ...'."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". ")[0][:160]


def _is_peer_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return any(sign in text for sign in ("connection closed by peer", "connection reset by peer", "timed out",
                                         "timeout", "broken pipe", "gloo"))


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


