"""The extension's vocabulary as plain data: activations, initialisations, placements and default targets.

Nothing here imports torch or peft (nor anything of this package), so a command line can offer these names as
choices before anything heavy loads: Alpaca-CoT reads this file on its own (``alpaca_cot.methods``). The rest of
the extension reads its names from here too, so a new row is one edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# ``non_linearity`` -> the ``torch.nn`` activation class between the two projections
NON_LINEARITIES: dict[str, str] = {"tanh": "Tanh", "relu": "ReLU", "gelu": "GELU", "silu": "SiLU", "sigmoid": "Sigmoid"}

# ``init_weights`` -> how a fresh adapter's projections start
INIT_SCHEMES: dict[str, str] = {
    "mam_adapter": "zero up-projection (starts as identity)",  # Kaiming-uniform down-projection
    "bert": "normal(0, 0.02)",  # both projections
}


@dataclass(frozen=True)
class Placement:
    """One arrangement of bottleneck adapters in a model, and the ``BottleneckConfig`` switches that select it."""

    name: str
    targets: str  # the list of DEFAULT_TARGETS (and of Alpaca-CoT's model rows) it adapts by default
    description: str
    input_side: bool = False  # the "input_side" targets take their adapter before the layer, the others after it
    use_parallel_adapter: bool = False
    use_adapterp: bool = False

    def config_fields(self) -> dict[str, bool]:
        """The ``BottleneckConfig`` fields that select this placement."""
        return {"use_parallel_adapter": self.use_parallel_adapter, "use_adapterp": self.use_adapterp}


PLACEMENTS: dict[str, Placement] = {row.name: row for row in (
    Placement("houlsby", "sequential", "sequential bottleneck adapters (SadapterH), around the MLP layers",
              input_side=True),
    Placement("pfeiffer", "pfeiffer", "sequential bottleneck adapter (SadapterP) after the MLP output only",
              use_adapterp=True),
    Placement("parallel", "parallel", "parallel bottleneck adapters (P-adapter) beside the attention projections",
              use_parallel_adapter=True),
)}


def placement_of(config: Any) -> Placement:
    """The placement a config's switches select; ``use_parallel_adapter`` wins over ``use_adapterp``, as in the
    layers (a parallel adapter sits beside its layer whatever else is set)."""
    parallel = bool(config.use_parallel_adapter)
    wanted = {"use_parallel_adapter": parallel, "use_adapterp": bool(config.use_adapterp) and not parallel}
    return next(row for row in PLACEMENTS.values() if row.config_fields() == wanted)


# Default targets when ``target_modules`` is not given (the fork's), per ``model_type`` and placement ``targets``:
# sequential adapters on the MLP, input side on its first projections; parallel adapters on the attention projections.
DEFAULT_TARGETS: dict[str, dict[str, list[str]]] = {
    "llama": {"sequential": ["gate_proj", "up_proj", "down_proj"], "input_side": ["gate_proj", "up_proj"],
              "pfeiffer": ["down_proj"], "parallel": ["q_proj", "k_proj", "v_proj"]},
    "bloom": {"sequential": ["dense_h_to_4h", "dense_4h_to_h"], "input_side": ["dense_h_to_4h"],
              "pfeiffer": ["dense_4h_to_h"], "parallel": ["query_key_value"]},
}
