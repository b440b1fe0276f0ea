"""End to end on the embedded SmolLM2-135M-Instruct: train a few steps, reload in a fresh process, generate."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, needs_embedded_model

pytestmark = [needs_embedded_model, pytest.mark.slow]

FAST = ["--data", "demo", "--per_gpu_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--cutoff_len", "160", "--val_set_size", "0", "--report_to", "none", "--logging_steps", "1"]


def _run(*argv, stdin=None):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          input=stdin)


def test_train_save_reload_generate_in_a_fresh_process(tmp_path):
    out = tmp_path / "run"
    train = _run("uniform_finetune.py", *FAST, "--max_steps", "3", "--heldout_eval", "2", "--output_dir", str(out))
    assert train.returncode == 0, train.stderr[-2000:]
    assert "held-out exact match on 2 problems: before" in train.stdout
    manifest = json.loads((out / "alpaca_cot_run.json").read_text())
    assert manifest["base_model"] == "smollm2-135m-instruct" and manifest["model_type"] == "llama"
    assert manifest["result"]["heldout_after"] is not None
    chat = _run("generate.py", "--lora_dir", str(out), "--instruction", "Solve the math word problem step by step.",
                "--input", "Tom has 3 apples and buys 2 more. How many apples does he have?",
                "--max_new_tokens", "24")
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.strip()  # a real model says something
    # Folded into the embedded (GGUF-converted) base, the plain checkpoint gives the same greedy answer.
    merged = tmp_path / "merged"
    merging = _run("merge.py", "--lora_dir", str(out), "--merged_dir", str(merged))
    assert merging.returncode == 0, merging.stderr[-2000:]
    plain = _run("generate.py", "--model_name_or_path", str(merged), "--instruction",
                 "Solve the math word problem step by step.", "--input",
                 "Tom has 3 apples and buys 2 more. How many apples does he have?", "--max_new_tokens", "24")
    assert plain.returncode == 0 and plain.stdout == chat.stdout


def test_resume_on_the_embedded_model_continues_with_the_same_loss(tmp_path):
    import shutil

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [*FAST, "--max_steps", "3", "--save_steps", "2"]
    assert _run("uniform_finetune.py", *common, "--output_dir", str(straight)).returncode == 0
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    result = _run("uniform_finetune.py", *common, "--output_dir", str(resumed), "--resume_from_checkpoint")
    assert result.returncode == 0, result.stderr[-2000:]

    def losses(folder):
        state = json.loads((folder / "checkpoint-3" / "trainer_state.json").read_text())
        return [entry["loss"] for entry in state["log_history"] if "loss" in entry]

    assert abs(losses(resumed)[2] - losses(straight)[2]) < 1e-4


def test_console_chat_remembers_the_first_turn():
    session = _run("server.py", "--model_name_or_path", "smollm2-135m-instruct", "--max_new_tokens", "24",
                   stdin="My name is Zorblax. Please remember it.\nWhat is my name?\nstop\n")
    assert session.returncode == 0, session.stderr[-2000:]
    replies = session.stdout.strip().splitlines()
    assert "Zorblax" in replies[-1]  # turn 2 answered from turn 1's context


def test_chat_template_of_the_embedded_model(tmp_path):
    out = tmp_path / "chat"
    train = _run("uniform_finetune.py", *FAST, "--template", "chat", "--max_steps", "1", "--output_dir", str(out))
    assert train.returncode == 0, train.stderr[-2000:]
    answer = _run("generate.py", "--lora_dir", str(out), "--instruction", "What is the capital of France?",
                  "--max_new_tokens", "20")
    assert answer.returncode == 0 and "Paris" in answer.stdout  # the instruct model's own format works
