"""Loading a saved run for inference: base model + adapter, with the tokenizer and template it was trained with.

A run folder describes itself (``alpaca_cot_run.json``): base model, family and template come from there, so
nobody has to repeat ``--lora_r`` or the base path. A plain PEFT adapter folder works too (base from its
``adapter_config.json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import read_json_file
from ..models import ModelFamily, load_model, load_tokenizer, resolve_family, resolve_model_path, resolve_template
from ..run_folder import read_run_manifest
from ..templates import Template


@dataclass
class LoadedModel:
    """A model ready to generate, with the tokenizer and prompt format it was trained with."""

    model: Any
    tokenizer: Any
    family: ModelFamily
    template: Template
    base_model: str


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(
    lora_dir: str | None = None,
    model_name_or_path: str | None = None,
    model_type: str | None = None,
    template: str | None = None,
    trust_remote_code: bool = False,
    quantized: bool = True,
) -> LoadedModel:
    """Load base model (+ adapter from ``lora_dir``); explicit arguments override the saved run.

    ``quantized=False`` loads a base that was trained in 4/8 bit at full precision (for merging).
    """
    import torch

    manifest: dict[str, Any] = {}
    if lora_dir is not None:
        folder = Path(lora_dir)
        manifest = read_run_manifest(folder)
        if manifest.get("saved") == "model":  # full / freeze runs: the run folder is the checkpoint
            if model_name_or_path is not None:
                raise UserError(f"--lora_dir: {folder} holds a whole fine-tuned model, not an adapter; "
                                "drop --model_name_or_path")
            manifest = {**manifest, "base_model": str(folder), "quantization_bit": None}
            lora_dir = None
        elif not (folder / "adapter_config.json").is_file():
            raise UserError(f"--lora_dir: {folder} holds no adapter (adapter_config.json missing)")
        else:
            adapter_config = read_json_file(folder / "adapter_config.json", "--lora_dir",
                                            "the adapter is damaged: copy or train it again")
            manifest = manifest or {"base_model": adapter_config.get("base_model_name_or_path")}
    base = model_name_or_path or manifest.get("base_model")
    if not base:
        raise UserError("--model_name_or_path is needed: the adapter does not say which base model it belongs to")
    model_path = resolve_model_path(base)
    trust_remote_code = trust_remote_code or bool(manifest.get("trust_remote_code"))
    family = resolve_family(model_type or manifest.get("model_type"), model_path, trust_remote_code)
    prompt_format = resolve_template(template or manifest.get("template"), family)
    device = default_device()
    dtype = torch.float32 if device == "cpu" else (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    tokenizer_source = lora_dir if lora_dir and (Path(lora_dir) / "tokenizer_config.json").is_file() else model_path
    tokenizer = load_tokenizer(tokenizer_source, family, trust_remote_code)
    quantization_bit = manifest.get("quantization_bit") if quantized else None
    model = load_model(model_path, family, dtype, quantization_bit, device_map={"": device},
                       trust_remote_code=trust_remote_code)
    if lora_dir is not None:
        from peft import PeftModel
        from safetensors import SafetensorError

        import alpaca_cot_peft  # noqa: F401 - registers the bottleneck adapters with PEFT

        try:
            model = PeftModel.from_pretrained(model, lora_dir)
        except SafetensorError as exc:
            weights = Path(lora_dir) / "adapter_model.safetensors"
            raise UserError(f"--lora_dir: the adapter weights {weights} are unreadable ({exc}); the file is "
                            "truncated or corrupt: copy or train it again") from exc
        except (ValueError, KeyError, RuntimeError) as exc:  # PEFT's "not found", shape mismatches
            raise UserError(_adapter_mismatch(lora_dir, base, model, exc)) from exc
    model.eval()
    return LoadedModel(model, tokenizer, family, prompt_format, base)


def _adapter_mismatch(lora_dir: str, base: str, model: Any, error: Exception) -> str:
    """The one line for an adapter that does not fit the loaded base."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    hint = "was it trained on another base model? pass that one with --model_name_or_path"
    if getattr(model.config, "alpaca_cot_converted_from", None):
        hint = ("this base loads as our native copy of a remote-code checkpoint, whose fused layers "
                "(query_key_value, W_pack, wqkv) are split: an adapter trained on the checkpoint's own code does not "
                "fit it; train the adapter again")
    return f"--lora_dir: the adapter in {lora_dir} does not fit the base model {base} ({first}); {hint}"


def load_from_args(args: Any) -> LoadedModel:
    """``load_for_inference`` from the flags of ``cli.add_model_arguments``."""
    from ..checks import check_generation_flags

    if args.lora_dir is None and args.model_name_or_path is None:
        raise UserError("give --lora_dir (a trained adapter) or --model_name_or_path (a base model)")
    check_generation_flags(args)  # before the model loads: a typo costs no loading time
    return load_for_inference(args.lora_dir, args.model_name_or_path, args.model_type, args.template,
                              args.trust_remote_code)
