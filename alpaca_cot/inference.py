"""Inference: base model + adapter from a saved run, prompts through the run's template, generation.

A run folder describes itself (``alpaca_cot_run.json``): base model, family and
template come from there, so nobody has to repeat ``--lora_r`` or the base path.
A plain PEFT adapter folder works too (base from its ``adapter_config.json``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import read_json_file
from .data import encode_conversation, special_prefix_ids
from .errors import UserError
from .models import ModelFamily, load_model, load_tokenizer, resolve_family, resolve_model_path, resolve_template
from .outputs import RUN_MANIFEST
from .templates import Message, Template

logger = logging.getLogger(__name__)


GENERATION_PRESETS: dict[str, dict[str, Any]] = {
    # Reproducible answers: the default of every script.
    "greedy": {"do_sample": False, "num_beams": 1, "max_new_tokens": 256, "repetition_penalty": 1.0},
    # What the 2023 generate.py used.
    "original": {"do_sample": True, "temperature": 1.0, "top_p": 0.9, "top_k": 40, "num_beams": 4,
                 "no_repeat_ngram_size": 6, "repetition_penalty": 1.8, "max_new_tokens": 512},
}


@dataclass
class LoadedModel:
    """A model ready to generate, with the tokenizer and prompt format it was trained with."""

    model: Any
    tokenizer: Any
    family: ModelFamily
    template: Template
    base_model: str


def read_run_manifest(lora_dir: Path) -> dict[str, Any]:
    """The run settings saved by training, or ``{}`` for a plain PEFT adapter folder."""
    path = lora_dir / RUN_MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


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
    from .cli import check_generation_args

    if args.lora_dir is None and args.model_name_or_path is None:
        raise UserError("give --lora_dir (a trained adapter) or --model_name_or_path (a base model)")
    check_generation_args(args)  # before the model loads: a typo costs no loading time
    return load_for_inference(args.lora_dir, args.model_name_or_path, args.model_type, args.template,
                              args.trust_remote_code)


def generation_config_from_args(loaded: LoadedModel, args: Any) -> Any:
    """``build_generation_config`` from the flags of ``cli.add_generation_arguments``."""
    return build_generation_config(
        loaded, args.preset, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, num_beams=args.num_beams, repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size)


def build_generation_config(loaded: LoadedModel, preset: str = "greedy", **overrides: Any) -> Any:
    """A ``GenerationConfig`` from a preset plus explicit overrides (``None`` values ignored)."""
    from transformers import GenerationConfig

    settings = dict(GENERATION_PRESETS[preset])
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if "temperature" in overrides and overrides["temperature"] is not None:
        settings["do_sample"] = overrides["temperature"] > 0
        if not settings["do_sample"]:
            settings.pop("temperature")
    if not settings.get("do_sample"):
        for key in ("temperature", "top_p", "top_k"):
            settings.pop(key, None)  # unused when greedy; transformers warns about them
    tokenizer = loaded.tokenizer
    stops = loaded.template.stop_ids(tokenizer)  # EOS, plus the template's end-of-answer tokens
    return GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=stops if len(stops) > 1 else stops[0],
                            **settings)


def prompt_ids(loaded: LoadedModel, messages: list[Message], input_text: str = "") -> list[int]:
    """Token ids of the prompt for the next assistant turn, exactly as in training."""
    ids, _ = encode_conversation(loaded.tokenizer, loaded.template, messages, input_text,
                                 special_prefix_ids(loaded.tokenizer))
    return ids


def generate_token_ids(
    loaded: LoadedModel, prompts: list[list[int]], generation_config: Any, batch_size: int = 8
) -> list[list[int]]:
    """New token ids for each prompt, up to and including its first EOS.

    Batches are left-padded so every answer starts at the same column.
    """
    import torch

    tokenizer, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    eos_ids = stop_token_ids(generation_config)
    answers: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        with torch.no_grad():
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=generation_config)
        for row in output[:, width:].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))
            answers.append(row[:end])  # what follows the first EOS is padding
    return answers


def generate_batch(
    loaded: LoadedModel, prompts: list[list[int]], generation_config: Any, batch_size: int = 8
) -> list[str]:
    """Answer each prompt (token ids) as text."""
    stops = stop_token_ids(generation_config)
    answers = generate_token_ids(loaded, prompts, generation_config, batch_size)
    return [answer_text(loaded, ids, stops) for ids in answers]


def stop_token_ids(generation_config: Any) -> set[int]:
    """The ids that end an answer in ``generation_config`` (its ``eos_token_id``, one id or a list)."""
    eos = generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def answer_text(loaded: LoadedModel, ids: list[int], stops: set[int]) -> str:
    """The text of generated ``ids`` without the stop token that ended them: some families' end markers are not
    special tokens to their tokenizer (ChatGLM3's ``<|user|>``, InternLM's ``<eoa>``), so decoding would print them."""
    if ids and ids[-1] in stops:
        ids = ids[:-1]
    return loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()


def answer(loaded: LoadedModel, instruction: str, input_text: str = "", generation_config: Any = None) -> str:
    """Answer one instruction (with optional input) through the run's template."""
    config = generation_config or build_generation_config(loaded)
    messages = [Message("user", instruction)]
    return generate_batch(loaded, [prompt_ids(loaded, messages, input_text)], config, batch_size=1)[0]
