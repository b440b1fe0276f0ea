"""Evaluation tasks: how each benchmark's files are read, prompted and scored.

A task turns a data file into :class:`EvalItem` rows (question, reference,
category) and scores a batch of them with a loaded model, one result dict per
item. Add a task by adding a row to ``TASKS``.

- ``choice``: multiple choice (MMCU, GAOKAO-Bench objective questions, plain CSV /
  JSON of question, options, answer); the option letter with the highest
  likelihood wins, or with ``--generate`` the letter parsed from a generated answer.
- ``math``: exact match of the final number (GSM8K ``####`` answers, or any record
  whose output states the answer), optionally with a chain-of-thought cue.
- ``judge``: Belle-eval (``question``, ``std_answer``, ``class``): answers scored 0-1
  by a judge model behind an OpenAI-compatible endpoint (see ``judge.py``).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import load_records, read_records
from ..data.records import iter_raw_records
from ..errors import UserError
from ..infer.generation import generate_batch, prompt_ids
from ..infer.loading import LoadedModel
from ..infer.scoring import extract_answer
from ..registry import build_registry
from ..templates import Message

LETTERS = "ABCDEFGH"
_CJK = re.compile(r"[\u4e00-\u9fff]")
_OPTION_IN_TEXT = re.compile(r"(?:^|\s|\n)\(?([A-H])[\.．、:：)]")
_OPTION_PREFIX = re.compile(r"^\s*\(?[A-H]\s*[\.．、:：)]\s*")
_STATED_CHOICE = re.compile(
    r"(?:【答案】|答案\s*(?:是|为|应选|选)?\s*[:：]?|answer\s+is\s*[:：]?|answer\s*[:：]|应选|故选|选)\s*\(?\s*([A-H]+)\b",
    re.IGNORECASE)
_LONE_LETTER = re.compile(r"(?<![A-Za-z])([A-H])(?![A-Za-z])")

CHOICE_PROMPT = {  # likelihood scoring: the answer is the letter alone
    "zh": "以下是一道单项选择题，请直接给出正确答案的选项字母。",
    "en": "Answer the following multiple choice question with the letter of the correct option only.",
}
CHOICE_GENERATE_PROMPT = {  # --generate: reason, then state the letter where a parser can find it
    "zh": "请你做一道选择题。请一步一步思考，最后把正确答案的选项字母写在【答案】之后，例如：【答案】A",
    "en": "Answer the following multiple choice question. Think step by step, then finish with "
          "'The answer is X', where X is the letter of the correct option.",
}


@dataclass
class EvalItem:
    """One question to evaluate: what the model is asked, the reference and the category it counts under."""

    id: int
    category: str
    instruction: str
    input: str = ""
    reference: str = ""
    options: str = ""  # choice: the option letters, e.g. "ABCD"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalOptions:
    """How a run scores: generation settings and task switches."""

    generation_config: Any = None
    generate: bool = False  # choice: parse generated letters instead of comparing likelihoods
    cot_cue: str = ""  # math: appended to each instruction
    batch_size: int = 8
    cutoff_len: int = 1024  # longest prompt in tokens; the end (the question) is kept
    judge: Any = None  # judge.JudgeClient for the judge task


def language_of(text: str) -> str:
    """``zh`` when the text has Chinese characters, else ``en``."""
    return "zh" if _CJK.search(text) else "en"


# ---------------------------------------------------------------- choice: reading the formats

def _options_text(options: Any, where: str) -> tuple[str, str]:
    """(option lines "A. ...", letters) from a list, a letter->text mapping or text with "A." markers."""
    if isinstance(options, dict):
        pairs = [(str(k).strip().upper(), str(v)) for k, v in options.items()]
    elif isinstance(options, list):
        pairs = [(LETTERS[i], _OPTION_PREFIX.sub("", str(v))) for i, v in enumerate(options[:len(LETTERS)])]
    elif isinstance(options, str):
        parts = [p for p in re.split(r"\n|\s*\|\s*", options) if p.strip()]
        pairs = [(LETTERS[i], _OPTION_PREFIX.sub("", p)) for i, p in enumerate(parts[:len(LETTERS)])]
    else:
        raise UserError(f"{where}: options must be a list, a mapping of letters or text (got {type(options).__name__})")
    if len(pairs) < 2 or any(len(k) != 1 or k not in LETTERS for k, _ in pairs):
        raise UserError(f"{where}: needs at least two options labelled A-H")
    return "\n".join(f"{k}. {v}" for k, v in pairs), "".join(k for k, _ in pairs)


def _answer_letters(answer: Any, letters: str, where: str) -> str:
    text = "".join(answer) if isinstance(answer, list) else str(answer)
    found = "".join(sorted(set(re.sub(r"[^A-H]", "", text.upper()))))
    if not found or any(ch not in letters for ch in found):
        raise UserError(f"{where}: answer {answer!r} is not one of the option letters {letters}")
    return found


def _gaokao_letters(question: str) -> str:
    """Option letters of a GAOKAO question: A-D, extended while E, F, ... are also marked in the text.

    Markers are not reliable enough to go below four (OCR'd text runs "C．...D．..." together).
    """
    marked = set(_OPTION_IN_TEXT.findall(question))
    count = 4
    while count < len(LETTERS) and LETTERS[count] in marked:
        count += 1
    return LETTERS[:count]


def _gaokao_items(files: list[Path]) -> list[EvalItem]:
    """GAOKAO-Bench objective questions: the options are inside the question text; one category per file."""
    items: list[EvalItem] = []
    for path in files:
        content = json.loads(path.read_text(encoding="utf-8"))
        category = content.get("keywords") or path.stem
        for number, example in enumerate(content["example"]):
            answers = example.get("answer") or []
            if len(answers) != 1:  # cloze / reading passages: several questions share one text
                continue
            question = example["question"].strip()
            letters = _gaokao_letters(question)
            reference = _answer_letters(answers[0], LETTERS, f"{path}: example {number}")
            items.append(EvalItem(len(items), category, question, reference=reference, options=letters,
                                  extra={"year": example.get("year"), "index": example.get("index")}))
    return items


def _row_item(row: dict[str, Any], number: int, where: str) -> EvalItem:
    """One MMCU (类别/题目/选项/答案) or plain (question/options or A..D columns/answer) record."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: record {number} is {type(row).__name__}, not an object with a question")
    question = row.get("题目", row.get("question"))
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: record {number} has no question ('question' or '题目')")
    options = row.get("选项", row.get("options"))
    if options is None:
        options = {k: row[k] for k in LETTERS if row.get(k) not in (None, "")}
    lines, letters = _options_text(options, f"{where}: record {number}")
    answer = row.get("答案", row.get("answer"))
    reference = _answer_letters(answer, letters, f"{where}: record {number}")
    category = str(row.get("类别") or row.get("category") or row.get("subject") or "all")
    return EvalItem(number, category, f"{question.strip()}\n{lines}", reference=reference, options=letters)


def load_choice_items(path: Path) -> list[EvalItem]:
    """Multiple-choice questions from a GAOKAO-Bench file or folder, an MMCU file, or a plain CSV/JSON(L)."""
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise UserError(f"--data: folder {path} has no GAOKAO-Bench .json files")
        return _gaokao_items(files)
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        first = next(iter_raw_records(path), None)
        if first is not None and first.hint == "gaokao":  # the reader recognises GAOKAO-Bench's {example: [...]}
            return _gaokao_items([path])
        rows = read_records(path)
    if not isinstance(rows, list) or not rows:
        raise UserError(f"--data: {path} holds no multiple-choice records")
    return [_row_item(row, number, str(path)) for number, row in enumerate(rows)]


# ---------------------------------------------------------------- math and judge: reading

def _category(raw: Any, text: str) -> str:
    if isinstance(raw, dict):
        for key in ("category", "class", "类别", "type"):
            if raw.get(key):
                return str(raw[key])
    return language_of(text)  # demo data mixes English and Chinese problems


def load_math_items(path: Path) -> list[EvalItem]:
    """GSM8K (question / answer ending in ``#### N``) or instruction records whose output states the answer."""
    records, raw = load_records(path), read_records(path)
    items = []
    for number, (record, original) in enumerate(zip(records, raw)):
        reference = extract_answer(record["output"])
        if reference is None:
            raise UserError(f"{path}: record {number} has no number in its answer to compare with")
        items.append(EvalItem(number, _category(original, record["instruction"]), record["instruction"],
                              record["input"], reference))
    return items


def load_judge_items(path: Path) -> list[EvalItem]:
    """Belle-eval records: ``question``, ``std_answer``, ``class``."""
    items = []
    for number, row in enumerate(read_records(path)):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or "class" not in row:
            raise UserError(f"{path}: record {number} needs 'question', 'class' and 'std_answer' (Belle-eval format)")
        items.append(EvalItem(number, str(row["class"]), row["question"], reference=str(row.get("std_answer") or "")))
    return items


# ---------------------------------------------------------------- scoring

def _prompts(loaded: LoadedModel, items: list[EvalItem], options: EvalOptions,
             instruction: Callable[[EvalItem], str]) -> list[list[int]]:
    return [prompt_ids(loaded, [Message("user", instruction(item))], item.input)[-options.cutoff_len:]
            for item in items]


def option_logprobs(loaded: LoadedModel, prompt: list[int], letters: str) -> dict[str, float]:
    """Log-probability of each option letter as the whole start of the answer to ``prompt``.

    A letter that is several tokens long gets the sum of its tokens' log-probabilities.
    """
    import torch

    model, tokenizer = loaded.model, loaded.tokenizer
    continuations = [tokenizer(letter, add_special_tokens=False)["input_ids"] for letter in letters]
    if any(len(c) != 1 for c in continuations):
        return dict(zip(letters, continuation_logprobs(loaded, prompt, continuations)))
    # The usual case: one pass over the prompt scores every letter.
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt], device=next(model.parameters()).device)).logits
    logprobs = torch.log_softmax(logits[0, -1].float(), dim=-1)
    return {letter: float(logprobs[c[0]]) for letter, c in zip(letters, continuations)}


def continuation_logprobs(loaded: LoadedModel, prompt: list[int], continuations: list[list[int]]) -> list[float]:
    """Summed log-probability of each token sequence following ``prompt``, all in one right-padded batch."""
    import torch

    model, tokenizer = loaded.model, loaded.tokenizer
    width = len(prompt) + max(len(c) for c in continuations)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(continuations), width), pad, dtype=torch.long)
    attention = torch.zeros((len(continuations), width), dtype=torch.long)
    for row, continuation in enumerate(continuations):
        ids = prompt + continuation
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(sum(logprobs[row, len(prompt) - 1 + i, token] for i, token in enumerate(continuation)))
            for row, continuation in enumerate(continuations)]


def parse_choice(text: str, letters: str) -> str | None:
    """The option letter(s) a generated answer settles on: the last stated one, else the first lone letter."""
    stated = [m for m in _STATED_CHOICE.findall(text) if all(ch.upper() in letters for ch in m)]
    if stated:
        return "".join(sorted(set(stated[-1].upper())))
    lone = [m for m in _LONE_LETTER.findall(text) if m in letters]
    return lone[0] if lone else None


def _choice_instruction(item: EvalItem, generate: bool) -> str:
    header = (CHOICE_GENERATE_PROMPT if generate else CHOICE_PROMPT)[language_of(item.instruction)]
    return f"{header}\n\n{item.instruction}"


def score_choice(loaded: LoadedModel, items: list[EvalItem], options: EvalOptions) -> list[dict[str, Any]]:
    """Accuracy of option letters: by likelihood, or parsed from generated answers with ``generate``."""
    prompts = _prompts(loaded, items, options, lambda item: _choice_instruction(item, options.generate))
    if options.generate:
        texts = generate_batch(loaded, prompts, options.generation_config, options.batch_size)
        results = []
        for item, text in zip(items, texts):
            predicted = parse_choice(text, item.options)
            results.append({"prediction": predicted, "response": text, "correct": predicted == item.reference})
        return results
    results = []
    for item, prompt in zip(items, prompts):
        scores = option_logprobs(loaded, prompt, item.options)
        predicted = max(scores, key=scores.get)
        results.append({"prediction": predicted, "logprobs": {k: round(v, 4) for k, v in scores.items()},
                        "correct": predicted == item.reference})
    return results


def with_cue(instruction: str, cue: str) -> str:
    """The instruction with a chain-of-thought cue appended (as the paper's "先思考，再决定")."""
    return f"{instruction.rstrip()}\n{cue}" if cue else instruction


def score_math(loaded: LoadedModel, items: list[EvalItem], options: EvalOptions) -> list[dict[str, Any]]:
    """Exact match of the final number of greedy answers."""
    prompts = _prompts(loaded, items, options, lambda item: with_cue(item.instruction, options.cot_cue))
    texts = generate_batch(loaded, prompts, options.generation_config, options.batch_size)
    results = []
    for item, text in zip(items, texts):
        predicted = extract_answer(text)
        results.append({"prediction": predicted, "response": text, "correct": predicted == item.reference})
    return results


def score_judged(loaded: LoadedModel, items: list[EvalItem], options: EvalOptions) -> list[dict[str, Any]]:
    """Answers generated here, each scored 0-1 by the judge model."""
    prompts = _prompts(loaded, items, options, lambda item: item.instruction)
    texts = generate_batch(loaded, prompts, options.generation_config, options.batch_size)
    results = []
    for item, text in zip(items, texts):
        verdict = options.judge.score(item.category, item.instruction, item.reference, text)
        results.append({"response": text, "score": verdict.score, "judge_reply": verdict.reply})
    return results


@dataclass(frozen=True)
class EvalTask:
    """A benchmark kind: how to read its files, how to score a batch, what its metric is called, and which of
    ``evaluate.py``'s task-only flags it reads (the callers read these fields, never the task's name)."""

    name: str
    load: Callable[[Path], list[EvalItem]]
    score: Callable[[LoadedModel, list[EvalItem], EvalOptions], list[dict[str, Any]]]
    metric: str  # the summary's name for the mean: "accuracy" (of "correct") or "score"
    description: str
    result_key: str = "correct"  # the result field the metric averages (rows where it is None are left out)
    unscored: str | None = None  # the summary's count of rows left out of the mean (judge replies without a score)
    generates: bool = True  # always scored on generated answers; False: by likelihood, or generated with --generate
    takes_cue: bool = False  # --cot_cue: a chain-of-thought cue appended to each question
    needs_judge: bool = False  # scored by a judge model: needs --judge_url, which a study does not have

    def generating(self, generate: bool) -> bool:
        """Whether answers are generated (else option likelihoods compared), given ``--generate``."""
        return self.generates or generate

    @property
    def in_study(self) -> bool:
        """Whether the study (``python -m alpaca_cot.eval.study``) can run it: it has no judge endpoint flags."""
        return not self.needs_judge


TASKS: dict[str, EvalTask] = build_registry(
    "evaluation task",
    EvalTask("choice", load_choice_items, score_choice, "accuracy",
             "multiple choice: MMCU, GAOKAO-Bench objective questions, CSV/JSON of question, options, answer",
             generates=False),
    EvalTask("math", load_math_items, score_math, "accuracy",
             "exact match of the final number (GSM8K '####' or 'The answer is N' outputs)", takes_cue=True),
    EvalTask("judge", load_judge_items, score_judged, "score",
             "Belle-eval: answers scored 0-1 by a judge model behind an OpenAI-compatible endpoint",
             result_key="score", unscored="unparsed_judge_replies", needs_judge=True),
)
