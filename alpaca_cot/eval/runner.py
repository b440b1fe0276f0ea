"""Run an evaluation task over a file into a folder that survives interruption, and summarise it.

``--output_dir`` receives:

- ``results.jsonl``: one line per evaluated record (id, category, question, reference,
  prediction or score, the model's response), appended and synced batch by batch; a
  rerun keeps every complete line, drops a torn last one and continues after it;
- ``eval_settings.json``: what was evaluated how; a rerun with other settings is refused;
- ``summary.json`` / ``summary.md``: the metric overall and per category;
- ``by_category.png``: the per-category metric as bars.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import (
    JsonlAppender,
    check_new_folder,
    parse_json_lines,
    read_complete_lines,
    read_json_file,
    write_json_atomic,
    write_text_atomic,
)
from ..infer.loading import LoadedModel
from .reports import bar_chart, markdown_table
from .tasks import TASKS, EvalItem, EvalOptions, EvalTask

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
SETTINGS_FILE = "eval_settings.json"
SUMMARY_FILE = "summary.json"
SUMMARY_MARKDOWN = "summary.md"
CHART_FILE = "by_category.png"


@dataclass
class EvalRun:
    """What one evaluation call did, and the summary of everything in the folder."""

    summary: dict[str, Any]
    already_done: int
    evaluated: int
    seconds: float


def read_finished(result_path: Path, items: list[EvalItem]) -> int:
    """Number of complete result lines matching ``items``; a torn last line is cut off."""
    lines = read_complete_lines(result_path)
    # lines past a smaller --limit are kept, not checked
    for number, done in enumerate(parse_json_lines(lines[:len(items)], result_path, "--output_dir")):
        if done.get("id") != items[number].id or done.get("question") != items[number].instruction:
            raise UserError(f"--output_dir: {result_path} holds results of other data (line {number + 1}); "
                            "choose a new --output_dir")
    return len(lines)


def check_settings(output_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix results of different settings in one folder; record the settings of a new folder."""
    path = output_dir / SETTINGS_FILE
    if path.is_file():
        saved = read_json_file(path, "--output_dir", "the settings file is damaged: choose a new --output_dir")
        differing = [f"{key}: {saved.get(key)!r} before, {value!r} now" for key, value in settings.items()
                     if saved.get(key) != value]
        if differing:
            raise UserError(f"--output_dir: {output_dir} holds results evaluated with other settings "
                            f"({'; '.join(differing)}); choose a new --output_dir")
        return
    check_new_folder("--output_dir", output_dir)  # a folder of evaluate.py's own holds its settings file
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, settings)


def summarize(task: EvalTask, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Overall and per-category metric: the mean of the row's ``result_key`` (accuracy, or the mean judge score
    over parsed replies), with the rows left out counted under its ``unscored`` name where it has one."""
    key = task.result_key

    def metric(rows: list[dict[str, Any]]) -> tuple[float | None, int]:
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        return (sum(values) / len(values) if values else None), len(rows) - len(values)

    categories: dict[str, list[dict[str, Any]]] = {}
    for row in results:
        categories.setdefault(row["category"], []).append(row)
    summary: dict[str, Any] = {"task": task.name, "metric": task.metric, "records": len(results)}
    summary[task.metric], unscored = metric(results)
    if task.unscored:
        summary[task.unscored] = unscored
    summary["categories"] = {}
    for name in sorted(categories):
        value, missing = metric(categories[name])
        summary["categories"][name] = {"records": len(categories[name]), task.metric: value}
        if task.unscored:
            summary["categories"][name][task.unscored] = missing
    return summary


def write_summary(output_dir: Path, summary: dict[str, Any], title: str) -> str:
    """``summary.json``, ``summary.md`` and ``by_category.png``; returns the markdown."""
    metric = summary["metric"]
    rows = [[name, info["records"], info[metric]] for name, info in summary["categories"].items()]
    rows.append(["**all**", summary["records"], summary[metric]])
    text = f"# {title}\n\n" + markdown_table(["category", "records", metric], rows)
    if summary.get("unparsed_judge_replies"):
        text += f"\n{summary['unparsed_judge_replies']} judge replies stated no score and are left out of the mean.\n"
    write_json_atomic(output_dir / SUMMARY_FILE, summary)
    write_text_atomic(output_dir / SUMMARY_MARKDOWN, text)
    names = list(summary["categories"])
    bar_chart(names, [summary["categories"][n][metric] for n in names], output_dir / CHART_FILE, title,
              metric, counts=[summary["categories"][n]["records"] for n in names])
    return text


def load_items(task_name: str, data: Path, limit: int | None = None, generate: bool = False) -> list[EvalItem]:
    """The task's records from ``data`` (the first ``limit`` of them).

    Scored by likelihood (no ``generate`` where the task allows it), questions with several right letters are left
    out: one letter's likelihood cannot pick a set.
    """
    if not data.exists():
        raise UserError(f"--data: {data} does not exist")
    task = TASKS[task_name]
    items = task.load(data)
    if not task.generating(generate):
        single = [item for item in items if len(item.reference) == 1]
        if len(single) < len(items):
            logger.info("%d questions with several right options left out (they need --generate)",
                        len(items) - len(single))
        items = single
    if not items:
        raise UserError(f"--data: {data} holds no records the {task_name} task can evaluate")
    return items[:limit] if limit else items


def evaluate_items(loaded: LoadedModel, task_name: str, items: list[EvalItem], output_dir: Path,
                   options: EvalOptions, settings: dict[str, Any], title: str) -> EvalRun:
    """Score ``items`` into ``output_dir`` (continuing a previous run there) and write the summary."""
    from tqdm.auto import tqdm

    task = TASKS[task_name]
    check_settings(output_dir, settings)
    result_path = output_dir / RESULTS_FILE
    done = read_finished(result_path, items)
    started, evaluated = time.time(), 0
    bar = tqdm(total=len(items), initial=done, desc=f"evaluating {task_name}", disable=not sys.stderr.isatty())
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        with JsonlAppender(result_path) as out:
            for start in range(done, len(items), options.batch_size):
                batch = items[start:start + options.batch_size]
                scored = task.score(loaded, batch, options)
                out.write({"id": item.id, "category": item.category, "question": item.instruction,
                           "input": item.input, "reference": item.reference, **result, **item.extra}
                          for item, result in zip(batch, scored))  # synced: a finished batch survives a crash
                evaluated += len(batch)
                bar.update(len(batch))
    finally:
        loaded.model.train(was_training)
        bar.close()
    results = parse_json_lines(read_complete_lines(result_path)[:len(items)], result_path, "--output_dir")
    summary = summarize(task, results)
    summary["settings"] = settings
    write_summary(output_dir, summary, title)
    return EvalRun(summary, min(done, len(items)), evaluated, time.time() - started)
