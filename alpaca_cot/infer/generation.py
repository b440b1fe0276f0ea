"""Generation from a loaded run: prompts through the run's template, generation presets, batched decoding."""

from __future__ import annotations

import logging
from typing import Any

from ..data import encode_conversation, special_prefix_ids
from ..presets import DEFAULT_PRESET, GENERATION_PRESETS, generation_overrides
from ..templates import Message
from .loading import LoadedModel

logger = logging.getLogger(__name__)


def generation_config_from_args(loaded: LoadedModel, args: Any, **overrides: Any) -> Any:
    """``build_generation_config`` from ``--preset`` and the generation flags (``presets.GENERATION_FLAGS``, as
    ``cli.add_generation_arguments`` declares them); ``overrides`` win over the flags."""
    return build_generation_config(loaded, args.preset, **{**generation_overrides(args), **overrides})


def build_generation_config(loaded: LoadedModel, preset: str = DEFAULT_PRESET, **overrides: Any) -> Any:
    """A ``GenerationConfig`` from a preset plus explicit overrides (``None`` values ignored)."""
    from transformers import GenerationConfig

    settings = dict(GENERATION_PRESETS[preset].settings)
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
