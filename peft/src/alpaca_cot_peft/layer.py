"""A frozen Linear layer with bottleneck adapters around it.

Placements (``placement`` of each wrapped layer):
- ``input``: sequential, before the layer: the layer sees ``x + s * f(x)``;
- ``output``: sequential, after the layer: ``y + s * f(y)`` with ``y = layer(x)``;
- ``parallel``: beside the layer: ``layer(x) + s * f(x)``;
where ``f = up(act(down(dropout(.))))`` and ``s`` is the (possibly learned) scaling.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import BottleneckConfig
from .tables import NON_LINEARITIES

ACTIVATIONS = {name: getattr(nn, cls) for name, cls in NON_LINEARITIES.items()}
PLACEMENTS = ("input", "output", "parallel")


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """Wraps one ``nn.Linear``; holds one adapter per adapter name."""

    adapter_layer_names = ("bottleneck_down", "bottleneck_up", "bottleneck_scale")
    other_param_names = ("bottleneck_placement", "bottleneck_activation", "bottleneck_dropout",
                         "bottleneck_fixed_scale")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig, placement: str) -> None:
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.base_layer = base_layer
        self.bottleneck_down = nn.ModuleDict()
        self.bottleneck_up = nn.ModuleDict()
        self.bottleneck_scale = nn.ParameterDict()  # only adapters with learned scaling have an entry
        self.bottleneck_placement: dict[str, str] = {}
        self.bottleneck_activation = nn.ModuleDict()
        self.bottleneck_dropout = nn.ModuleDict()
        self.bottleneck_fixed_scale: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.update_layer(adapter_name, config, placement)
        self._active_adapter = adapter_name

    def update_layer(self, adapter_name: str, config: BottleneckConfig, placement: str) -> None:
        """Add (or replace) the adapter ``adapter_name``."""
        outer = {"input": (self.in_features, self.in_features), "output": (self.out_features, self.out_features),
                 "parallel": (self.in_features, self.out_features)}[placement]
        with_bias = config.bias == "adapter_only"
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32  # a 4/8-bit base stores ints
        down = nn.Linear(outer[0], config.bottleneck_size, bias=with_bias, device=weight.device, dtype=dtype)
        up = nn.Linear(config.bottleneck_size, outer[1], bias=with_bias, device=weight.device, dtype=dtype)
        _initialise(down, up, config.init_weights)
        self.bottleneck_down[adapter_name] = down
        self.bottleneck_up[adapter_name] = up
        self.bottleneck_activation[adapter_name] = ACTIVATIONS[config.non_linearity]()
        self.bottleneck_dropout[adapter_name] = nn.Dropout(config.adapter_dropout) if config.adapter_dropout \
            else nn.Identity()
        self.bottleneck_placement[adapter_name] = placement
        if config.scaling == "learned":
            self.bottleneck_scale[adapter_name] = nn.Parameter(torch.ones(1, device=weight.device, dtype=dtype))
        else:
            self.bottleneck_fixed_scale[adapter_name] = float(config.scaling)
        self.set_adapter(self.active_adapters)

    def _adapter(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        down = self.bottleneck_down[name]
        out = self.bottleneck_up[name](self.bottleneck_activation[name](down(
            self.bottleneck_dropout[name](hidden.to(down.weight.dtype)))))
        scale = self.bottleneck_scale[name] if name in self.bottleneck_scale else self.bottleneck_fixed_scale[name]
        return (out * scale).to(hidden.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # noqa: D102
        active = [] if self.disable_adapters else [a for a in self.active_adapters if a in self.bottleneck_down]
        for name in active:
            if self.bottleneck_placement[name] == "input":
                x = x + self._adapter(name, x)
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            placement = self.bottleneck_placement[name]
            if placement == "output":
                result = result + self._adapter(name, result)
            elif placement == "parallel":
                result = result + self._adapter(name, x)
        return result

    def merge(self, *args: Any, **kwargs: Any) -> None:
        """Bottleneck adapters are non-linear: there is no weight delta to fold in."""
        raise ValueError("bottleneck adapters are non-linear and cannot be merged into the base weights")

    def unmerge(self) -> None:  # noqa: D102 - nothing is ever merged
        return None

    def __repr__(self) -> str:
        placements = ", ".join(f"{k}: {v}" for k, v in self.bottleneck_placement.items())
        return f"bottleneck.{super().__repr__()[:-1]}  placements({placements})\n)"


def _mam_adapter(down: nn.Linear, up: nn.Linear) -> None:
    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
    nn.init.zeros_(up.weight)  # a fresh adapter leaves the model's output unchanged


def _bert(down: nn.Linear, up: nn.Linear) -> None:
    nn.init.normal_(down.weight, std=0.02)
    nn.init.normal_(up.weight, std=0.02)


INITIALISERS = {"mam_adapter": _mam_adapter, "bert": _bert}  # one per row of tables.INIT_SCHEMES


def _initialise(down: nn.Linear, up: nn.Linear, scheme: str) -> None:
    INITIALISERS[scheme](down, up)
    for layer in (down, up):
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
