"""Turning unified records into training examples: messages, template, token ids, masked labels.

A record with a ``conversation`` (or whose instruction holds BELLE's ``Human:`` / ``Assistant:``
turns) is multi-turn: every assistant turn is learned, every human turn masked.
"""

from __future__ import annotations

from typing import Any

from ..templates import EOS, AnyTemplate, Message, Segment, SpecialToken, special_token_id
from .formats import split_turns

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


def _marker_ids(tokenizer: Any, marker: object) -> list[int]:
    """Ids of a segment that is no text: ``EOS`` or a :class:`SpecialToken` (one id each)."""
    if marker is EOS:
        return [tokenizer.eos_token_id]
    if isinstance(marker, SpecialToken):
        return [special_token_id(tokenizer, marker.name)]
    raise TypeError(f"a segment holds {marker!r}: text, EOS or a SpecialToken")


def _calls(segments: list[Segment]) -> list[list[Segment]]:
    """Segments grouped by tokenizer call: a ``joined`` segment is encoded with the ones before it."""
    calls: list[list[Segment]] = []
    for segment in segments:
        if segment.joined and calls:
            calls[-1].append(segment)
        else:
            calls.append([segment])
    return calls


def _common_prefix_length(first: list[int], second: list[int]) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def split_joint_encoding(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """The ids of ``"".join(texts)``, encoded in one call, split where each text ends.

    Where the ids of the text so far stop agreeing with the whole's is the cut: a token spanning two texts
    goes to the later one. One extra call per cut (the official chat code of ChatGLM2 and InternLM 1/2
    encodes a whole conversation at once, which can merge characters across turns).
    """
    whole = tokenizer("".join(texts), add_special_tokens=False)["input_ids"]
    cuts, done = [0], ""
    for text in texts[:-1]:
        done += text
        so_far = tokenizer(done, add_special_tokens=False)["input_ids"] if done else []
        cuts.append(max(cuts[-1], _common_prefix_length(whole, so_far)))
    cuts.append(len(whole))
    return [whole[start:end] for start, end in zip(cuts, cuts[1:])]


def _call_ids(tokenizer: Any, call: list[Segment], encoded_text: Any) -> list[list[int]]:
    """Ids of each segment of one tokenizer call; ``encoded_text()`` gives a lone text segment's ids."""
    if len(call) > 1:
        return split_joint_encoding(tokenizer, [str(segment.text) for segment in call])
    segment = call[0]
    if not isinstance(segment.text, str):
        return [_marker_ids(tokenizer, segment.text)]
    return [encoded_text() if segment.text else []]


def _append(input_ids: list[int], labels: list[int], tokenizer: Any, segment: Segment, ids: list[int]) -> None:
    """Add a segment's ids and their labels."""
    input_ids += ids
    if not segment.learn:
        labels += [IGNORE_INDEX] * len(ids)
    elif segment.label is not None:  # learned as another token than the one it holds (one-token segments)
        labels += _marker_ids(tokenizer, segment.label) * len(ids)
    else:
        labels += ids


def _lone_texts(segments: list[Segment]) -> list[str]:
    return [call[0].text for call in _calls(segments) if len(call) == 1 and isinstance(call[0].text, str)
            and call[0].text]


def _encode_calls(tokenizer: Any, segments: list[Segment], prefix_ids: list[int],
                  lone_text_ids: Any) -> tuple[list[int], list[int]]:
    """Ids and labels of ``segments``; ``lone_text_ids`` yields the ids of the texts of ``_lone_texts`` in order."""
    input_ids, labels = list(prefix_ids), [IGNORE_INDEX] * len(prefix_ids)
    for call in _calls(segments):
        for segment, ids in zip(call, _call_ids(tokenizer, call, lambda: next(lone_text_ids))):
            _append(input_ids, labels, tokenizer, segment, ids)
    return input_ids, labels


def encode_segments(tokenizer: Any, segments: list[Segment], prefix_ids: list[int]) -> tuple[list[int], list[int]]:
    """Token ids and labels of rendered segments, one tokenizer call per text segment (or run of joined ones):
    masked segments get ``IGNORE_INDEX``."""
    encoded = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in _lone_texts(segments))
    return _encode_calls(tokenizer, segments, prefix_ids, encoded)


def encode_conversation(
    tokenizer: Any, template: AnyTemplate, messages: list[Message], input_text: str, prefix_ids: list[int]
) -> tuple[list[int], list[int]]:
    """Ids and labels of a conversation through ``template`` (the one encoding of training and inference)."""
    segments = template.render(messages, input_text, tokenizer)
    return encode_segments(tokenizer, segments, [] if template.text_has_special_tokens else prefix_ids)


def tokenize_record(
    record: dict[str, str], tokenizer: Any, template: AnyTemplate, cutoff_len: int, prefix_ids: list[int]
) -> dict[str, list[int]]:
    """Training example of one record: ids, attention mask and labels, cut at ``cutoff_len``."""
    messages, input_text = record_to_messages(record)
    input_ids, labels = encode_conversation(tokenizer, template, messages, input_text, prefix_ids)
    input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_batch(
    batch: dict[str, list[Any]], tokenizer: Any, template: AnyTemplate, cutoff_len: int, prefix_ids: list[int]
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
    texts = [text for segments in rendered for text in _lone_texts(segments)]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    prefix = [] if template.text_has_special_tokens else list(prefix_ids)
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for segments in rendered:
        input_ids, labels = _encode_calls(tokenizer, segments, prefix, encoded)
        input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
        out["input_ids"].append(input_ids)
        out["attention_mask"].append([1] * len(input_ids))
        out["labels"].append(labels)
    return out
