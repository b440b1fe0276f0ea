"""Command-line flags shared by the entry scripts, ``--config`` YAML layering and checks.

Precedence: explicit flags > ``--config FILE.yaml`` > defaults. Without ``--data``
(and without a config file) training runs the demo recipe of ``configs/demo.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checks import check_finetune_flags
from .embedded import DEFAULT_MODEL
from .errors import ArgumentParser, UserError, did_you_mean
from .methods import ADAPTER_INITS, BOTTLENECK_PLACEMENTS, METHODS, NON_LINEARITIES
from .models import FAMILIES, QUANTIZATIONS
from .presets import DEFAULT_PRESET, GENERATION_FLAGS, GENERATION_PRESETS
from .templates import TEMPLATES

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def build_finetune_parser() -> argparse.ArgumentParser:
    """Flags of ``uniform_finetune.py``: the original's names and defaults, plus a few new ones."""
    p = ArgumentParser(
        prog="uniform_finetune.py",
        description="Instruction-tune an LLM with a parameter-efficient method.",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of flag values (flags on the command line win)")
    g = p.add_argument_group("model")
    g.add_argument("--model_type", choices=sorted(FAMILIES), help="model family; detected from config.json if omitted")
    g.add_argument("--model_name_or_path", default=DEFAULT_MODEL, help="local folder, hub id or embedded model name")
    g.add_argument("--trust_remote_code", action="store_true", help="allow code shipped in the checkpoint to run")
    g.add_argument("--template", choices=sorted(TEMPLATES), help="prompt template (default: the family's)")
    g.add_argument("--quantization_bit", type=int, choices=list(QUANTIZATIONS),
                   help="load the base in 4-bit NF4 or 8-bit")
    g.add_argument("--compute_dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                   help="training precision; auto: bf16 where the GPU or CPU computes it natively, else fp16 on "
                        "CUDA and fp32 on CPU")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="*",
                   help="dataset names (`python -m alpaca_cot.data list`), files or globs, each optionally with an "
                        "amount: alpaca:0.5 (fraction) or belle:20000 (records), sampled with --seed "
                        "(default: the demo recipe)")
    g.add_argument("--data_format", help="force one source format for every file (default: detected per record)")
    g.add_argument("--dedup", action="store_true", help="drop exact duplicate records at load time")
    g.add_argument("--skip_bad_records", action="store_true",
                   help="leave out malformed records (counted in the log and manifest) instead of stopping")
    g.add_argument("--preprocessing_num_workers", type=int, help="processes that tokenize (default: 1)")
    g.add_argument("--streaming", action="store_true",
                   help="read the data lazily (IterableDataset, nothing materialised); needs --max_steps")
    g.add_argument("--data_cache_dir", help="where read and tokenized data are cached "
                                            "(default: ~/.cache/alpaca_cot/datasets)")
    g.add_argument("--cutoff_len", type=int, default=512, help="truncate examples to this many tokens")
    g.add_argument("--val_set_size", type=int, default=2000, help="held-out validation records (capped at 10%%)")
    g.add_argument("--heldout_eval", type=int, default=0,
                   help="score exact-match answers on this many held-out records before and after training")
    g = p.add_argument_group("method")
    g.add_argument("--peft_type", default="lora", choices=sorted(METHODS))
    g.add_argument("--lora_target_modules", nargs="+", help="Linear layers to adapt (default: the family's; 'all')")
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=int, default=16)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--use_dora", action="store_true", help="LoRA: DoRA's magnitude/direction decomposition")
    g.add_argument("--use_rslora", action="store_true", help="LoRA: rank-stabilised scaling alpha/sqrt(r)")
    g.add_argument("--loraplus_lr_ratio", type=float, help="LoRA+: learning rate of B = ratio x that of A (e.g. 16)")
    g.add_argument("--adalora_init_r", type=int, default=12)
    g.add_argument("--adalora_tinit", type=int, default=200)
    g.add_argument("--adalora_tfinal", type=int, default=1000)
    g.add_argument("--adalora_delta_t", type=int, default=10)
    g.add_argument("--bottleneck_size", type=int, default=256,
                   help=f"{'/'.join(BOTTLENECK_PLACEMENTS)}: adapter width")
    g.add_argument("--non_linearity", default="tanh", choices=list(NON_LINEARITIES))
    g.add_argument("--adapter_dropout", type=float, default=0.0)
    g.add_argument("--adapter_scaling", default="1.0", help="multiplier of the adapter output, or 'learned'")
    g.add_argument("--adapter_init", default="mam_adapter", choices=list(ADAPTER_INITS),
                   help="; ".join(f"{name}: {what}" for name, what in ADAPTER_INITS.items()))
    g.add_argument("--trainable_layers", type=int, default=2, help="freeze: how many of the last layers train")
    g.add_argument("--num_virtual_tokens", type=int, default=20)
    g.add_argument("--prompt_encoder_hidden_size", type=int, default=128)
    g = p.add_argument_group("training")
    g.add_argument("--per_gpu_train_batch_size", type=int, default=4)
    g.add_argument("--gradient_accumulation_steps", type=int, default=32)
    g.add_argument("--epochs", type=float, default=3)
    g.add_argument("--max_steps", type=int, default=-1, help="stop after this many steps; overrides --epochs")
    g.add_argument("--learning_rate", type=float, default=3e-4)
    g.add_argument("--gradient_checkpointing", action="store_true", default=None,
                   help="trade compute for activation memory (default: on for models of 1B+ parameters on CUDA)")
    g.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false",
                   help=argparse.SUPPRESS)
    g.add_argument("--packing", type=parse_bool, nargs="?", const=True, default=True,
                   help="pack several samples into each row of --packing_len tokens; attention stays within a "
                        "sample (--no_packing or --packing false: one padded sample per row, as the original)")
    g.add_argument("--no_packing", dest="packing", action="store_false", help=argparse.SUPPRESS)
    g.add_argument("--packing_len", type=int, help="tokens per packed row (default: --cutoff_len)")
    g.add_argument("--loss_chunk_size", type=int, default=1024,
                   help="tokens per chunk of the vocabulary projection in the loss; 0: the model's own loss "
                        "over full logits")
    g.add_argument("--group_by_length", action="store_true",
                   help="batch samples of similar length (less padding; only matters without packing)")
    g.add_argument("--torch_compile", action="store_true", help="compile the model with torch.compile")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--save_steps", type=int, help="checkpoint interval (default: a tenth of the run)")
    g.add_argument("--save_total_limit", type=int, default=3)
    g.add_argument("--logging_steps", type=int, help="log interval (default: about 50 logs per run)")
    g.add_argument("--resume_from_checkpoint", nargs="?", const=True,
                   help="continue from a checkpoint folder; bare flag: the latest in --output_dir")
    g.add_argument("--report_to", default="wandb", choices=["wandb", "tensorboard", "none"])
    g.add_argument("--output_dir", help="default: saved_models/{model}_{data}_{lr}/{peft_type}")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="train into an --output_dir that holds another run or other files (its old checkpoints "
                        "are deleted); without it such a folder is refused")
    g.add_argument("--deepspeed", metavar="CONFIG",
                   help="DeepSpeed JSON config, or a shipped one: zero2, zero3, zero3_offload (CUDA)")
    g.add_argument("--fsdp", action="store_true", help="shard the model with FSDP (run under torchrun)")
    g.add_argument("--fsdp_config", metavar="JSON", help="--fsdp: file of Trainer fsdp_config keys to override")
    g.add_argument("--ddp_timeout", type=int, default=1800,
                   help="seconds a process waits for the others before the job fails (a dead or stuck rank)")
    # set by torch.distributed.launch: --local_rank before torch 2.0, --local-rank since
    g.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    g.add_argument("--size", help=argparse.SUPPRESS)  # accepted for the original's command lines; unused
    return p


def parse_bool(value: str | bool) -> bool:
    """``true/false/yes/no/1/0`` (any case) for flags such as ``--packing false``."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Which model an inference script serves: a run folder, optionally overridden."""
    g = p.add_argument_group("model")
    g.add_argument("--lora_dir", help="folder written by uniform_finetune.py (omit to use the base model alone)")
    g.add_argument("--model_name_or_path", help="base model (default: the one the adapter was trained on)")
    g.add_argument("--model_type", help="model family (default: from the run, else detected)")
    g.add_argument("--template", help="prompt template (default: the run's)")
    g.add_argument("--trust_remote_code", action="store_true", help="allow code shipped in the checkpoint to run")


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """Generation flags of every inference script, from the tables of ``presets``; greedy unless a temperature is
    given. A script that wants another default sets it with ``parser.set_defaults``."""
    g = p.add_argument_group("generation")
    g.add_argument("--preset", choices=list(GENERATION_PRESETS), default=DEFAULT_PRESET,
                   help="; ".join(f"{row.name}: {row.description}" for row in GENERATION_PRESETS.values()))
    for flag in GENERATION_FLAGS.values():
        g.add_argument(f"--{flag.name}", type=flag.type, help=flag.help)


def _load_yaml(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except FileNotFoundError as exc:
        raise UserError(f"--config: {path} does not exist") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"--config: {path}{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    if not isinstance(values, dict):
        raise UserError(f"--config: {path} must be a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions
               if a.dest not in ("help", "config") and a.help != argparse.SUPPRESS}  # launcher-only flags
    problems = []
    for key, value in values.items():
        if key not in actions:
            problems.append(f"unknown key {key!r}{did_you_mean(str(key), actions)}")
            continue
        action = actions[key]
        try:
            values[key] = _convert(action, value)
        except (TypeError, ValueError):
            problems.append(f"{key}: {value!r} is not a valid {getattr(action.type, '__name__', 'value')}")
            continue
        items = values[key] if isinstance(values[key], list) else [values[key]]
        if action.choices and any(v not in action.choices for v in items if v is not None):
            problems.append(f"{key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    if problems:
        raise UserError(f"--config {path}: " + "; ".join(problems))
    return values


def _convert(action: argparse.Action, value: Any) -> Any:
    if value is None or action.type is None:
        return value
    if action.nargs in ("*", "+"):
        return [action.type(v) for v in (value if isinstance(value, list) else [value])]
    return action.type(value)


def _given(argv: list[str], flag: str) -> bool:
    return any(token == flag or token.startswith(flag + "=") for token in argv)


def parse_finetune_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse training flags with the YAML layer; the demo recipe when no data is named.

    Every flag problem (``checks.check_finetune_flags``) is reported at once, before any data or model is read.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_finetune_parser()
    first = parser.parse_args(argv)
    config_file = first.config
    if config_file is None and not _given(argv, "--data"):
        config_file = str(DEMO_CONFIG)
        logging.getLogger(__name__).info("no --data given: running the demo recipe of %s", DEMO_CONFIG)
    if config_file:
        parser.set_defaults(**_load_yaml(config_file, parser))
    args = parser.parse_args(argv)
    args.config = config_file
    check_finetune_flags(args)
    return args


def _wrapped_user_error(exc: BaseException) -> UserError | None:
    """Our UserError inside a library's own exception (``raise ... from``): datasets wraps what its generator
    raised in DatasetGenerationError, so a malformed file would otherwise end in three chained tracebacks."""
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, UserError):
            return cause
        cause = cause.__cause__
    return None


def _out_of_space_error(exc: BaseException) -> UserError | None:
    """A full disk (or file size limit) anywhere below us: named, with what to do; finished work is on disk."""
    from .files import is_out_of_space

    if not is_out_of_space(exc):
        return None
    filename = getattr(exc, "filename", None)
    where = f" writing {filename}" if filename else ""
    return UserError(f"out of disk space{where} ({exc}); free some space and run the same command again: "
                     "what was finished is kept and resumed")


def run_cli(main: Callable[[], int]) -> int:
    """Run an entry point: user mistakes print one ``error:`` line and exit 2; bugs keep their traceback."""
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="%(message)s", stream=sys.stderr)
    # Noise users can do nothing about: bitsandbytes' optional CPU kernel probe, and
    # peft calling a transformers API that transformers has renamed.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's start-up self-checks
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        return main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        mistake = _wrapped_user_error(exc) or _out_of_space_error(exc)
        if mistake is None:
            raise
        print(f"error: {mistake}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
