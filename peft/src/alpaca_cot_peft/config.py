"""Configuration of bottleneck adapters (Houlsby, Pfeiffer and parallel)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from .registration import BOTTLENECK
from .tables import INIT_SCHEMES, NON_LINEARITIES


@dataclass
class BottleneckConfig(PeftConfig):
    """Where bottleneck adapters go and how they are shaped; every field is saved in adapter_config.json."""

    bottleneck_size: int = field(default=256, metadata={"help": "Width of the down-projection."})
    non_linearity: str = field(default="tanh", metadata={"help": f"One of {', '.join(NON_LINEARITIES)}."})
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names (or a regex) of the Linear layers that get an adapter."})
    input_side_modules: list[str] = field(
        default_factory=list,
        metadata={"help": "Sequential adapters on these targets sit before the frozen layer; others after it."})
    use_parallel_adapter: bool = field(default=False, metadata={"help": "Parallel adapter: layer(x) + f(x)."})
    use_adapterp: bool = field(default=False, metadata={"help": "Marks a Pfeiffer (output-side only) setup."})
    scaling: float | str = field(default=1.0, metadata={"help": "Output multiplier, or 'learned'."})
    bias: str = field(default="none", metadata={"help": "'none' or 'adapter_only' (projections get biases)."})
    init_weights: str = field(
        default="mam_adapter",
        metadata={"help": "'mam_adapter' (Kaiming down, zero up: starts as identity) or 'bert' (normal 0.02)."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules trained and saved."})

    # Non-linear in its input: there is no weight update to fold into the base.
    mergeable = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = BOTTLENECK
        problems = []
        if self.bottleneck_size < 1:
            problems.append(f"bottleneck_size must be at least 1 (got {self.bottleneck_size})")
        if self.non_linearity not in NON_LINEARITIES:
            problems.append(f"non_linearity {self.non_linearity!r} is not one of {', '.join(NON_LINEARITIES)}")
        if not 0 <= self.adapter_dropout < 1:
            problems.append(f"adapter_dropout must be in [0, 1) (got {self.adapter_dropout})")
        if not (self.scaling == "learned" or isinstance(self.scaling, (int, float))):
            problems.append(f"scaling must be a number or 'learned' (got {self.scaling!r})")
        if self.bias not in ("none", "adapter_only"):
            problems.append(f"bias must be 'none' or 'adapter_only' (got {self.bias!r})")
        if self.init_weights not in INIT_SCHEMES:
            problems.append(f"init_weights must be {' or '.join(map(repr, INIT_SCHEMES))} (got {self.init_weights!r})")
        if problems:
            raise ValueError("BottleneckConfig: " + "; ".join(problems))
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
