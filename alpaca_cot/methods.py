"""PEFT method registry: ``--peft_type`` name -> how to build its adapter config.

Each row turns the run's flags into a ``peft`` config. Add a method by adding a
row to ``METHODS``.
"""

from __future__ import annotations

import logging
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import UserError, unknown_name
from .models import ModelFamily, linear_module_names
from .registry import build_registry

logger = logging.getLogger(__name__)


def lora_targets(args: Namespace, family: ModelFamily, model: Any) -> list[str] | str:
    """``--lora_target_modules`` (or the family default), checked against the model's Linear layers."""
    requested = list(args.lora_target_modules or family.lora_targets)
    if requested == ["all"]:
        return "all-linear"
    return _checked_targets(requested, model, "--lora_target_modules (or 'all')")


def _lora(args: Namespace, family: ModelFamily, model: Any, total_steps: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=lora_targets(args, family, model),
        bias="none",
        use_dora=args.use_dora,
        use_rslora=args.use_rslora,
    )


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

    return IA3Config(task_type="CAUSAL_LM", target_modules=list(family.ia3_targets),
                     feedforward_modules=list(family.ia3_feedforward))


def _checked_targets(requested: list[str], model: Any, flag: str) -> list[str]:
    available = linear_module_names(model)
    missing = [name for name in requested if name not in available]
    if missing:
        raise UserError(f"{flag}: {', '.join(missing)} not in this model; "
                        f"its Linear layers are: {', '.join(available)}")
    return requested


def _bottleneck(kind: str) -> Callable[[Namespace, ModelFamily, Any, int], Any]:
    def build(args: Namespace, family: ModelFamily, model: Any, total_steps: int) -> Any:
        from alpaca_cot_peft import BottleneckConfig

        default = {"houlsby": family.bottleneck_sequential, "pfeiffer": family.bottleneck_pfeiffer,
                   "parallel": family.bottleneck_parallel}[kind]
        targets = _checked_targets(list(args.lora_target_modules or default), model, "--lora_target_modules")
        scaling = args.adapter_scaling if args.adapter_scaling == "learned" else float(args.adapter_scaling)
        return BottleneckConfig(
            task_type="CAUSAL_LM",
            bottleneck_size=args.bottleneck_size,
            non_linearity=args.non_linearity,
            adapter_dropout=args.adapter_dropout,
            target_modules=targets,
            input_side_modules=[t for t in targets if t in family.bottleneck_input_side] if kind == "houlsby" else [],
            use_parallel_adapter=kind == "parallel",
            use_adapterp=kind == "pfeiffer",
            scaling=scaling,
            init_weights=args.adapter_init,
        )

    return build


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



METHODS: dict[str, PeftMethod] = build_registry(
    "PEFT method",
    PeftMethod("lora", _lora, "LoRA: low-rank updates of the target Linear layers", lora_family=True),
    PeftMethod("qlora", _lora, "QLoRA: LoRA on a 4-bit NF4, double-quantized base (lora --quantization_bit 4)",
               quantization_bit=4, lora_family=True),
    PeftMethod("adalora", _adalora, "AdaLoRA: LoRA whose rank budget is reallocated while training",
               reallocates_rank=True),
    PeftMethod("ia3", _ia3, "IA3: learned rescaling of keys, values and feed-forward activations"),
    PeftMethod("houlsby", _bottleneck("houlsby"),
               "sequential bottleneck adapters (SadapterH), around the MLP layers"),
    PeftMethod("bottleneck", _bottleneck("houlsby"), "the same as houlsby"),
    PeftMethod("pfeiffer", _bottleneck("pfeiffer"),
               "sequential bottleneck adapter (SadapterP) after the MLP output only"),
    PeftMethod("parallel", _bottleneck("parallel"),
               "parallel bottleneck adapters (P-adapter) beside the attention projections"),
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
