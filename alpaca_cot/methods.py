"""PEFT method registry: ``--peft_type`` name -> how to build its adapter config.

Each row turns the run's flags into a ``peft`` config. Add a method by adding a
row to ``METHODS``.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
from argparse import Namespace
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import UserError, unknown_name
from .models import ModelFamily, linear_module_names
from .module_roles import adaptable_layer_names, find_module_roles
from .registry import build_registry

logger = logging.getLogger(__name__)

EXTENSION_SOURCE = Path(__file__).resolve().parent.parent / "peft" / "src" / "alpaca_cot_peft"


def extension_tables() -> ModuleType:
    """The peft/ extension's plain-data tables (``alpaca_cot_peft/tables.py``: placements, non-linearities,
    initialisations), read without importing the extension, which imports torch and peft (seconds), and which
    may not be installed: the command line offers its names as choices, and a missing extension is reported only
    when a bottleneck method is built. Loaded as the extension's own ``alpaca_cot_peft.tables`` module, so the
    extension, imported later, shares it."""
    name = "alpaca_cot_peft.tables"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("alpaca_cot_peft")  # finds the installed extension without importing it
    folders = [Path(f) for f in (spec.submodule_search_locations or [])] if spec else []
    path = next((f / "tables.py" for f in folders if (f / "tables.py").is_file()), EXTENSION_SOURCE / "tables.py")
    tables_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(tables_spec)
    sys.modules[name] = module
    try:
        tables_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


_TABLES = extension_tables()
BOTTLENECK_PLACEMENTS: dict[str, Any] = _TABLES.PLACEMENTS  # --peft_type houlsby / pfeiffer / parallel
NON_LINEARITIES: dict[str, str] = _TABLES.NON_LINEARITIES  # --non_linearity
ADAPTER_INITS: dict[str, str] = _TABLES.INIT_SCHEMES  # --adapter_init -> what it does


def default_targets(family: ModelFamily, field: str, model: Any, linear_only: bool = False) -> list[str]:
    """The row's targets in ``field`` (e.g. ``lora_targets``); the generic row's name roles (module_roles.ROLES),
    found here in ``model``: ``linear_only`` for adapters that wrap ``nn.Linear`` layers only."""
    names = getattr(family, field)
    if not family.generic:
        return upstream_names_in_model(family, model, list(names))
    roles = find_module_roles(model, linear_only)
    found = list(dict.fromkeys(target for role in names for target in roles[role]))
    logger.info("generic row: %s = %s, found in the model as %s", field, "+".join(names), ", ".join(found) or "none")
    return found


def upstream_names_in_model(family: ModelFamily, model: Any, names: list[str]) -> list[str]:
    """Module names written for the family's upstream checkpoints (the row's defaults, the original README's
    ``--lora_target_modules``) as ``model`` calls them: our native copy of a remote-code checkpoint splits fused
    layers (ChatGLM2's ``query_key_value`` is ``q_proj k_proj v_proj`` there)."""
    from .remote.loading import native_module_names

    native = native_module_names(family, model, names)
    if native != names:
        logger.info("converted %s model: targets %s are %s in it", family.name, " ".join(names), " ".join(native))
    return native


def _method_defaults(family: ModelFamily, field: str, model: Any, flag: str, linear_only: bool = False) -> list[str]:
    """The family's default targets for a method, or a UserError saying the model has none there."""
    targets = default_targets(family, field, model, linear_only)
    if not targets:
        why = "a model without attention modules, or experts fused into one tensor, has none there"
        if linear_only:
            why += "; bottleneck adapters wrap nn.Linear layers only, not transformers' Conv1D"
        raise UserError(f"{flag}: this model has no layer to adapt in its {' / '.join(getattr(family, field))} "
                        f"modules ({why}); name the layers to adapt, one of: "
                        f"{', '.join(adaptable_layer_names(model, linear_only))}")
    return targets


def lora_targets(args: Namespace, family: ModelFamily, model: Any) -> list[str] | str:
    """``--lora_target_modules`` (or the family default), checked against the model's Linear layers."""
    if not args.lora_target_modules and family.generic:
        return _method_defaults(family, "lora_targets", model, "--lora_target_modules")
    requested = list(args.lora_target_modules or family.lora_targets)
    if requested == ["all"]:
        return "all-linear"
    requested = upstream_names_in_model(family, model, requested)
    return _checked_targets(requested, model, "--lora_target_modules (or 'all')")


def _lora(args: Namespace, family: ModelFamily, model: Any, total_steps: int) -> Any:
    from peft import LoraConfig

    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=lora_targets(args, family, model),
        bias="none",
        use_dora=args.use_dora,
        use_rslora=args.use_rslora,
    )
    if config.lora_dropout and _adapts_fused_experts(config, model):
        logger.info("LoRA reaches this model's fused expert weights, which take no dropout: --lora_dropout 0")
        config.lora_dropout = 0.0
    return config


def _adapts_fused_experts(config: Any, model: Any) -> bool:
    """Whether PEFT will put part of this LoRA on Parameters rather than layers.

    transformers 5 fuses the experts of several mixture-of-experts models (Mixtral, DeepSeek-V3, Qwen3-MoE, ...)
    into one tensor each, and PEFT maps the experts' transformers-4 layer names (``gate_proj``, ``w1``, the router's
    ``gate``; 'all' includes them) onto those tensors; it refuses dropout there.
    """
    import copy

    try:
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError:  # a PEFT without the mapping adapts layers only
        return False
    probe = copy.deepcopy(config)
    convert_peft_config_for_transformers(probe, model=model, conversions=get_model_conversion_mapping(model))
    return bool(getattr(probe, "target_parameters", None))


def _adalora(args: Namespace, family: ModelFamily, model: Any, total_steps: int) -> Any:
    from peft import AdaLoraConfig

    tinit, tfinal = args.adalora_tinit, args.adalora_tfinal
    if tinit + tfinal >= total_steps:
        # peft needs a budgeting phase between warm-up and final fine-tuning;
        # keep the original's proportions on a short run instead of failing.
        tinit, tfinal = total_steps // 5, total_steps // 5
        logger.info("AdaLoRA schedule scaled to this %d-step run: tinit %d, tfinal %d", total_steps, tinit, tfinal)
    return AdaLoraConfig(
        task_type="CAUSAL_LM",
        init_r=args.adalora_init_r,
        target_r=args.lora_r,
        beta1=0.85,
        beta2=0.85,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=args.adalora_delta_t,
        total_step=total_steps,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=lora_targets(args, family, model),
    )


def _ia3(args: Namespace, family: ModelFamily, model: Any, total_steps: int) -> Any:
    from peft import IA3Config

    targets = _method_defaults(family, "ia3_targets", model, "--peft_type ia3")
    return IA3Config(task_type="CAUSAL_LM", target_modules=targets,
                     feedforward_modules=default_targets(family, "ia3_feedforward", model))


def _checked_targets(requested: list[str], model: Any, flag: str, linear_only: bool = False) -> list[str]:
    # transformers' Conv1D (GPT-2) takes LoRA and IA3 like a Linear; bottleneck adapters wrap nn.Linear only
    available = sorted(set(linear_module_names(model)) | set(adaptable_layer_names(model, linear_only)))
    missing = [name for name in requested if name not in available]
    if missing:
        raise UserError(f"{flag}: {', '.join(missing)} not in this model; "
                        f"its Linear layers are: {', '.join(available)}")
    return requested


def _bottleneck(placement: Any) -> Callable[[Namespace, ModelFamily, Any, int], Any]:
    """The builder of a row of the extension's placement table: its targets come from the model row's
    ``bottleneck_<placement.targets>`` field (and ``bottleneck_input_side`` where the placement has an input side)."""
    kind = placement.name

    def build(args: Namespace, family: ModelFamily, model: Any, total_steps: int) -> Any:
        try:
            from alpaca_cot_peft import BottleneckConfig
        except ImportError as exc:
            if getattr(exc, "name", None) == "alpaca_cot_peft":
                raise UserError(f"--peft_type {kind} needs the extension in peft/: pip install -e ./peft") from exc
            if type(exc).__name__ == "IncompatiblePeftError":  # a peft too old, or of another shape
                raise UserError(f"--peft_type {kind}: {exc}") from exc
            raise

        field = f"bottleneck_{placement.targets}"
        flag = "--lora_target_modules"
        if args.lora_target_modules or not family.generic:
            requested = upstream_names_in_model(family, model, list(args.lora_target_modules or getattr(family, field)))
            targets = _checked_targets(requested, model, flag, True)
        else:
            targets = _method_defaults(family, field, model, f"--peft_type {kind} (or {flag})", linear_only=True)
        input_side = []
        if placement.input_side:
            sides = default_targets(family, "bottleneck_input_side", model, linear_only=True)
            input_side = [_input_side_pattern(t) for t in targets if t in sides]
        scaling = args.adapter_scaling if args.adapter_scaling == "learned" else float(args.adapter_scaling)
        return BottleneckConfig(
            task_type="CAUSAL_LM",
            bottleneck_size=args.bottleneck_size,
            non_linearity=args.non_linearity,
            adapter_dropout=args.adapter_dropout,
            target_modules=targets,
            input_side_modules=input_side,
            scaling=scaling,
            init_weights=args.adapter_init,
            **placement.config_fields(),
        )

    return build


def _input_side_pattern(target: str) -> str:
    """An input-side entry for a target: the extension compares short names, or fullmatches full module names;
    a dotted suffix (the generic row's ``mlp.gate_proj``) becomes a pattern for the names it ends."""
    return f"(.*\\.)?{re.escape(target)}" if "." in target else target


def _prompt(args: Namespace, family: ModelFamily, model: Any, total_steps: int) -> Any:
    from peft import PromptTuningConfig

    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.num_virtual_tokens)


def _p_tuning(args: Namespace, family: ModelFamily, model: Any, total_steps: int) -> Any:
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=args.num_virtual_tokens,
        encoder_hidden_size=args.prompt_encoder_hidden_size,
    )


def _prefix(args: Namespace, family: ModelFamily, model: Any, total_steps: int) -> Any:
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=args.num_virtual_tokens,
        encoder_hidden_size=args.prompt_encoder_hidden_size,
        prefix_projection=True,
    )


def _full(args: Namespace, model: Any) -> None:
    model.requires_grad_(True)


def _freeze(args: Namespace, model: Any) -> None:
    """Train only the last ``--trainable_layers`` decoder layers (the rest, embeddings included, stay frozen)."""
    layers = _decoder_layers(model)
    if not 1 <= args.trainable_layers <= len(layers):
        raise UserError(f"--trainable_layers must be between 1 and {len(layers)} (the model's layers), "
                        f"got {args.trainable_layers}")
    model.requires_grad_(False)
    for layer in layers[-args.trainable_layers:]:
        layer.requires_grad_(True)


def _decoder_layers(model: Any) -> Any:
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise UserError("--peft_type freeze: cannot find the model's list of decoder layers")
    return max(lists, key=len)  # the decoder stack is the longest ModuleList


@dataclass(frozen=True)
class PeftMethod:
    """One ``--peft_type``."""

    name: str
    # (args, family, model, total_steps) -> a peft config; None for methods that train the model's own weights
    build_config: Callable[[Namespace, ModelFamily, Any, int], Any] | None
    description: str
    select_trainable: Callable[[Namespace, Any], None] | None = None  # full / freeze: which own weights train
    gradient_checkpointing: bool = True  # prefix tuning's past_key_values break checkpointing
    reallocates_rank: bool = False  # AdaLoRA: the trainer must call update_and_allocate every step
    quantization_bit: int | None = None  # a method defined by its base's precision (qlora)
    lora_family: bool = False  # has LoRA A/B matrices (--loraplus_lr_ratio applies)
    packs_samples: bool = True  # prompt-learning methods prepend virtual tokens per row, not per sample

    def base_bits(self, requested: int | None) -> int | None:
        """The bits the base model loads in: the method's own (qlora: 4), else what --quantization_bit asks."""
        return self.quantization_bit or requested


# Other --peft_type names of placement rows: the original project's name for its default (Houlsby) adapters.
PLACEMENT_ALIASES = {"bottleneck": "houlsby"}


def _placement_methods() -> Iterator[PeftMethod]:
    """One row per placement of the extension's table, each followed by its aliases."""
    for placement in BOTTLENECK_PLACEMENTS.values():
        yield PeftMethod(placement.name, _bottleneck(placement), placement.description)
        for alias in (a for a, name in PLACEMENT_ALIASES.items() if name == placement.name):
            yield PeftMethod(alias, _bottleneck(placement), f"the same as {placement.name}")


METHODS: dict[str, PeftMethod] = build_registry(
    "PEFT method",
    PeftMethod("lora", _lora, "LoRA: low-rank updates of the target Linear layers", lora_family=True),
    PeftMethod("qlora", _lora, "QLoRA: LoRA on a 4-bit NF4, double-quantized base (lora --quantization_bit 4)",
               quantization_bit=4, lora_family=True),
    PeftMethod("adalora", _adalora, "AdaLoRA: LoRA whose rank budget is reallocated while training",
               reallocates_rank=True),
    PeftMethod("ia3", _ia3, "IA3: learned rescaling of keys, values and feed-forward activations"),
    *_placement_methods(),
    PeftMethod("full", None, "full fine-tuning: every weight trains; the run saves the whole model",
               select_trainable=_full),
    PeftMethod("freeze", None, "partial fine-tuning: only the last --trainable_layers decoder layers train",
               select_trainable=_freeze),
    PeftMethod("prompt", _prompt, "prompt tuning: learned virtual tokens before the input", packs_samples=False),
    PeftMethod("p_tuning", _p_tuning, "P-tuning: virtual tokens from a prompt encoder", packs_samples=False),
    PeftMethod("prefix", _prefix, "prefix tuning (with projection): learned key/value prefixes in every layer",
               gradient_checkpointing=False, packs_samples=False),
)


def get_method(name: str) -> PeftMethod:
    """Return the registry row for ``--peft_type name``."""
    if name not in METHODS:
        raise unknown_name("PEFT method", name, METHODS, "--peft_type")
    return METHODS[name]
