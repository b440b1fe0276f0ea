"""predict.py: input order, batched == unbatched under greedy decoding, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import predict
from tests.conftest import ROOT


def _questions(path, n):
    records = [{"id": i, "instruction": f"Add the numbers {i} and {i + 1}.", "input": "" if i % 2 else f"{i}"}
               for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return records


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_line_per_record_in_input_order(tiny_run, tmp_path, capsys):
    records = _questions(tmp_path / "q.jsonl", 7)
    out = tmp_path / "out.jsonl"
    assert predict.main(["--lora_dir", str(tiny_run), "--data", str(tmp_path / "q.jsonl"), "--result_dir", str(out),
                         "--predict_batch_size", "3", "--max_new_tokens", "6"]) == 0
    assert "wrote 7 predictions" in capsys.readouterr().out
    results = _read(out)
    assert [r["id"] for r in results] == [r["id"] for r in records]
    assert all(set(r) == {"id", "instruction", "input", "generate"} for r in results)


def test_batched_equals_unbatched_under_greedy(tiny_run, tmp_path):
    _questions(tmp_path / "q.jsonl", 6)
    outputs = {}
    for batch in ("1", "4"):
        out = tmp_path / f"out{batch}.jsonl"
        assert predict.main(["--lora_dir", str(tiny_run), "--data", str(tmp_path / "q.jsonl"),
                             "--result_dir", str(out), "--predict_batch_size", batch, "--max_new_tokens", "8"]) == 0
        outputs[batch] = [r["generate"] for r in _read(out)]
    assert outputs["1"] == outputs["4"]


def test_torn_last_line_is_dropped_and_work_continues(tiny_run, tmp_path):
    _questions(tmp_path / "q.jsonl", 6)
    straight, resumed = tmp_path / "straight.jsonl", tmp_path / "resumed.jsonl"
    common = ["--lora_dir", str(tiny_run), "--data", str(tmp_path / "q.jsonl"), "--max_new_tokens", "5"]
    assert predict.main([*common, "--result_dir", str(straight)]) == 0
    lines = straight.read_text().splitlines(keepends=True)
    resumed.write_text("".join(lines[:2]) + lines[2][:10])  # killed while writing line 3
    assert predict.main([*common, "--result_dir", str(resumed)]) == 0
    assert resumed.read_text() == straight.read_text()


@pytest.mark.slow
def test_killed_run_resumes_without_losing_or_repeating_records(tiny_run, tmp_path):
    records = _questions(tmp_path / "q.jsonl", 300)
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "predict.py", "--lora_dir", str(tiny_run), "--data", str(tmp_path / "q.jsonl"),
               "--result_dir", str(out), "--predict_batch_size", "2", "--max_new_tokens", "8"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 10):
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = out.read_text().count("\n")
    assert 10 <= done_before < 300, "the run should have been killed midway"
    assert subprocess.run(command, cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    assert [r["id"] for r in _read(out)] == [r["id"] for r in records]


def test_results_of_other_data_are_not_appended_to(tiny_run, tmp_path, capsys):
    _questions(tmp_path / "q.jsonl", 3)
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"instruction": "something else", "generate": "x"}) + "\n")
    assert predict.main(["--lora_dir", str(tiny_run), "--data", str(tmp_path / "q.jsonl"),
                         "--result_dir", str(out)]) == 2
    assert "holds results of other data" in capsys.readouterr().err


def test_missing_data_file(tiny_run, tmp_path, capsys):
    assert predict.main(["--lora_dir", str(tiny_run), "--data", str(tmp_path / "nope.json"),
                         "--result_dir", str(tmp_path / "o.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
