"""Training on several processes: ranks, the process group, the sharding engines' settings, dead peers.

``torchrun`` (or the original's ``python -m torch.distributed.launch``) starts one
process per device and tells each its rank through the environment; the Trainer
then trains data-parallel. This module holds what the recipe needs around that:
who the main process is, the process group, the Trainer's ``--deepspeed`` / ``--fsdp``
settings (which combinations are refused is ``alpaca_cot.checks``' job), and a clear
message instead of a traceback when another process dies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from argparse import Namespace
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..checks import resolve_deepspeed_config
from ..errors import UserError

logger = logging.getLogger(__name__)


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
