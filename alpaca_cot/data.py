"""Instruction data: reading files, checking records, turning them into training examples.

Records are the unified format ``{"instruction", "input", "output"}`` in a JSON
array or JSON Lines file. A record whose instruction holds ``Human:`` /
``Assistant:`` turns (BELLE multiturn_chat style) is a multi-turn conversation:
every assistant turn is learned, every human turn masked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .catalog import DataSource
from .errors import UserError
from .formats import FORMATS, convert_record
from .templates import EOS, ChatTemplate, Message, Template

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of masked tokens: CrossEntropyLoss skips it
_TURN_MARKER = re.compile(r"(?:^|\n)\s*(Human|Assistant)\s*[:：]")
MAX_LISTED_PROBLEMS = 3


def read_records(path: Path) -> list[Any]:
    """Read a JSON array or a JSON Lines file; malformed JSON names the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise UserError(f"data file {path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 JSON") from exc
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}); fix that line") from exc
    if "\n" in text.strip():
        try:  # a pretty-printed JSON object (not JSON Lines): load_records says what is wrong with it
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path}:{lineno}: malformed JSON Lines record ({exc.msg}); "
                    "expected one JSON object per line or a JSON array"
                ) from exc
    return records


def _record_problem(record: Any, required: tuple[str, ...]) -> str | None:
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, not an object"
    for key in required:
        if key not in record:
            return f"has no {key!r} key (keys: {', '.join(record) or 'none'})"
    for key in ("instruction", "input", "output"):
        if record.get(key) is not None and not isinstance(record[key], str):
            return f"{key!r} is a {type(record[key]).__name__}, not a string"
    if any(not record[key].strip() for key in required):
        return f"has an empty {' or '.join(repr(k) for k in required)}"
    return None


def load_records(path: Path, required: tuple[str, ...] = ("instruction", "output")) -> list[dict[str, str]]:
    """Read and check ``path``; return records with ``instruction``, ``input``, ``output``.

    Every bad record is counted and the first few are named (by index) in one error.
    Prediction needs only ``required=("instruction",)``; a missing output becomes "".
    """
    raw = read_records(path)
    if not isinstance(raw, list):
        raise UserError(f"{path}: expected a JSON array of records, found a JSON {type(raw).__name__}")
    if not raw:
        raise UserError(f"{path}: no records; the file is empty")
    problems = []
    records = []
    for index, record in enumerate(raw):
        if isinstance(record, dict):
            try:
                converted = convert_record(record)
            except (ValueError, AttributeError, TypeError) as exc:
                problems.append(f"record {index} {exc}")
                continue
            if converted is not None:
                records.append(converted)
                continue
        problem = _record_problem(record, required)
        if problem:
            problems.append(f"record {index} {problem}")
        else:
            records.append({"instruction": record["instruction"], "input": record.get("input") or "",
                            "output": record.get("output") or "", "conversation": []})
    if problems:
        listed = "; ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f" (and {len(problems) - MAX_LISTED_PROBLEMS} more)" if len(problems) > MAX_LISTED_PROBLEMS else ""
        needs = " and ".join(repr(k) for k in required)
        raise UserError(
            f"{path}: {len(problems)} of {len(raw)} records are invalid: {listed}{more}; "
            f"each record needs string {needs} (and optional 'input'), or one of the formats "
            f"{', '.join(FORMATS)}"
        )
    return records


def record_to_messages(record: dict[str, str]) -> tuple[list[Message], str]:
    """A record as a conversation, plus the single-turn input text.

    ``Human:``/``Assistant:`` turns in the instruction become separate messages; the
    record's output is the final assistant turn.
    """
    if record.get("conversation"):
        return [Message(turn["role"], turn["content"]) for turn in record["conversation"]], ""
    instruction = record["instruction"]
    markers = list(_TURN_MARKER.finditer(instruction))
    if len(markers) < 2 or markers[0].group(1) != "Human":
        return [Message("user", instruction), Message("assistant", record["output"])], record["input"]
    messages = []
    for marker, following in zip(markers, markers[1:] + [None]):
        end = following.start() if following else len(instruction)
        content = instruction[marker.end():end].strip()
        role = "user" if marker.group(1) == "Human" else "assistant"
        if content:
            messages.append(Message(role, content))
    if record["input"] and messages and messages[-1].role == "user":
        messages[-1] = Message("user", messages[-1].content + "\n" + record["input"])
    messages.append(Message("assistant", record["output"]))
    return messages, ""


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


def file_sha256(path: Path) -> str:
    """Content hash of a data file, for the run manifest."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class PreparedData:
    """Tokenized train/validation sets and what went into them."""

    train: Any  # datasets.Dataset
    validation: Any | None
    manifest: list[dict[str, Any]]  # per source: name, path, records, sha256
    dropped: int  # examples with nothing left to learn after truncation
    example: dict[str, str]  # the first record, to show how to query the trained model


def effective_val_size(requested: int, n_records: int) -> int:
    """``--val_set_size`` capped at a tenth of the data (the original crashed when it was larger)."""
    return max(0, min(requested, n_records // 10))


def prepare_data(
    sources: list[DataSource],
    tokenizer: Any,
    template: Template,
    cutoff_len: int,
    val_set_size: int,
    seed: int,
) -> PreparedData:
    """Load every source, split off a validation set and tokenize with masking."""
    from datasets import Dataset

    records: list[dict[str, str]] = []
    manifest = []
    for source in sources:
        loaded = load_records(source.path)
        records += loaded
        manifest.append(
            {"name": source.name, "path": str(source.path), "records": len(loaded), "sha256": file_sha256(source.path)}
        )
    prefix_ids = special_prefix_ids(tokenizer)
    dataset = Dataset.from_list(records)
    val_size = effective_val_size(val_set_size, len(dataset))
    if val_size != val_set_size:
        logger.info("--val_set_size %d capped to %d (a tenth of %d records)", val_set_size, val_size, len(dataset))
    validation = None
    if val_size > 0:
        split = dataset.train_test_split(test_size=val_size, shuffle=True, seed=seed)
        dataset, validation = split["train"], split["test"]

    def tokenize(record: dict[str, str]) -> dict[str, list[int]]:
        return tokenize_record(record, tokenizer, template, cutoff_len, prefix_ids)

    columns = ["instruction", "input", "output", "conversation"]
    train = dataset.map(tokenize, remove_columns=columns, desc="tokenizing")
    before = len(train)
    train = train.filter(lambda example: any(label != IGNORE_INDEX for label in example["labels"]))
    if validation is not None:
        validation = validation.map(tokenize, remove_columns=columns, desc="tokenizing validation")
        validation = validation.filter(lambda example: any(label != IGNORE_INDEX for label in example["labels"]))
    dropped = before - len(train)
    if dropped:
        logger.warning("%d examples dropped: their response starts after --cutoff_len %d", dropped, cutoff_len)
    if len(train) == 0:
        raise UserError(f"--cutoff_len {cutoff_len}: no training example keeps any response token; raise it")
    return PreparedData(train, validation, manifest, dropped, records[0])
