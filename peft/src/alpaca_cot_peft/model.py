"""The PEFT tuner that injects bottleneck adapters into a model's Linear layers."""

from __future__ import annotations

import re
from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .config import BottleneckConfig
from .layer import BottleneckLayer
from .tables import DEFAULT_TARGETS, placement_of


def _short_name(key: str) -> str:
    return key.rsplit(".", 1)[-1]


class BottleneckModel(BaseTuner):
    """``get_peft_model`` builds this for a ``BottleneckConfig``."""

    prefix = "bottleneck_"
    tuner_layer_cls = BottleneckLayer
    target_module_mapping = {arch: rows["sequential"] for arch, rows in DEFAULT_TARGETS.items()}

    def _prepare_adapter_config(self, peft_config: BottleneckConfig, model_config: dict) -> BottleneckConfig:
        if peft_config.target_modules is None:
            rows = DEFAULT_TARGETS.get(model_config.get("model_type", ""))
            if rows is None:
                raise ValueError("BottleneckConfig: give target_modules; no default for model_type "
                                 f"{model_config.get('model_type')!r}")
            placement = placement_of(peft_config)
            peft_config.target_modules = set(rows[placement.targets])
            if placement.input_side:
                peft_config.input_side_modules = list(rows["input_side"])
        return peft_config

    def _placement(self, config: BottleneckConfig, key: str) -> str:
        if config.use_parallel_adapter:
            return "parallel"
        name = _short_name(key)
        inputs = config.input_side_modules or []
        return "input" if name in inputs or any(re.fullmatch(p, key) for p in inputs) else "output"

    def _create_and_replace(self, peft_config: BottleneckConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **kwargs: Any) -> None:
        placement = self._placement(peft_config, current_key)
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config, placement)
            return
        if not hasattr(target, "in_features") or not hasattr(target, "weight"):
            raise ValueError(f"bottleneck adapters wrap Linear layers; {current_key} is a {type(target).__name__}")
        new_module = BottleneckLayer(target, adapter_name, peft_config, placement)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs: Any) -> nn.Module:
        if merge:
            raise ValueError("bottleneck adapters are non-linear and cannot be merged into the base weights")
        return super()._unload_and_optionally_merge(merge=False, **kwargs)
