"""Held-out exact-match accuracy of final answers, for math / chain-of-thought data.

The answer of a response is the number after "The answer is" / "答案是", or else
the last number in it; a prediction is correct when it equals the reference's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..data import record_to_messages
from .generation import build_generation_config, generate_batch, prompt_ids
from .loading import LoadedModel

_STATED = re.compile(r"(?:answer is|答案是|答案为)\s*[:：]?\s*\$?(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a response, normalised (no thousands separators, no trailing .0)."""
    stated = _STATED.findall(text)
    found = stated[-1] if stated else (_NUMBER.findall(text) or [None])[-1]
    if found is None:
        return None
    value = found.replace(",", "")
    return value[:-2] if value.endswith(".0") else value


@dataclass
class ExactMatch:
    """Accuracy over ``total`` records and the per-record predictions."""

    correct: int
    total: int
    predictions: list[dict[str, Any]]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def exact_match(
    loaded: LoadedModel, records: list[dict[str, str]], max_new_tokens: int = 96, batch_size: int = 50
) -> ExactMatch:
    """Greedy answers to ``records``, scored by their final number against each record's output."""
    prompts = []
    for record in records:
        messages, input_text = record_to_messages(record)
        prompts.append(prompt_ids(loaded, messages[:-1], input_text))
    config = build_generation_config(loaded, "greedy", max_new_tokens=max_new_tokens)
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        answers = generate_batch(loaded, prompts, config, batch_size)
    finally:
        loaded.model.train(was_training)
    predictions = []
    for record, text in zip(records, answers):
        gold, predicted = extract_answer(record["output"]), extract_answer(text)
        predictions.append({"input": record["input"], "reference": gold, "prediction": predicted,
                            "response": text, "correct": gold is not None and gold == predicted})
    return ExactMatch(sum(p["correct"] for p in predictions), len(predictions), predictions)
