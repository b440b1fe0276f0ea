"""Every check that can run before anything loads, one table or rule per flag.

Each problem is one line naming its flags; a command's problems are collected and reported together in one
``error:`` line, so a user with two mistakes learns of both in one run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import os
from argparse import Namespace
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import UserError
from .presets import GENERATION_FLAGS, GENERATION_PRESETS

T = TypeVar("T")

DEEPSPEED_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"
# Quantized bases DeepSpeed ZeRO-3 and FSDP cannot shard: bitsandbytes packs the weights into
# integer tensors that these engines would have to flatten and split across ranks.
_SHARDING_REFUSES_QUANTIZATION = "shards the base weights, which cannot be 4/8-bit here"


class Problems:
    """The problems found so far; ``raise_if_any`` reports them all in one :class:`UserError`."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        """Note one problem (the same line twice is noted once)."""
        if message not in self.messages:
            self.messages.append(message)

    def attempt(self, resolve: Callable[[], T]) -> T | None:
        """``resolve()``; on a :class:`UserError` its message is noted and None returned, so checking goes on."""
        try:
            return resolve()
        except UserError as exc:
            self.add(str(exc))
            return None

    def raise_if_any(self, prefix: str = "") -> None:
        """Raise one :class:`UserError` listing every problem noted, if any."""
        if self.messages:
            raise UserError(prefix + "; ".join(self.messages))


@contextlib.contextmanager
def collecting(problems: Problems | None) -> Iterator[Problems]:
    """Add to the caller's ``problems``; without one, collect here and raise when the block ends."""
    found = Problems() if problems is None else problems
    yield found
    if problems is None:
        found.raise_if_any()


@dataclass(frozen=True)
class Bound:
    """The lowest value a numeric flag takes; a flag left unset (None) is not checked."""

    flag: str
    lowest: float
    inclusive: bool = True  # whether ``lowest`` itself is allowed

    def problem(self, args: Namespace) -> str | None:
        """The line for this flag's value in ``args``, or None when it is in range."""
        value = getattr(args, self.flag, None)
        if value is None or value > self.lowest or (self.inclusive and value == self.lowest):
            return None
        return f"--{self.flag} must be {'at least' if self.inclusive else 'more than'} {self.lowest} (got {value})"


TRAINING_BOUNDS = (
    *(Bound(name, 1) for name in (
        "per_gpu_train_batch_size", "gradient_accumulation_steps", "cutoff_len", "lora_r", "lora_alpha",
        "bottleneck_size", "num_virtual_tokens", "prompt_encoder_hidden_size", "save_total_limit", "adalora_init_r",
        "adalora_delta_t", "trainable_layers", "ddp_timeout", "save_steps", "logging_steps", "packing_len",
        "preprocessing_num_workers")),
    Bound("adalora_tinit", 0), Bound("adalora_tfinal", 0), Bound("val_set_size", 0), Bound("heldout_eval", 0),
    Bound("loss_chunk_size", 0), Bound("learning_rate", 0, inclusive=False),
    Bound("loraplus_lr_ratio", 0, inclusive=False),
)
# Generation flags of every inference script, and the serving caps of web.py.
GENERATION_BOUNDS = (
    *(Bound(flag.name, flag.lowest, flag.lowest_allowed) for flag in GENERATION_FLAGS.values()),
    Bound("max_context", 1), Bound("max_new_tokens_cap", 1), Bound("max_prompt_tokens", 1),
)
WEB_BOUNDS = (Bound("max_request_bytes", 1), Bound("max_queue", 0))
PREDICT_BOUNDS = (Bound("predict_batch_size", 1), Bound("cutoff_len", 1))
EVALUATE_BOUNDS = (Bound("limit", 1), Bound("eval_batch_size", 1), Bound("cutoff_len", 1),
                   Bound("judge_retries", 0), Bound("judge_max_tokens", 1))


def check_bounds(args: Namespace, bounds: tuple[Bound, ...], problems: Problems) -> None:
    """Note every flag of ``bounds`` whose value in ``args`` is out of range."""
    for bound in bounds:
        if (line := bound.problem(args)) is not None:
            problems.add(line)


def check_generation_flags(args: Namespace, problems: Problems | None = None) -> None:
    """The generation flags (``cli.add_generation_arguments``) and serving caps, before any model loads."""
    with collecting(problems) as found:
        check_bounds(args, GENERATION_BOUNDS, found)
        if getattr(args, "top_p", None) is not None and args.top_p > 1:
            found.add(f"--top_p must be at most 1 (got {args.top_p})")


def check_streaming_flags(args: Namespace) -> None:
    """``server.py`` streams answers token by token: beam search (from ``--num_beams`` or the preset) cannot."""
    beams = args.num_beams if args.num_beams is not None else GENERATION_PRESETS[args.preset].settings.get("num_beams")
    if beams and beams > 1:
        raise UserError("--num_beams: answers are streamed token by token, which needs --num_beams 1")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name, or "" (every address)
        return False


def check_web_flags(options: Any) -> None:
    """``web.py``: an API reachable off this machine (``--host``, ``--share``) needs a key; limits; the port."""
    with collecting(None) as found:
        key = options.api_key
        if key is not None and (not key or not key.isascii() or not key.isprintable() or " " in key):
            found.add("--api_key (or ALPACA_COT_API_KEY) must be printable ASCII without spaces: it travels in an "
                      "HTTP header")
        elif not key:
            if not is_loopback(options.host):
                found.add(f"--host {options.host} exposes the API to the network: set --api_key (or "
                          "ALPACA_COT_API_KEY)")
            if options.share:
                found.add("--share exposes the page and the API through a public link: set --api_key (or "
                          "ALPACA_COT_API_KEY)")
        check_bounds(options, WEB_BOUNDS, found)
        if not 1 <= options.port <= 65535:
            found.add(f"--port must be between 1 and 65535 (got {options.port})")


def check_predict_flags(args: Namespace) -> None:
    """``predict.py``: sizes, the data file, then the generation flags."""
    with collecting(None) as found:
        check_bounds(args, PREDICT_BOUNDS, found)
        if not Path(args.data).is_file():
            found.add(f"--data: file {args.data} does not exist")
        check_generation_flags(args, found)


def _listing(names: list[str], conjunction: str) -> str:
    """``a``, ``a or b``, ``a, b or c`` (or ``and``); ``none`` for no names."""
    if len(names) < 2:
        return names[0] if names else "none"
    return f"{', '.join(names[:-1])} {conjunction} {names[-1]}"


def check_task_flags(args: Namespace, tasks: Mapping[str, Any], problems: Problems | None = None) -> None:
    """The flags only some evaluation tasks read, against the ``--task`` row of ``tasks`` (``eval.tasks.TASKS``):
    ``--generate`` where the row can score by likelihood (not ``generates``), ``--cot_cue`` where it ``takes_cue``,
    and ``--judge_url`` required where it ``needs_judge``. The messages name the rows that take each flag."""
    with collecting(problems) as found:
        task = tasks[args.task]
        if args.generate and task.generates:
            likelihood = [t.name for t in tasks.values() if not t.generates]
            generating = [t.name for t in tasks.values() if t.generates]
            verb = "generate" if len(generating) > 1 else "generates"
            found.add(f"--generate applies to --task {_listing(likelihood, 'or')} "
                      f"({_listing(generating, 'and')} always {verb})")
        if args.cot_cue and not task.takes_cue:
            found.add(f"--cot_cue applies to --task {_listing([t.name for t in tasks.values() if t.takes_cue], 'or')}")
        if task.needs_judge and not args.judge_url:
            found.add(f"--task {task.name} needs --judge_url (an OpenAI-compatible endpoint)")


def check_evaluate_flags(args: Namespace, tasks: Mapping[str, Any]) -> None:
    """``evaluate.py``: sizes, the flags the ``--task`` row of ``tasks`` reads, then the generation flags."""
    with collecting(None) as found:
        check_bounds(args, EVALUATE_BOUNDS, found)
        check_task_flags(args, tasks, found)
        check_generation_flags(args, found)


def check_training_flags(args: Namespace, problems: Problems | None = None) -> None:
    """Ranges and cross-flag rules of ``uniform_finetune.py``'s own flags."""
    with collecting(problems) as found:
        check_bounds(args, TRAINING_BOUNDS, found)
        if args.max_steps <= 0 and args.epochs <= 0:
            found.add("--epochs must be positive when --max_steps is not set")
        if args.adapter_scaling != "learned":
            try:
                float(args.adapter_scaling)
            except ValueError:
                found.add(f"--adapter_scaling must be a number or 'learned' (got {args.adapter_scaling!r})")
        if args.packing_len is not None and args.packing_len < args.cutoff_len:
            found.add(f"--packing_len {args.packing_len} is shorter than --cutoff_len {args.cutoff_len}: "
                      "raise it or lower --cutoff_len")
        for name in ("adapter_dropout", "lora_dropout"):
            if not 0 <= getattr(args, name) < 1:
                found.add(f"--{name} must be in [0, 1) (got {getattr(args, name)})")
        if not args.data:
            found.add("--data needs at least one dataset name or file")


def check_data_flags(args: Any, problems: Problems | None = None) -> None:
    """The data flags' cross-flag rules (``--streaming``, ``--data_format``)."""
    with collecting(problems) as found:
        if getattr(args, "streaming", False) and getattr(args, "max_steps", -1) <= 0:
            found.add("--streaming needs --max_steps N: a stream has no length, so epochs cannot be counted")
        if getattr(args, "data_format", None):
            from .data.formats import get_format

            found.attempt(lambda: get_format(args.data_format, "--data_format"))


def check_method_flags(args: Namespace, method: Any, problems: Problems | None = None) -> None:
    """Flags that depend on the ``--peft_type`` row: qlora fixes 4 bits; full/freeze and LoRA+ have limits."""
    with collecting(problems) as found:
        if method.quantization_bit and args.quantization_bit not in (None, method.quantization_bit):
            found.add(f"--peft_type {method.name} trains on a {method.quantization_bit}-bit base; "
                      f"drop --quantization_bit {args.quantization_bit}")
        if method.select_trainable and args.quantization_bit:
            found.add(f"--peft_type {method.name} trains the model's own weights, which cannot be 4/8-bit; "
                      "drop --quantization_bit or use lora/qlora")
        if args.loraplus_lr_ratio is not None and not method.lora_family:
            found.add(f"--loraplus_lr_ratio applies to LoRA methods, not --peft_type {method.name}")


def resolve_deepspeed_config(value: str) -> Path:
    """``--deepspeed``: a JSON file, or the name of a shipped config (``zero2``, ``zero3``, ``zero3_offload``)."""
    path = Path(value)
    if not path.is_file() and (DEEPSPEED_CONFIGS / f"{value}.json").is_file():
        path = DEEPSPEED_CONFIGS / f"{value}.json"
    return path


def shipped_deepspeed_configs() -> list[str]:
    """Names of the DeepSpeed configs in ``configs/deepspeed``."""
    return sorted(p.stem for p in DEEPSPEED_CONFIGS.glob("*.json"))


def zero_stage(config: dict[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it has none)."""
    return int(config.get("zero_optimization", {}).get("stage", 0))


def _json_object(path: str | Path, flag: str, problems: Problems) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None with the problem (missing, bad JSON and its line) noted."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.add(f"{flag}: {path} does not exist")
        return None
    except json.JSONDecodeError as exc:
        problems.add(f"{flag}: {path}:{exc.lineno} is not valid JSON ({exc.msg})")
        return None
    if not isinstance(config, dict):
        problems.add(f"{flag}: {path} must hold a JSON object")
        return None
    return config


def _check_deepspeed(args: Namespace, method: Any, quantization_bit: int | None, cuda_available: bool,
                     problems: Problems) -> None:
    path = resolve_deepspeed_config(args.deepspeed)
    config = None
    if not path.is_file():
        problems.add(f"--deepspeed: {args.deepspeed} is neither a file nor a shipped config "
                     f"({', '.join(shipped_deepspeed_configs())})")
    else:
        config = _json_object(path, "--deepspeed", problems)
    if importlib.util.find_spec("deepspeed") is None:
        problems.add("--deepspeed needs the deepspeed package: `pip install deepspeed` (on a CUDA machine)")
    if not cuda_available:
        problems.add("--deepspeed needs CUDA GPUs; on CPUs run data-parallel with torchrun alone")
    if config is not None:
        if zero_stage(config) == 3 and quantization_bit:
            problems.add(f"--deepspeed ZeRO-3 {_SHARDING_REFUSES_QUANTIZATION} (--peft_type {method.name}, "
                         f"{quantization_bit}-bit): use ZeRO-2 (--deepspeed zero2) or plain torchrun")
        if "optimizer" in config and args.loraplus_lr_ratio is not None:
            problems.add(f"--loraplus_lr_ratio builds its own optimizer, but {args.deepspeed} defines one: "
                         "use a config without an \"optimizer\" section (zero2, zero3)")


def _check_fsdp(args: Namespace, method: Any, quantization_bit: int | None, cuda_available: bool, world_size: int,
                problems: Problems) -> None:
    if not cuda_available:
        problems.add("--fsdp needs CUDA GPUs (accelerate runs FSDP on accelerators only; on CPUs it would "
                     "silently fall back to DDP): on CPUs run data-parallel with torchrun alone")
    elif world_size == 1:
        problems.add("--fsdp shards the model across processes: start the run with "
                     "torchrun --nproc_per_node N uniform_finetune.py ... (N = GPUs, 1 is fine)")
    if quantization_bit:
        problems.add(f"--fsdp {_SHARDING_REFUSES_QUANTIZATION} (--peft_type {method.name}, "
                     f"{quantization_bit}-bit): use plain torchrun (DDP) or --deepspeed zero2")
    if getattr(args, "fsdp_config", None):
        _json_object(args.fsdp_config, "--fsdp_config", problems)


def check_parallel_flags(args: Namespace, method: Any, cuda_available: bool, world_size: int = 1,
                         problems: Problems | None = None) -> None:
    """Unsupported --deepspeed / --fsdp combinations, before any model is loaded."""
    with collecting(problems) as found:
        deepspeed, fsdp = getattr(args, "deepspeed", None), getattr(args, "fsdp", False)
        quantization_bit = method.base_bits(args.quantization_bit)
        if deepspeed and fsdp:
            found.add("--deepspeed and --fsdp are two ways of sharding the same model: pass one of them")
        if getattr(args, "fsdp_config", None) and not fsdp:
            found.add("--fsdp_config needs --fsdp")
        if deepspeed:
            _check_deepspeed(args, method, quantization_bit, cuda_available, found)
        if fsdp:
            _check_fsdp(args, method, quantization_bit, cuda_available, world_size, found)


def check_finetune_flags(args: Namespace, cuda_available: bool | None = None, world_size: int | None = None) -> None:
    """Every check of ``uniform_finetune.py``'s flags that needs nothing loaded; all problems in one error.

    ``cuda_available`` and ``world_size`` default to this machine's GPUs and this process's job (WORLD_SIZE).
    """
    from .methods import METHODS

    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))

    with collecting(None) as found:
        check_training_flags(args, found)
        check_data_flags(args, found)
        method = METHODS.get(args.peft_type)
        if method is not None:  # argparse's choices refuse an unknown --peft_type; --config too
            check_method_flags(args, method, found)
            check_parallel_flags(args, method, cuda_available, world_size, found)
