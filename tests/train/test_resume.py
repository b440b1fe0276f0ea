"""Stopped after any checkpoint (or killed with SIGKILL) and resumed with --resume_from_checkpoint, every mode ends
with the uninterrupted run's adapter and losses: LoRA with packing (the default), AdaLoRA (its rank allocator's
state), a bottleneck adapter, prompt tuning and streams (the data position); and a stream's losses are true
per-token means, as without --streaming.

Every run is a real ``uniform_finetune.py`` process on the tiny LLaMA. A run stopped after checkpoint k is the
uninterrupted run's ``checkpoint-k`` copied into a fresh folder (the same bytes a run killed right after committing
it leaves), with the next checkpoint beside it written but never committed (a kill while it was being saved).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alpaca_cot.run_folder import CHECKPOINT_COMPLETE, find_last_checkpoint
from alpaca_cot.train.resume import ADALORA_STATE, STREAM_POSITION
from tests.conftest import ROOT
from tests.train.test_distributed import _env

pytestmark = pytest.mark.slow  # every test here runs subprocesses for 10-20 s: `-m "not slow"` leaves them out

SCRIPT = str(ROOT / "uniform_finetune.py")
ADAPTER_ATOL = 1e-6  # measured: 0.0 (bit for bit) in every mode on this machine
LOSS_RTOL = 1e-5

ADALORA = ["--peft_type", "adalora", "--adalora_init_r", "8", "--lora_r", "2", "--adalora_tinit", "2",
           "--adalora_tfinal", "3", "--adalora_delta_t", "2"]  # budgeting from step 3, masks on even steps
# mode: (flags, stop after checkpoint k, steps N)
MODES = {
    "lora-packed": ([], 3, 6),
    "adalora": (ADALORA, 5, 10),  # k in the budgeting phase, between two masks; N in the final phase
    "houlsby": (["--peft_type", "houlsby", "--bottleneck_size", "8", "--adapter_dropout", "0.1"], 3, 6),
    "prompt": (["--peft_type", "prompt", "--num_virtual_tokens", "4"], 3, 6),
    # 13 records are 7 micro-batches of 2 per pass: steps 1-3 and a short step 4 (its last micro-batch alone)
    "stream-unpacked-end-of-pass": (["--streaming", "--no_packing"], 4, 9),
}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """13 records of unequal lengths: passes end inside an optimizer step of 2 x 2."""
    path = tmp_path_factory.mktemp("resume-data") / "train.json"
    records = [{"instruction": f"Add {a} and {b}.", "input": "",
                "output": f"{a} + {b} = {a + b}." + " More." * (a * b % 5)} for a in range(4) for b in range(4)]
    path.write_text(json.dumps(records[:13]))
    return path


def _flags(model: Path, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [SCRIPT, "--model_name_or_path", str(model), "--data", str(data), "--output_dir", str(out),
            "--report_to", "none", "--val_set_size", "0", "--cutoff_len", "64", "--learning_rate", "1e-2",
            "--logging_steps", "1", "--seed", "1", "--per_gpu_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--save_steps", "1", "--save_total_limit", "100",
            "--max_steps", str(steps), *extra]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *command], cwd=cwd, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _losses(run: Path, steps: int) -> list[float]:
    state = json.loads((run / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def _adapter_difference(run: Path, reference: Path) -> float:
    """The largest absolute difference between two saved adapters (which must have the same tensors)."""
    got, want = load_file(run / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    assert all(got[name].shape == want[name].shape for name in want)
    assert any(tensor.abs().max() > 0 for tensor in want.values() if tensor.numel())
    return max((got[name] - want[name]).abs().max().item() for name in want if want[name].numel())


def _stopped_after(reference: Path, out: Path, step: int) -> None:
    """A run folder as a run stopped after committing checkpoint ``step`` leaves it, plus a torn next checkpoint."""
    out.mkdir()
    shutil.copytree(reference / f"checkpoint-{step}", out / f"checkpoint-{step}")
    torn = out / f"checkpoint-{step + 1}"
    shutil.copytree(reference / f"checkpoint-{step + 1}", torn)  # every file written ...
    (torn / CHECKPOINT_COMPLETE).unlink()  # ... but never committed
    (torn / "optimizer.pt").write_bytes(b"torn")


def _assert_resumed_log(stderr: str, out: Path, step: int, steps: int, torn: Path | None) -> None:
    assert f"resuming from {out / f'checkpoint-{step}'}: step {step} of {steps}" in stderr, stderr[-3000:]
    if torn is not None:
        assert f"skipping torn checkpoint {torn}: no {CHECKPOINT_COMPLETE}" in stderr


@pytest.mark.parametrize("mode", sorted(MODES))
def test_resumed_run_ends_as_the_uninterrupted_one(mode, tiny_llama, data_file, tmp_path):
    flags, step, steps = MODES[mode]
    reference, out = tmp_path / "reference", tmp_path / "resumed"
    _run(_flags(tiny_llama, data_file, reference, steps, *flags), tmp_path)
    _stopped_after(reference, out, step)
    assert find_last_checkpoint(out) == out / f"checkpoint-{step}"

    result = _run(_flags(tiny_llama, data_file, out, steps, *flags, "--resume_from_checkpoint"), tmp_path)
    _assert_resumed_log(result.stderr, out, step, steps, torn=out / f"checkpoint-{step + 1}")
    assert _losses(out, steps) == pytest.approx(_losses(reference, steps), rel=LOSS_RTOL)
    assert len(_losses(out, steps)) == steps
    assert _adapter_difference(out, reference) <= ADAPTER_ATOL
    if mode == "adalora":
        state = torch.load(reference / f"checkpoint-{step}" / ADALORA_STATE, weights_only=True)
        assert state["rank_pattern"] and state["exp_avg_ipt"]  # the budget was being reallocated at step k
        saved = json.loads((reference / "adapter_config.json").read_text())["rank_pattern"]
        assert saved and saved == json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
    if mode.startswith("stream"):
        position = json.loads((reference / f"checkpoint-{step}" / STREAM_POSITION).read_text())
        assert position == {"epoch": 0, "batches": 7, "ended": True}  # checkpoint k closes the first pass
        assert "the stream resumes in pass 2 after its first 0 micro-batches" in result.stderr


def test_a_stream_killed_mid_pass_resumes_with_the_same_batches(tiny_llama, data_file, tmp_path):
    """SIGKILL right after a checkpoint inside the second pass of a stream packed on the fly (the default)."""
    steps, flags = 8, ["--streaming"]
    reference, out = tmp_path / "reference", tmp_path / "killed"
    _run(_flags(tiny_llama, data_file, reference, steps, *flags), tmp_path)
    position = json.loads((reference / "checkpoint-5" / STREAM_POSITION).read_text())
    assert position["epoch"] == 1 and position["batches"] > 0  # step 5 is inside the second pass

    process = subprocess.Popen([sys.executable, *_flags(tiny_llama, data_file, out, steps, *flags)], cwd=tmp_path,
                               env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (out / "checkpoint-5" / CHECKPOINT_COMPLETE).is_file():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    last = find_last_checkpoint(out)
    step = int(last.name.split("-")[1])
    assert 5 <= step < steps and not (out / "adapter_model.safetensors").exists()
    torn = out / f"checkpoint-{step + 1}"
    if not torn.exists():  # the kill came before the next checkpoint began: forge the worst torn one
        shutil.copytree(last, torn)
        (torn / CHECKPOINT_COMPLETE).unlink()

    result = _run(_flags(tiny_llama, data_file, out, steps, *flags, "--resume_from_checkpoint"), tmp_path)
    _assert_resumed_log(result.stderr, out, step, steps, torn)
    assert "the stream resumes in pass 2 after its first" in result.stderr
    assert _losses(out, steps) == pytest.approx(_losses(reference, steps), rel=LOSS_RTOL)
    assert _adapter_difference(out, reference) <= ADAPTER_ATOL


def test_streamed_losses_are_the_per_token_means_of_the_unstreamed_run(tiny_llama, tmp_path):
    """3 records, 1 per micro-batch, 4 accumulation steps: every optimizer step is one whole pass, whatever the
    order, so --streaming must log the losses of the same run without it (before: no step ever completed)."""
    data = tmp_path / "three.json"
    data.write_text(json.dumps([{"instruction": f"Add {a} and 7.", "input": "", "output": f"{a} + 7 = {a + 7}."
                                 + " Done." * a} for a in (1, 4, 9)]))
    common = ["--per_gpu_train_batch_size", "1", "--gradient_accumulation_steps", "4", "--lora_dropout", "0"]
    streamed, whole = tmp_path / "streamed", tmp_path / "whole"
    _run([*_flags(tiny_llama, data, streamed, 3), *common, "--streaming"], tmp_path)
    _run([*_flags(tiny_llama, data, whole, 3), *common], tmp_path)
    assert len(_losses(streamed, 3)) == 3
    assert _losses(streamed, 3) == pytest.approx(_losses(whole, 3), rel=LOSS_RTOL)
    assert _adapter_difference(streamed, whole) <= ADAPTER_ATOL
