"""The paper's empirical study as one command: a grid of fine-tunes under one budget, evaluated and compared.

    python -m alpaca_cot.eval.study configs/study-demo.yaml

The grid file names the models, PEFT methods, data mixtures and chain-of-thought cues
to cross, the step budget every cell gets, the training flags they share and the
evaluations to run. Each training cell (model x method x mixture) trains once into
``OUTPUT_DIR/cells/<cell>/run`` through the same code as ``uniform_finetune.py``; each
cue is an evaluation variant of it (appended to the math questions). A finished cell
(its ``cell.json`` written) is skipped on a rerun; an interrupted one resumes from its
last checkpoint, and its evaluations continue where they stopped. The report
(``report.md``, ``report.json``, ``loss_curves.png``, ``metrics.png``) is rewritten at the end.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import Problems
from ..errors import ArgumentParser, UserError, did_you_mean
from ..files import write_json_atomic

logger = logging.getLogger(__name__)

GRID_KEYS = {"output_dir", "budget", "train", "grid", "eval", "peft_settings"}
GRID_DIMENSIONS = {"model_name_or_path", "peft_type", "data", "cot_cue"}
EVAL_KEYS = {"task", "data", "limit", "name", "max_new_tokens", "generate", "batch_size"}
STUDY_TRAIN_DEFAULTS = {"report_to": "none", "val_set_size": 0, "heldout_eval": 0}
CELL_FILE = "cell.json"


@dataclass
class Cell:
    """One training cell: its flags (as a uniform_finetune config) and where it lives."""

    name: str
    model: str
    peft_type: str
    mixture: str
    flags: dict[str, Any]
    folder: Path


@dataclass
class Study:
    """A parsed, checked grid file."""

    path: Path
    output_dir: Path
    cells: list[Cell]
    cues: list[str]
    evals: list[dict[str, Any]] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40] or "x"


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _read_grid_file(path: Path) -> dict[str, Any]:
    """The grid file's mapping; a missing file, bad YAML or another shape is one line."""
    import yaml

    try:
        grid_file = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise UserError(f"study: grid file {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"study: {path} is not valid YAML ({exc})") from exc
    if not isinstance(grid_file, dict):
        raise UserError(f"study: {path} must be a mapping with grid, budget, train and eval")
    return grid_file


def _check_keys(grid_file: dict[str, Any], problems: Problems) -> int | None:
    """Unknown keys and dimensions, the step budget, and flags the grid sets itself; returns the budget."""
    for key in grid_file:
        if key not in GRID_KEYS:
            problems.add(f"unknown key {key!r}{did_you_mean(str(key), GRID_KEYS)}")
    for key in grid_file.get("grid") or {}:
        if key not in GRID_DIMENSIONS:
            problems.add(f"grid: unknown dimension {key!r}{did_you_mean(str(key), GRID_DIMENSIONS)}")
    budget = grid_file.get("budget") or {}
    steps = budget.get("max_steps") if isinstance(budget, dict) else None
    if not isinstance(steps, int) or steps < 1:
        problems.add("budget: give max_steps, the optimizer steps every cell trains for (e.g. budget: "
                     "{max_steps: 40})")
    if set(grid_file.get("train") or {}) & (GRID_DIMENSIONS | {"max_steps", "output_dir"}):
        problems.add("train: model_name_or_path, peft_type, data, max_steps and output_dir are set by grid "
                     "and budget")
    return steps


def _mixtures(grid: dict[str, Any], problems: Problems) -> dict[str, list[Any]]:
    """``grid: data``: named mixtures, or lists named after their files."""
    mixtures = grid.get("data")
    if isinstance(mixtures, dict):
        mixtures = {str(name): _listed(datasets) for name, datasets in mixtures.items()}
    elif mixtures is not None:
        mixtures = {"+".join(Path(str(d)).stem for d in _listed(m)): _listed(m) for m in _listed(mixtures)}
    if not mixtures:
        problems.add("grid: data needs at least one mixture (a list of dataset names / files, or name: list)")
    return mixtures or {}


def _check_evals(grid_file: dict[str, Any], problems: Problems) -> list[dict[str, Any]]:
    """The ``eval`` entries: known keys, a task a study can run, an existing data file; each gets a name."""
    from .tasks import TASKS

    evals = [dict(e) for e in _listed(grid_file.get("eval") or []) if isinstance(e, dict)]
    for number, spec in enumerate(evals):
        where = f"eval[{number}]"
        for key in spec:
            if key not in EVAL_KEYS:
                problems.add(f"{where}: unknown key {key!r}{did_you_mean(str(key), EVAL_KEYS)}")
        task = TASKS.get(spec["task"]) if isinstance(spec.get("task"), str) else None
        if task is not None and not task.in_study:  # a study has no judge endpoint flags
            problems.add(f"{where}: the {task.name} task runs through evaluate.py")
        elif task is None:
            problems.add(f"{where}: task must be one of {', '.join(t.name for t in TASKS.values() if t.in_study)}")
        if not spec.get("data") or not Path(str(spec["data"])).exists():
            problems.add(f"{where}: data file {spec.get('data')!r} does not exist")
        spec.setdefault("name", f"{spec.get('task')}-{Path(str(spec.get('data'))).stem}")
    return evals


def load_study(path: Path, output_dir: str | None = None) -> Study:
    """Read and check a grid file; every problem is reported at once, naming the file and key."""
    grid_file = _read_grid_file(path)
    problems = Problems()
    steps = _check_keys(grid_file, problems)
    grid, train = grid_file.get("grid") or {}, dict(grid_file.get("train") or {})
    mixtures = _mixtures(grid, problems)
    models = [str(m) for m in _listed(grid.get("model_name_or_path", "smollm2-135m-instruct"))]
    methods = [str(m) for m in _listed(grid.get("peft_type", "lora"))]
    cues = [str(c or "") for c in _listed(grid.get("cot_cue", ""))]
    evals = _check_evals(grid_file, problems)
    peft_settings = grid_file.get("peft_settings") or {}
    for key in peft_settings:
        if key not in methods:
            problems.add(f"peft_settings: {key!r} is not a --peft_type of the grid ({', '.join(methods)})")
    root = Path(output_dir or grid_file.get("output_dir") or Path("studies") / path.stem)

    cells = []
    for model, method, (mixture, datasets) in itertools.product(models, methods, mixtures.items()):
        name = f"{_slug(Path(model).name)}__{method}__{_slug(mixture)}"
        flags = {**STUDY_TRAIN_DEFAULTS, **train, **(peft_settings.get(method) or {}),
                 "model_name_or_path": model, "peft_type": method, "data": [str(d) for d in datasets],
                 "max_steps": steps, "output_dir": str(root / "cells" / name / "run")}
        cell = Cell(name, model, method, mixture, flags, root / "cells" / name)
        try:  # the checks of uniform_finetune.py --config, before anything trains
            parse_cell_args(cell, path)
        except UserError as exc:
            problems.add(f"cell {name}: {exc}")
        cells.append(cell)
    problems.raise_if_any(f"study {path}: ")
    return Study(path, root, cells, cues, evals)


def parse_cell_args(cell: Cell, grid_path: Path, extra: list[str] | None = None) -> argparse.Namespace:
    """The cell's training flags, written to ``<cell>/train.yaml`` and parsed as ``uniform_finetune.py --config``."""
    import yaml

    from ..cli import parse_finetune_args

    cell.folder.mkdir(parents=True, exist_ok=True)
    config_path = cell.folder / "train.yaml"
    config_path.write_text(f"# from {grid_path}; reproduce with: python uniform_finetune.py --config {config_path}\n"
                           + yaml.safe_dump(cell.flags, allow_unicode=True), encoding="utf-8")
    return parse_finetune_args(["--config", str(config_path), *(extra or [])])


class PeakMemory:
    """Peak memory while a block runs: CUDA allocator peak on a GPU, else the process' resident set (sampled)."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.kind = "process RSS"
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        import torch

        if torch.cuda.is_available():
            self.kind = "CUDA allocated"
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        process = psutil.Process()

        def sample() -> None:
            while not self._stop.wait(0.05):
                self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)

        self.peak_bytes = process.memory_info().rss
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.kind == "CUDA allocated":
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


def _loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs from the last checkpoint's trainer state (the Trainer saves one at the end)."""
    from ..run_folder import find_last_checkpoint

    checkpoint = find_last_checkpoint(run_dir)
    if checkpoint is None:
        return []
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]


def _cue_slug(cue: str) -> str:
    if not cue:
        return "no-cue"
    return "cue-" + (_slug(cue) if cue.isascii() else hashlib.sha256(cue.encode()).hexdigest()[:8])


def evaluate_cell(cell: Cell, study: Study) -> dict[str, dict[str, Any]]:
    """Every evaluation of the study on the cell's adapter: ``{cue: {eval name: metric}}`` (resumable)."""
    from ..infer.generation import build_generation_config
    from ..infer.loading import load_for_inference
    from .runner import evaluate_items, load_items
    from .tasks import TASKS, EvalOptions

    if not study.evals:
        return {cue: {} for cue in study.cues}
    loaded = load_for_inference(lora_dir=str(cell.folder / "run"))
    metrics: dict[str, dict[str, Any]] = {cue: {} for cue in study.cues}
    try:
        for spec in study.evals:
            items = load_items(spec["task"], Path(spec["data"]), spec.get("limit"), bool(spec.get("generate")))
            config = build_generation_config(loaded, "greedy", max_new_tokens=spec.get("max_new_tokens", 128))
            task = TASKS[spec["task"]]
            cues = study.cues if task.takes_cue else [""]
            for cue in cues:
                options = EvalOptions(config, bool(spec.get("generate")), cue, spec.get("batch_size", 8))
                settings = {"task": spec["task"], "data": str(Path(spec["data"]).resolve()), "model": cell.name,
                            "cot_cue": cue, "limit": spec.get("limit"), "generate": bool(spec.get("generate")),
                            "max_new_tokens": spec.get("max_new_tokens", 128)}
                folder = cell.folder / "eval" / f"{_slug(spec['name'])}__{_cue_slug(cue)}"
                title = f"{spec['name']}: {cell.name}" + (f" + {cue!r}" if cue else "")
                run = evaluate_items(loaded, spec["task"], items, folder, options, settings, title)
                value = run.summary[run.summary["metric"]]
                for row_cue in ([cue] if task.takes_cue else study.cues):
                    metrics[row_cue][spec["name"]] = value
    finally:
        del loaded
        gc.collect()
    return metrics


def run_cell(cell: Cell, study: Study) -> dict[str, Any]:
    """Train (or resume) one cell, evaluate it, and write its ``cell.json``."""
    from ..run_folder import find_last_checkpoint
    from ..train.plan import plan_run
    from ..train.recipe import run_finetune

    checkpoint = find_last_checkpoint(cell.folder / "run")
    if checkpoint is not None:
        logger.info("%s: resuming from %s", cell.name, checkpoint)
    args = parse_cell_args(cell, study.path, ["--resume_from_checkpoint", str(checkpoint)] if checkpoint else [])
    plan = plan_run(args)
    with PeakMemory() as memory:
        summary = run_finetune(plan)
    gc.collect()
    metrics = evaluate_cell(cell, study)
    seconds = summary.get("train_seconds") or 0.0
    result = {
        "cell": cell.name, "model": cell.model, "peft_type": cell.peft_type, "data": cell.mixture,
        "flags": cell.flags, "global_step": summary["global_step"], "final_loss": summary["last_loss"],
        "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
        "train_seconds": seconds,
        "samples_per_second": summary["global_step"] * summary["global_batch"] / seconds if seconds else None,
        "peak_memory_gib": memory.peak_bytes / 2**30, "memory_kind": memory.kind,
        "loss_curve": _loss_curve(cell.folder / "run"), "metrics": metrics,
    }
    write_json_atomic(cell.folder / CELL_FILE, result)
    return result


def finished_result(cell: Cell) -> dict[str, Any] | None:
    """The saved result of a finished cell; a cell trained with other flags is an error, not a silent reuse."""
    path = cell.folder / CELL_FILE
    if not path.is_file():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    if result.get("flags") != json.loads(json.dumps(cell.flags)):
        raise UserError(f"study: cell {cell.folder} was trained with other settings; delete that folder to "
                        "retrain it, or choose another output_dir")
    return result


def _metric_names() -> str:
    """What the study's metric columns hold, per metric the tasks it runs: "accuracy (choice, math)"."""
    from .tasks import TASKS

    tasks: dict[str, list[str]] = {}
    for task in TASKS.values():
        if task.in_study:
            tasks.setdefault(task.metric, []).append(task.name)
    return "; ".join(f"{metric} ({', '.join(names)})" for metric, names in tasks.items())


def write_report(study: Study, results: list[dict[str, Any]]) -> str:
    """``report.md`` / ``report.json`` plus ``loss_curves.png`` and ``metrics.png`` in the study folder."""
    from .reports import grouped_bar_chart, line_chart, markdown_table

    eval_names = [spec["name"] for spec in study.evals]
    headers = ["model", "peft_type", "data", "CoT cue", "final loss", "trainable params", "samples/s",
               "peak memory (GiB)", *eval_names]
    rows, labels = [], []
    for result in results:
        for cue in study.cues:
            rows.append([Path(result["model"]).name, result["peft_type"], result["data"], cue or "-",
                         result["final_loss"], f"{result['trainable_params']:,}", result["samples_per_second"],
                         result["peak_memory_gib"], *[result["metrics"].get(cue, {}).get(n) for n in eval_names]])
            labels.append(f"{result['peft_type']}/{result['data']}" + (f"/{_cue_slug(cue)}" if len(study.cues) > 1
                                                                        else ""))
    steps = results[0]["flags"]["max_steps"] if results else 0
    memory_kind = results[0]["memory_kind"] if results else ""
    text = (f"# Study {study.path.name}\n\nBudget: {steps} optimizer steps per cell. Peak memory: {memory_kind}. "
            f"Metrics: {_metric_names()}.\n\n" + markdown_table(headers, rows)
            + "\n![loss curves](loss_curves.png)\n" + ("![metrics](metrics.png)\n" if eval_names else ""))
    study.output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(study.output_dir / "report.json", {"grid": str(study.path), "cells": results})
    (study.output_dir / "report.md").write_text(text, encoding="utf-8")
    curves = {result["cell"]: ([s for s, _ in result["loss_curve"]], [v for _, v in result["loss_curve"]])
              for result in results if result["loss_curve"]}
    line_chart(curves, study.output_dir / "loss_curves.png", f"training loss, {steps} steps per cell", "step", "loss")
    if eval_names:
        series = {name: [row[len(headers) - len(eval_names) + i] for row in rows] for i, name in enumerate(eval_names)}
        grouped_bar_chart(labels, series, study.output_dir / "metrics.png", "evaluation per cell", "metric")
    return text


def run_study(study: Study) -> tuple[list[dict[str, Any]], int]:
    """Run every unfinished cell in order; returns all results and how many cells were skipped."""
    results, skipped = [], 0
    for number, cell in enumerate(study.cells, start=1):
        done = finished_result(cell)
        if done is not None:
            logger.info("cell %d/%d %s: finished before, skipped", number, len(study.cells), cell.name)
            results.append(done)
            skipped += 1
            continue
        logger.info("cell %d/%d %s: training", number, len(study.cells), cell.name)
        started = time.time()
        results.append(run_cell(cell, study))
        logger.info("cell %s done in %.0f s", cell.name, time.time() - started)
    return results, skipped


def build_parser() -> argparse.ArgumentParser:
    """``python -m alpaca_cot.eval.study GRID.yaml [--output_dir DIR]``."""
    p = ArgumentParser(prog="python -m alpaca_cot.eval.study", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="YAML grid file (see configs/study-demo.yaml)")
    p.add_argument("--output_dir", help="study folder (default: the grid's output_dir, else studies/<grid name>)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Check the whole grid, run what is not finished, write the report and print it."""
    from ..cli import run_cli

    args = build_parser().parse_args(argv)

    def run() -> int:
        study = load_study(Path(args.grid), args.output_dir)
        results, skipped = run_study(study)
        text = write_report(study, results)
        print(f"{len(results) - skipped} cells trained, {skipped} finished cells skipped; "
              f"report in {study.output_dir / 'report.md'}")
        print(text)
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
