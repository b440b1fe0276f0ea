"""python -m alpaca_cot.eval.study: a 2x2 grid (method x data mixture, two CoT cues) on a tiny model, then a rerun."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from alpaca_cot.errors import UserError
from alpaca_cot.eval import study
from alpaca_cot.eval.study import load_study
from alpaca_cot.eval.tasks import TASKS
from tests.conftest import ROOT, SAMPLE_RECORDS

MATH = [{"instruction": "Add the numbers.", "input": f"{a} and {b}", "output": f"The answer is {a + b}."}
        for a, b in [(2, 3), (4, 4)]]


def _grid(tmp_path, tiny_llama, **changes):
    sums, colours = tmp_path / "sums.json", tmp_path / "colours.json"
    sums.write_text(json.dumps(SAMPLE_RECORDS[:8]))
    colours.write_text(json.dumps(SAMPLE_RECORDS[8:] * 4))
    heldout = tmp_path / "heldout.json"
    heldout.write_text(json.dumps(MATH))
    grid = {
        "output_dir": str(tmp_path / "study"),
        "budget": {"max_steps": 2},
        "train": {"per_gpu_train_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-2,
                  "logging_steps": 1, "cutoff_len": 128},
        "grid": {"model_name_or_path": [str(tiny_llama)], "peft_type": ["lora", "ia3"],
                 "data": {"sums": [str(sums)], "sums+colours": [str(sums), str(colours)]},
                 "cot_cue": ["", "Let's think step by step."]},
        "eval": [{"task": "math", "data": str(heldout), "max_new_tokens": 4, "name": "math"}],
        **changes,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.mark.slow
def test_grid_trains_every_cell_reports_and_skips_finished_cells_on_rerun(tiny_llama, tmp_path, capsys):
    grid = _grid(tmp_path, tiny_llama)
    assert study.main([str(grid)]) == 0
    assert "4 cells trained, 0 finished cells skipped" in capsys.readouterr().out
    out = tmp_path / "study"
    report = json.loads((out / "report.json").read_text())
    cells = report["cells"]
    assert sorted((c["peft_type"], c["data"]) for c in cells) == [
        ("ia3", "sums"), ("ia3", "sums+colours"), ("lora", "sums"), ("lora", "sums+colours")]
    for cell in cells:
        assert cell["global_step"] == 2 and [step for step, _ in cell["loss_curve"]] == [1, 2]
        assert cell["final_loss"] == cell["loss_curve"][-1][1]
        assert 0 < cell["trainable_params"] < cell["total_params"] and cell["samples_per_second"] > 0
        assert cell["peak_memory_gib"] > 0
        assert set(cell["metrics"]) == {"", "Let's think step by step."}
        assert all(0 <= cell["metrics"][cue]["math"] <= 1 for cue in cell["metrics"])
    lora, ia3 = (next(c for c in cells if c["peft_type"] == m and c["data"] == "sums") for m in ("lora", "ia3"))
    assert lora["trainable_params"] != ia3["trainable_params"]
    # Each cue is its own evaluation, with its own resumable results.
    evals = sorted(p.name for p in (out / "cells").glob("*__lora__sums/eval/*"))
    assert evals == ["math__cue-Let-s-think-step-by-step.", "math__no-cue"]
    text = (out / "report.md").read_text()
    assert text.count("| tiny-llama0 |") == 8  # 4 cells x 2 cues
    for png in ("loss_curves.png", "metrics.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    first_write = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/cell.json")}

    assert study.main([str(grid)]) == 0
    assert "0 cells trained, 4 finished cells skipped" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/cell.json")} == first_write
    assert json.loads((out / "report.json").read_text())["cells"] == cells


def test_grid_mistakes_are_reported_together_before_training(tiny_llama, tmp_path, capsys):
    grid = _grid(tmp_path, tiny_llama, train={"learning_rat": 1e-3, "lora_r": 0},
                 eval=[{"task": "mcq", "data": "missing.json"}])
    assert study.main([str(grid)]) == 2
    err = capsys.readouterr().err
    assert "learning_rat" in err and "did you mean 'learning_rate'" in err
    assert "eval[0]: task must be one of" in err and "missing.json" in err
    assert not (tmp_path / "study" / "report.md").exists()


def test_shipped_study_grid_parses(tmp_path):
    loaded = load_study(ROOT / "configs" / "study-demo.yaml", str(tmp_path))
    assert [c.peft_type for c in loaded.cells] == ["lora", "houlsby", "prompt"]
    assert loaded.cues == ["", "Let's think step by step."]
    first_line = (ROOT / "configs" / "study-demo.yaml").read_text().splitlines()
    assert any("python -m alpaca_cot.eval.study configs/study-demo.yaml" in line for line in first_line[:5])


def test_a_judge_eval_is_refused_before_training(tiny_llama, tmp_path, capsys):
    heldout = tmp_path / "belle.json"
    heldout.write_text(json.dumps([{"question": "q", "std_answer": "a", "class": "open qa"}]))
    grid = _grid(tmp_path, tiny_llama, eval=[{"task": "judge", "data": str(heldout)}])
    assert study.main([str(grid)]) == 2
    assert "eval[0]: the judge task runs through evaluate.py" in capsys.readouterr().err
    assert not list(tmp_path.glob("study/**/adapter_config.json"))  # nothing trained


@pytest.mark.parametrize("task", list(TASKS.values()), ids=list(TASKS))
def test_the_study_takes_the_tasks_whose_rows_it_can_run(task, tiny_llama, tmp_path):
    data = tmp_path / "records.json"
    data.write_text("[]")
    grid = _grid(tmp_path, tiny_llama, eval=[{"task": task.name, "data": str(data)}])
    if task.in_study:
        assert [spec["task"] for spec in load_study(grid).evals] == [task.name]
    else:
        with pytest.raises(UserError, match=rf"eval\[0\]: the {task.name} task runs through evaluate.py"):
            load_study(grid)


def test_an_unknown_study_task_is_told_the_rows_the_study_runs(tiny_llama, tmp_path):
    grid = _grid(tmp_path, tiny_llama, eval=[{"task": "mcq", "data": str(tmp_path)}])
    with pytest.raises(UserError) as refused:
        load_study(grid)
    named = re.search(r"eval\[0\]: task must be one of ([\w, ]+?)(;|$)", str(refused.value)).group(1)
    assert named.split(", ") == [name for name, task in TASKS.items() if task.in_study]
