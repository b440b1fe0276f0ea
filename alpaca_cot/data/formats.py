"""Source formats: each source record is recognised by its keys and turned into unified records.

Unified records have ``instruction``, ``input``, ``output`` and ``conversation`` (the list of
``{"role", "content"}`` turns of a multi-turn record, empty for single-turn ones). A source record
becomes one unified record, except Self-Instruct seed tasks (one per instance). Add a format by
adding a row to ``FORMATS``; ``python -m alpaca_cot.data convert --from NAME`` and auto-detection
read the rows.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import unknown_name
from ..registry import build_registry

Record = dict[str, Any]
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations
_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")
_TURN_MARKER = re.compile(r"(?:^|\n)\s*(Human|Assistant)\s*[:：]")
FLAN_TEMPLATES_FILE = Path(__file__).resolve().parent / "flan_cot_templates.json"


@dataclass
class ConvertContext:
    """What a conversion may depend on besides the record: the file it comes from and a seeded RNG."""

    source: str = ""  # file name, e.g. ``aqua_train.tsv`` (picks the FLAN task's templates)
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    need_output: bool = True  # prediction reads instructions whose output may be missing


def _string(record: Record, key: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if value is None:
        raise ValueError(f"has no {key!r} key (keys: {', '.join(record) or 'none'})")
    if not isinstance(value, str):
        raise ValueError(f"{key!r} is a {type(value).__name__}, not a string")
    return value


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


def _single(instruction: str, input_text: str, output: str) -> Record:
    if not instruction.strip():
        raise ValueError("has an empty instruction")
    return {"instruction": instruction, "input": input_text, "output": output, "conversation": []}


def split_turns(instruction: str, input_text: str, output: str) -> list[dict[str, str]] | None:
    """BELLE multiturn_chat style: ``Human:``/``Assistant:`` turns inside the instruction, the reply in output.

    Returns the turns, or ``None`` when the instruction is a plain single-turn one.
    """
    markers = list(_TURN_MARKER.finditer(instruction))
    if len(markers) < 2 or markers[0].group(1) != "Human":
        return None
    turns = []
    for marker, following in zip(markers, markers[1:] + [None]):
        end = following.start() if following else len(instruction)
        content = instruction[marker.end():end].strip()
        if content:
            turns.append({"role": "user" if marker.group(1) == "Human" else "assistant", "content": content})
    if input_text and turns and turns[-1]["role"] == "user":
        turns[-1] = {"role": "user", "content": turns[-1]["content"] + "\n" + input_text}
    turns.append({"role": "assistant", "content": output})
    return turns


def _unified(record: Record, ctx: ConvertContext) -> list[Record]:
    instruction = _string(record, "instruction")
    input_text = _string(record, "input", optional=True)
    output = _string(record, "output", optional=not ctx.need_output)
    if ctx.need_output and not output.strip():
        raise ValueError("has an empty 'output'")
    turns = split_turns(instruction, input_text, output) if output else None
    if turns is not None and len(turns) > 2:
        try:
            return [_from_turns(turns)]
        except ValueError:
            pass  # not a well-formed dialogue after all: keep it single-turn
    return [_single(instruction, input_text, output)]


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant"}


def _sharegpt(record: Record, ctx: ConvertContext) -> list[Record]:
    turns, system = [], []
    if not isinstance(record["conversations"], list):
        raise ValueError("'conversations' is not a list")
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
    return [_from_turns(turns)]


def _firefly(record: Record, ctx: ConvertContext) -> list[Record]:
    if not isinstance(record["conversation"], list):
        raise ValueError("'conversation' is not a list")
    turns = []
    for exchange in record["conversation"]:
        turns += [_turn("user", exchange.get("human")), _turn("assistant", exchange.get("assistant"))]
    return [_from_turns(turns)]


def _dolly(record: Record, ctx: ConvertContext) -> list[Record]:
    return [_single(_string(record, "instruction"), _string(record, "context", optional=True),
                    _string(record, "response"))]


def _gsm8k(record: Record, ctx: ConvertContext) -> list[Record]:
    reasoning = _CALCULATOR.sub("", _string(record, "answer"))
    final = _FINAL.search(reasoning)
    if final is None:
        raise ValueError("a GSM8K 'answer' ends with '#### <number>'")
    output = reasoning[: final.start()].rstrip() + f"\nThe answer is {final.group(1)}."
    return [_single(_string(record, "question"), "", output)]


@cache
def flan_cot_templates() -> dict[str, list[tuple[str, str]]]:
    """FLAN's chain-of-thought templates per task (instruction, output), as the original formatted CoT data."""
    with open(FLAN_TEMPLATES_FILE, encoding="utf-8") as f:
        table = json.load(f)
    return {task: [tuple(pair) for pair in pairs] for task, pairs in table.items() if not task.startswith("_")}


def flan_task(source: str) -> str | None:
    """The FLAN CoT task of a file name (``aqua_train.tsv`` -> ``aqua``), or ``None``."""
    stem = Path(source).name.lower()
    return next((task for task in flan_cot_templates() if stem.startswith(task)), None)


def _flan_cot(record: Record, ctx: ConvertContext) -> list[Record]:
    templates = flan_cot_templates()
    task = flan_task(ctx.source)
    pool = templates[task] if task else [pair for pairs in templates.values() for pair in pairs]
    instruction, output = ctx.rng.choice(pool)
    question, answer, rationale = (_string(record, key) for key in ("question", "answer", "rationale"))
    return [_single(instruction.format(question=question), "",
                    output.format(chain_of_thought=rationale, answer=answer))]


def _gaokao(record: Record, ctx: ConvertContext) -> list[Record]:
    answer = record["answer"]
    if isinstance(answer, list):
        answer = ", ".join(str(a) for a in answer)
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("has an empty 'answer'")
    analysis = _string(record, "analysis", optional=True).strip()
    output = f"{analysis}\n答案：{answer}" if analysis else f"答案：{answer}"
    return [_single(_string(record, "question").strip(), "", output)]


def _pclue(record: Record, ctx: ConvertContext) -> list[Record]:
    return [_single(_string(record, "input"), "", _string(record, "target"))]


def _self_instruct(record: Record, ctx: ConvertContext) -> list[Record]:
    instruction = _string(record, "instruction")
    instances = record["instances"]
    if not isinstance(instances, list) or not instances:
        raise ValueError("'instances' is not a non-empty list")
    return [_single(instruction, _string(instance, "input", optional=True), _string(instance, "output"))
            for instance in instances]


@dataclass(frozen=True)
class SourceFormat:
    """A record format recognised by the presence of ``keys``."""

    name: str
    keys: tuple[str, ...]
    convert: Callable[[Record, ConvertContext], list[Record]]
    description: str


FORMATS: dict[str, SourceFormat] = build_registry(
    "source format",
    SourceFormat("unified", ("instruction", "output"), _unified,
                 "Alpaca/Alpaca-CoT: instruction, input, output; BELLE 'Human:'/'Assistant:' turns become a dialogue"),
    SourceFormat("sharegpt", ("conversations",), _sharegpt, "ShareGPT: conversations of {from, value}"),
    SourceFormat("firefly", ("conversation",), _firefly, "MOSS/Firefly: conversation of {human, assistant}"),
    SourceFormat("dolly", ("instruction", "response"), _dolly, "Dolly: instruction, context, response"),
    SourceFormat("gsm8k", ("question", "answer"), _gsm8k, "GSM8K: question, answer ending in '#### N'"),
    SourceFormat("flan_cot", ("question", "answer", "rationale"), _flan_cot,
                 "FLAN chain-of-thought TSV: question, answer, rationale through FLAN's CoT templates (seeded)"),
    SourceFormat("gaokao", ("question", "answer", "analysis"), _gaokao,
                 "GAOKAO-Bench objective questions: {keywords, example: [question, answer, analysis]}"),
    SourceFormat("pclue", ("input", "target"), _pclue, "pCLUE: input, target (answer_choices, type)"),
    SourceFormat("self_instruct", ("instruction", "instances"), _self_instruct,
                 "Self-Instruct seed tasks: instruction, instances of {input, output} (one record each)"),
)
FORMAT_ALIASES = {"alpaca": "unified", "belle": "unified", "moss": "firefly", "flan": "flan_cot",
                  "gaokao_bench": "gaokao", "seed_tasks": "self_instruct"}


def get_format(name: str, flag: str = "--from") -> SourceFormat:
    """The format row of a name or alias (``belle`` is ``unified``, ``moss`` is ``firefly``)."""
    name = FORMAT_ALIASES.get(name, name)
    if name not in FORMATS:
        raise unknown_name("format", name, list(FORMATS) + list(FORMAT_ALIASES), flag)
    return FORMATS[name]


def detect_format(record: Any) -> SourceFormat:
    """The format whose keys a record has; the one with most keys wins. Raises ``ValueError`` if none or a tie."""
    if not isinstance(record, dict):
        raise ValueError(f"is a {type(record).__name__}, not an object")
    matches = [fmt for fmt in FORMATS.values() if all(key in record for key in fmt.keys)]
    if not matches:
        closest = max(FORMATS.values(), key=lambda fmt: sum(key in record for key in fmt.keys))
        missing = [key for key in closest.keys if key not in record]
        raise ValueError(f"has no {missing[0]!r} key (keys: {', '.join(record) or 'none'})")
    matches.sort(key=lambda fmt: -len(fmt.keys))
    if len(matches) > 1 and len(matches[0].keys) == len(matches[1].keys):
        raise ValueError(f"matches both {matches[0].name} and {matches[1].name}; pass the format explicitly")
    return matches[0]


def convert_record(record: Any, fmt: SourceFormat | None = None, ctx: ConvertContext | None = None) -> list[Record]:
    """Unified records of one source record (format detected unless given).

    Raises ``ValueError`` with the reason (worded to follow "record N ...") when the record is malformed.
    """
    ctx = ctx or ConvertContext()
    if fmt is None:
        if ctx.need_output is False and isinstance(record, dict) and "instruction" in record \
                and not any(key in record for key in ("response", "instances")):
            fmt = FORMATS["unified"]  # prediction inputs: an instruction is enough
        else:
            fmt = detect_format(record)
    if not isinstance(record, dict):
        raise ValueError(f"is a {type(record).__name__}, not an object")
    missing = [key for key in fmt.keys if key not in record and not (key == "output" and not ctx.need_output)]
    if missing:
        raise ValueError(f"has no {missing[0]!r} key (keys: {', '.join(record) or 'none'}) of format {fmt.name}")
    try:
        return fmt.convert(record, ctx)
    except (AttributeError, TypeError, KeyError) as exc:  # e.g. a turn that is not an object
        raise ValueError(f"is not a well-formed {fmt.name} record ({exc})") from exc
