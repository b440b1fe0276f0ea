"""Source formats read directly: each record is recognised by its keys and turned into the unified form.

Unified records have ``instruction``, ``input``, ``output`` and ``conversation`` (the list of
``{"role", "content"}`` turns of a multi-turn record, empty for single-turn ones). Add a format by
adding a row to ``FORMATS``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .registry import build_registry

Record = dict[str, Any]
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations
_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")


def _turn(role: str, content: Any) -> dict[str, str]:
    if not isinstance(content, str):
        raise ValueError(f"a {role} turn is a {type(content).__name__}, not a string")
    return {"role": role, "content": content}


def _from_turns(turns: list[dict[str, str]]) -> Record:
    """A unified record from user/assistant turns; trailing unanswered user turns are dropped."""
    while turns and turns[-1]["role"] != "assistant":
        turns = turns[:-1]
    if len(turns) < 2 or turns[0]["role"] != "user":
        raise ValueError("a conversation needs a user turn followed by an assistant turn")
    for previous, current in zip(turns, turns[1:]):
        if previous["role"] == current["role"]:
            raise ValueError(f"two {current['role']} turns in a row")
    return {"instruction": turns[0]["content"], "input": "", "output": turns[-1]["content"],
            "conversation": turns if len(turns) > 2 else []}


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant"}


def _sharegpt(record: Record) -> Record:
    turns, system = [], []
    for message in record["conversations"]:
        speaker = str(message.get("from", "")).lower()
        if speaker == "system":
            system.append(message.get("value", ""))
            continue
        if speaker not in SHAREGPT_ROLES:
            raise ValueError(f"unknown speaker {message.get('from')!r} in 'conversations'")
        turns.append(_turn(SHAREGPT_ROLES[speaker], message.get("value")))
    if system and turns:
        turns[0] = {"role": "user", "content": "\n".join(system) + "\n\n" + turns[0]["content"]}
    return _from_turns(turns)


def _firefly(record: Record) -> Record:
    turns = []
    for exchange in record["conversation"]:
        turns += [_turn("user", exchange.get("human")), _turn("assistant", exchange.get("assistant"))]
    return _from_turns(turns)


def _dolly(record: Record) -> Record:
    return {"instruction": record["instruction"], "input": record.get("context") or "",
            "output": record["response"], "conversation": []}


def _gsm8k(record: Record) -> Record:
    reasoning = _CALCULATOR.sub("", record["answer"])
    final = _FINAL.search(reasoning)
    if final is None:
        raise ValueError("a GSM8K 'answer' ends with '#### <number>'")
    output = reasoning[: final.start()].rstrip() + f"\nThe answer is {final.group(1)}."
    return {"instruction": record["question"], "input": "", "output": output, "conversation": []}


@dataclass(frozen=True)
class SourceFormat:
    """A record format recognised by the presence of ``keys``."""

    name: str
    keys: tuple[str, ...]
    convert: Callable[[Record], Record]
    description: str


FORMATS: dict[str, SourceFormat] = build_registry(
    "source format",
    SourceFormat("sharegpt", ("conversations",), _sharegpt, "ShareGPT: conversations of {from, value}"),
    SourceFormat("firefly", ("conversation",), _firefly, "MOSS/Firefly: conversation of {human, assistant}"),
    SourceFormat("dolly", ("instruction", "response"), _dolly, "Dolly: instruction, context, response"),
    SourceFormat("gsm8k", ("question", "answer"), _gsm8k, "GSM8K: question, answer ending in '#### N'"),
)


def convert_record(record: Record) -> Record | None:
    """The unified form of a record in one of ``FORMATS``; ``None`` when none matches.

    Raises ``ValueError`` (with the reason) when a format matches but the record is malformed.
    """
    for source in FORMATS.values():
        if all(key in record for key in source.keys) and "output" not in record:
            return source.convert(record)
    return None
