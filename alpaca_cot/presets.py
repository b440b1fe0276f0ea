"""Generation settings: the ``--preset`` registry and the generation flags that override a preset.

Plain data (nothing here loads a model), so the command line reads ``--preset``'s choices and the generation
flags from these tables; ``infer.generation`` builds a ``GenerationConfig`` from them. Add a preset or a flag by
adding a row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .registry import build_registry


@dataclass(frozen=True)
class GenerationPreset:
    """One ``--preset``: ``GenerationConfig`` settings that the generation flags override."""

    name: str
    settings: Mapping[str, Any]
    description: str


GENERATION_PRESETS: dict[str, GenerationPreset] = build_registry(
    "generation preset",
    GenerationPreset("greedy", {"do_sample": False, "num_beams": 1, "max_new_tokens": 256, "repetition_penalty": 1.0},
                     "reproducible"),
    GenerationPreset("original", {"do_sample": True, "temperature": 1.0, "top_p": 0.9, "top_k": 40, "num_beams": 4,
                                  "no_repeat_ngram_size": 6, "repetition_penalty": 1.8, "max_new_tokens": 512},
                     "the 2023 project's sampling settings"),  # what the 2023 generate.py used
)
DEFAULT_PRESET = "greedy"  # reproducible answers: the default of every script


@dataclass(frozen=True)
class GenerationFlag:
    """One generation flag of every inference script (``--NAME``): unset, the preset's value holds."""

    name: str  # also the GenerationConfig keyword it sets
    type: type
    lowest: float  # the smallest value allowed (checks.GENERATION_BOUNDS)
    lowest_allowed: bool = True  # whether ``lowest`` itself is allowed
    help: str | None = None


GENERATION_FLAGS: dict[str, GenerationFlag] = build_registry(
    "generation flag",
    GenerationFlag("max_new_tokens", int, 1),
    GenerationFlag("temperature", float, 0, help="> 0 samples; 0 is greedy"),
    GenerationFlag("top_p", float, 0, lowest_allowed=False),  # and at most 1
    GenerationFlag("top_k", int, 0),
    GenerationFlag("num_beams", int, 1),
    GenerationFlag("repetition_penalty", float, 0, lowest_allowed=False),
    GenerationFlag("no_repeat_ngram_size", int, 0),
)


def generation_overrides(args: Any) -> dict[str, Any]:
    """The generation flags' values in ``args`` (None where unset), keyed by ``GenerationConfig`` keyword."""
    return {name: getattr(args, name) for name in GENERATION_FLAGS}
