"""Several processes (torchrun on CPUs, gloo), multi-node launch, and runs that survive faults.

Every run here is a real subprocess of ``uniform_finetune.py`` on the tiny LLaMA. The one-process
reference run is shared: the 2-process run must match it (same global batch), and so must a run
killed with SIGKILL and resumed. What needs CUDA (DeepSpeed, FSDP) is checked up to the point where
it is refused on a CPU, and skips its training run with the reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alpaca_cot.checks import DEEPSPEED_CONFIGS, zero_stage
from alpaca_cot.cli import build_finetune_parser
from alpaca_cot.methods import get_method
from alpaca_cot.run_folder import CHECKPOINT_COMPLETE, find_last_checkpoint, prune_checkpoints
from tests.conftest import ROOT

SCRIPT = str(ROOT / "uniform_finetune.py")
STEPS = 6  # crosses an epoch boundary: 16 records / global batch 4 = 4 steps per epoch
# The same optimizer steps on the same examples; gloo sums two ranks' gradients exactly here,
# so the runs agree to the last bit on this machine. The tolerances leave room for other BLAS builds.
ADAPTER_ATOL = 1e-6
LOSS_RTOL = 1e-5


def _collation_off() -> list[str]:
    """Turn sequence packing off where the parser has it: these tests compare runs, not collators."""
    for action in build_finetune_parser()._actions:
        if "--packing" not in action.option_strings:
            continue
        if action.choices:
            return ["--packing", next(c for c in action.choices if str(c).lower() in ("off", "false", "no", "none"))]
        if action.nargs == 0:
            negative = [o for o in action.option_strings if o.startswith("--no")]
            return negative[:1]  # a store_true flag is off when absent
        return ["--packing", "false"]
    return []


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """16 short records: four optimizer steps of global batch 4 per epoch."""
    path = tmp_path_factory.mktemp("dist-data") / "train.json"
    records = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}."}
               for a in range(4) for b in range(4)]
    path.write_text(json.dumps(records))
    return path


def _flags(model: Path, data: Path, out: Path, *extra: str, per_device: int = 2, accumulation: int = 2) -> list[str]:
    return ["--model_name_or_path", str(model), "--data", str(data), "--output_dir", str(out),
            "--report_to", "none", "--val_set_size", "0", "--cutoff_len", "64", "--max_steps", str(STEPS),
            "--learning_rate", "1e-2", "--save_steps", "1", "--save_total_limit", "2", "--logging_steps", "1",
            "--seed", "1", "--lora_dropout", "0",  # dropout masks cannot match across process counts
            "--per_gpu_train_batch_size", str(per_device), "--gradient_accumulation_steps", str(accumulation),
            *_collation_off(), *extra]


def _env() -> dict[str, str]:
    # One thread per process: two ranks share this machine's cores, and results stay reproducible.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _losses(run: Path) -> list[float]:
    state = json.loads((find_last_checkpoint(run) / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def _assert_same_adapter(run: Path, reference: Path) -> None:
    got, want = load_file(run / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    assert any(want[k].abs().max() > 0 for k in want if "lora_B" in k)  # it trained: B starts at zero
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=ADAPTER_ATOL, rtol=0, msg=name)


@pytest.fixture(scope="module")
def reference_run(tiny_llama, data_file, tmp_path_factory) -> Path:
    """One process, 2 per device x 2 accumulation = global batch 4, uninterrupted."""
    work = tmp_path_factory.mktemp("reference")
    _run([sys.executable, SCRIPT, *_flags(tiny_llama, data_file, work / "run")], cwd=work)
    return work / "run"


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tiny_llama, data_file, reference_run, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "run"
    result = _run(["torchrun", "--nproc_per_node", "2", "--master_port", str(_free_port()), SCRIPT,
                   *_flags(tiny_llama, data_file, out, per_device=2, accumulation=1)], cwd=cwd)
    assert "global batch 4 = 2 per device x 1 accumulation x 2 processes" in result.stderr
    assert result.stdout.count("adapter saved to") == 1  # rank 0 reports for the job
    assert _losses(out) == pytest.approx(_losses(reference_run), rel=LOSS_RTOL)
    assert len(_losses(out)) == STEPS
    _assert_same_adapter(out, reference_run)
    # Exactly one output folder, nothing beside it; inside, the run and the last two checkpoints.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "run"]
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"checkpoint-{STEPS - 1}", f"checkpoint-{STEPS}"]
    for checkpoint in out.glob("checkpoint-*"):
        assert (checkpoint / CHECKPOINT_COMPLETE).is_file()
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_ends_with_the_same_adapter(tiny_llama, data_file, reference_run, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, SCRIPT, *_flags(tiny_llama, data_file, out)]
    process = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (out / "checkpoint-2" / CHECKPOINT_COMPLETE).is_file():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # lands in step 3's compute or while checkpoint-3 is written
    process.wait()
    assert not (out / "adapter_model.safetensors").exists()
    last = find_last_checkpoint(out)
    step = int(last.name.split("-")[1])
    assert 2 <= step < STEPS  # usually 2 or 3, later on a busy machine
    # The worst torn checkpoint: everything written, trainer_state.json too, but not committed
    # (a kill before the other ranks finished, or during the commit). It must never be resumed from.
    torn = out / f"checkpoint-{step + 1}"
    if not torn.exists():
        shutil.copytree(last, torn)
        (torn / CHECKPOINT_COMPLETE).unlink()
        (torn / "optimizer.pt").write_bytes(b"torn")
    assert find_last_checkpoint(out) == last

    result = _run([*command, "--resume_from_checkpoint"], cwd=tmp_path)
    assert "trained" in result.stdout
    # The log names the checkpoint it resumed from and the torn one it passed over.
    assert f"resuming from {last}: step {step} of {STEPS}" in result.stderr
    assert f"skipping torn checkpoint {torn}: no {CHECKPOINT_COMPLETE}" in result.stderr
    assert _losses(out) == pytest.approx(_losses(reference_run), rel=LOSS_RTOL)
    _assert_same_adapter(out, reference_run)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{STEPS - 1}", f"checkpoint-{STEPS}"]


def _pump(stream, lines: list[str]) -> threading.Thread:
    thread = threading.Thread(target=lambda: lines.extend(stream), daemon=True)
    thread.start()
    return thread


def _wait_for(lines: list[str], text: str, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while not any(text in line for line in lines):
        assert process.poll() is None, "".join(lines[-30:])
        assert time.time() < deadline, f"no {text!r} within {seconds} s"
        time.sleep(0.05)


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a launcher and its workers (torchrun starts each worker in a session of its own)."""
    import psutil

    try:
        family = [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    process.wait()


def _long_run(model: Path, data: Path, out: Path, timeout_s: int) -> list[str]:
    return ["--model_name_or_path", str(model), "--data", str(data), "--output_dir", str(out), "--report_to",
            "none", "--val_set_size", "0", "--cutoff_len", "64", "--max_steps", "100000", "--save_steps", "100000",
            "--logging_steps", "1", "--per_gpu_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--ddp_timeout", str(timeout_s), *_collation_off()]


@pytest.mark.slow
def test_a_node_that_dies_ends_the_other_with_a_message(tiny_llama, data_file, tmp_path):
    """docs/distributed.md's two-node command on one machine; node 1 is killed, node 0 must stop by itself."""
    port = str(_free_port())
    nodes, logs = [], []
    for node in (0, 1):
        command = ["torchrun", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                   "--master_addr", "127.0.0.1", "--master_port", port, SCRIPT,
                   *_long_run(tiny_llama, data_file, tmp_path / "run", timeout_s=60)]
        nodes.append(subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
        logs.append([])
        _pump(nodes[-1].stdout, logs[-1])
    try:
        _wait_for(logs[0], "step 2/", nodes[0], 180)
        _kill_tree(nodes[1])  # the whole node: launcher and worker
        killed = time.time()
        nodes[0].wait(timeout=90)
        elapsed = time.time() - killed
    finally:
        for node in nodes:
            _kill_tree(node)
    output = "".join(logs[0])
    assert nodes[0].returncode != 0
    assert "error: rank 0: another process of this 2-process job died or stopped answering" in output, output[-3000:]
    assert "--resume_from_checkpoint" in output
    assert elapsed < 60, f"node 0 took {elapsed:.0f} s to stop"


@pytest.mark.slow
def test_a_stuck_rank_times_out_after_ddp_timeout(tiny_llama, data_file, tmp_path):
    """The original's launcher; rank 1 freezes (SIGSTOP): rank 0 gives up after --ddp_timeout, not 30 min."""
    import psutil

    command = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), SCRIPT, *_long_run(tiny_llama, data_file, tmp_path / "run", 5)]
    launcher = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    _pump(launcher.stdout, lines)
    try:
        _wait_for(lines, "step 2/", launcher, 180)
        ranks = {int(p.environ()["RANK"]): p for p in psutil.Process(launcher.pid).children(recursive=True)
                 if "RANK" in p.environ()}
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.time()
        ranks[0].wait(timeout=60)
        elapsed = time.time() - stopped
        ranks[1].send_signal(signal.SIGCONT)  # let the launcher's SIGTERM through
        launcher.wait(timeout=60)
    finally:
        _kill_tree(launcher)
    output = "".join(lines)
    assert launcher.returncode != 0
    assert "another process of this 2-process job died or stopped answering" in output, output[-3000:]
    assert "Timed out" in output
    assert 5 <= elapsed < 40, f"rank 0 stopped after {elapsed:.0f} s with --ddp_timeout 5"


# ---- checkpoints: commit marker and rotation -------------------------------------------------------

def _checkpoint(out: Path, step: int, complete: bool = True) -> Path:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    if complete:
        (folder / CHECKPOINT_COMPLETE).write_text("{}")
    return folder


def test_a_torn_checkpoint_is_never_picked_and_the_last_good_one_never_pruned(tmp_path):
    for step in (10, 20, 30):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 40, complete=False)  # killed while being written, trainer_state.json already there
    (tmp_path / "checkpoint-final").mkdir()
    assert find_last_checkpoint(tmp_path).name == "checkpoint-30"
    deleted = prune_checkpoints(tmp_path, keep=1, protect=tmp_path / "checkpoint-10")
    assert sorted(p.name for p in deleted) == ["checkpoint-20", "checkpoint-40"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-30", "checkpoint-final"]
    assert find_last_checkpoint(tmp_path / "missing") is None


# ---- DeepSpeed and FSDP: shipped configs, refused combinations -------------------------------------

@pytest.mark.parametrize("name,stage,offload", [("zero2", 2, False), ("zero3", 3, False), ("zero3_offload", 3, True)])
def test_shipped_deepspeed_configs(name, stage, offload):
    config = json.loads((DEEPSPEED_CONFIGS / f"{name}.json").read_text())
    assert zero_stage(config) == stage
    assert ("offload_optimizer" in config["zero_optimization"]) == offload
    # Batch sizes and precision come from the flags: the Trainer fills every "auto".
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto"
    assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"
    if stage == 3:  # the run folder gets whole weights, not shards
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_deepspeed_configs_fill_from_the_flags():
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (CUDA machines: pip install deepspeed)")
    from transformers import LlamaConfig, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    model = Namespace(config=LlamaConfig(hidden_size=64))  # bucket sizes are derived from the hidden size

    for path in DEEPSPEED_CONFIGS.glob("*.json"):
        args = TrainingArguments(str(path.parent), per_device_train_batch_size=2, gradient_accumulation_steps=4,
                                 learning_rate=1e-3, use_cpu=True, report_to=[])
        config = HfTrainerDeepSpeedConfig(json.loads(path.read_text()))
        config.trainer_config_process(args)
        config.trainer_config_finalize(args, model, 100)
        assert config.config["train_micro_batch_size_per_gpu"] == 2
        assert config.config["gradient_accumulation_steps"] == 4
        assert "auto" not in json.dumps(config.config)


@pytest.mark.parametrize("flags,expected", [
    (["--deepspeed", "zero2", "--fsdp"], "--deepspeed and --fsdp are two ways of sharding the same model"),
    (["--deepspeed", "zero3", "--peft_type", "qlora"], "ZeRO-3 shards the base weights, which cannot be 4/8-bit"),
    (["--deepspeed", "zero3", "--quantization_bit", "8"], "use ZeRO-2 (--deepspeed zero2) or plain torchrun"),
    (["--deepspeed", "nothere.json"], "--deepspeed: nothere.json is neither a file nor a shipped config "
                                      "(zero2, zero3, zero3_offload)"),
    (["--deepspeed", "zero3_offload", "--loraplus_lr_ratio", "16"], "builds its own optimizer"),
    (["--fsdp", "--quantization_bit", "4"], "--fsdp shards the base weights"),
    (["--fsdp", "--fsdp_config", "missing.json"], "--fsdp_config: missing.json does not exist"),
    (["--fsdp_config", "x.json"], "--fsdp_config needs --fsdp"),
    (["--ddp_timeout", "0"], "--ddp_timeout must be at least 1"),  # the parser says it before the setup check
])
def test_unsupported_combinations_are_refused_in_one_line(flags, expected, tiny_llama, data_file, tmp_path, capsys):
    import uniform_finetune

    # A model path that does not exist: the refusal must come before anything is loaded.
    argv = ["--model_name_or_path", str(tmp_path / "not-loaded"), "--data", str(data_file), "--report_to", "none",
            "--output_dir", str(tmp_path / "run"), *flags]
    assert uniform_finetune.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert expected in err
    assert not (tmp_path / "run").exists()


def test_cuda_only_engines_say_what_they_need_on_a_cpu():
    from alpaca_cot.checks import check_parallel_flags
    from alpaca_cot.errors import UserError

    args = Namespace(deepspeed="zero2", fsdp=False, fsdp_config=None, ddp_timeout=1800, quantization_bit=None,
                     loraplus_lr_ratio=None)
    with pytest.raises(UserError) as refused:
        check_parallel_flags(args, get_method("lora"), cuda_available=False)
    assert "--deepspeed needs CUDA GPUs" in str(refused.value)
    if importlib.util.find_spec("deepspeed") is None:
        assert "`pip install deepspeed`" in str(refused.value)
    args.deepspeed, args.fsdp = None, True
    with pytest.raises(UserError, match="--fsdp needs CUDA GPUs"):
        check_parallel_flags(args, get_method("lora"), cuda_available=False)
    with pytest.raises(UserError, match="start the run with torchrun"):
        check_parallel_flags(args, get_method("lora"), cuda_available=True)  # not under torchrun


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 1,
                    reason="FSDP and DeepSpeed need CUDA: accelerate runs FSDP on accelerators only (on CPUs the "
                           "Trainer would fall back to DDP), and DeepSpeed's ZeRO kernels are CUDA builds")
@pytest.mark.parametrize("engine", [["--fsdp"], ["--deepspeed", "zero2"], ["--deepspeed", "zero3"]])
def test_sharded_engines_on_one_gpu_match_one_process(engine, tiny_llama, data_file, reference_run, tmp_path):
    if engine[0] == "--deepspeed":
        pytest.importorskip("deepspeed", reason="deepspeed is not installed: pip install deepspeed")
    out = tmp_path / "run"
    _run(["torchrun", "--nproc_per_node", "1", "--master_port", str(_free_port()), SCRIPT,
          *_flags(tiny_llama, data_file, out), "--compute_dtype", "fp32", *engine], cwd=tmp_path)
    assert _losses(out) == pytest.approx(_losses(reference_run), rel=1e-3)
    got, want = load_file(out / "adapter_model.safetensors"), load_file(reference_run / "adapter_model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-3, msg=name)
