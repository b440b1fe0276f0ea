"""Turning unified records into training examples: messages, template, token ids, masked labels.

A record with a ``conversation`` (or whose instruction holds BELLE's ``Human:`` / ``Assistant:``
turns) is multi-turn: every assistant turn is learned, every human turn masked.
"""

from __future__ import annotations

from typing import Any

from ..formats import split_turns
from ..templates import EOS, ChatTemplate, Message, Template

IGNORE_INDEX = -100  # label of masked tokens: CrossEntropyLoss skips it


def record_to_messages(record: dict[str, Any]) -> tuple[list[Message], str]:
    """A record as a conversation, plus the single-turn input text.

    ``Human:``/``Assistant:`` turns in the instruction become separate messages; the
    record's output is the final assistant turn.
    """
    if record.get("conversation"):
        return [Message(turn["role"], turn["content"]) for turn in record["conversation"]], ""
    input_text = record.get("input") or ""
    turns = split_turns(record["instruction"], input_text, record["output"])
    if turns is None:
        return [Message("user", record["instruction"]), Message("assistant", record["output"])], input_text
    return [Message(turn["role"], turn["content"]) for turn in turns], ""


def special_prefix_ids(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts before every text (e.g. LLaMA's BOS), found by asking it."""
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start:start + len(without)] == without:
            return list(with_special[:start])
    return []


def encode_segments(tokenizer: Any, segments: list, prefix_ids: list[int]) -> tuple[list[int], list[int]]:
    """Token ids and labels of rendered segments: masked segments get ``IGNORE_INDEX``."""
    input_ids = list(prefix_ids)
    labels = [IGNORE_INDEX] * len(prefix_ids)
    for segment in segments:
        if segment.text is EOS:
            ids = [tokenizer.eos_token_id]
        else:
            ids = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if segment.learn else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def encode_conversation(
    tokenizer: Any, template: Template | ChatTemplate, messages: list[Message], input_text: str, prefix_ids: list[int]
) -> tuple[list[int], list[int]]:
    """Ids and labels of a conversation through ``template`` (the one encoding of training and inference)."""
    segments = template.render(messages, input_text, tokenizer)
    return encode_segments(tokenizer, segments, [] if template.text_has_special_tokens else prefix_ids)


def tokenize_record(
    record: dict[str, str], tokenizer: Any, template: Template, cutoff_len: int, prefix_ids: list[int]
) -> dict[str, list[int]]:
    """Training example of one record: ids, attention mask and labels, cut at ``cutoff_len``."""
    messages, input_text = record_to_messages(record)
    input_ids, labels = encode_conversation(tokenizer, template, messages, input_text, prefix_ids)
    input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_batch(
    batch: dict[str, list[Any]], tokenizer: Any, template: Template, cutoff_len: int, prefix_ids: list[int]
) -> dict[str, list[list[int]]]:
    """``tokenize_record`` over a column batch, with one tokenizer call for every segment of the batch.

    Same ids and labels as record by record; one call instead of one per segment is what makes
    tokenizing millions of records fast (the per-call overhead dominates short segments).
    """
    keys = list(batch)
    rendered = []
    for row in zip(*(batch[k] for k in keys)):
        messages, input_text = record_to_messages(dict(zip(keys, row)))
        rendered.append(template.render(messages, input_text, tokenizer))
    texts = [s.text for segments in rendered for s in segments if s.text is not EOS]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    prefix = [] if template.text_has_special_tokens else list(prefix_ids)
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for segments in rendered:
        input_ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
        for segment in segments:
            ids = [tokenizer.eos_token_id] if segment.text is EOS else next(encoded)
            input_ids += ids
            labels += ids if segment.learn else [IGNORE_INDEX] * len(ids)
        input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
        out["input_ids"].append(input_ids)
        out["attention_mask"].append([1] * len(input_ids))
        out["labels"].append(labels)
    return out
