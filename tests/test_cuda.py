"""What only a CUDA GPU runs: training on the GPU (fp32, bf16, 4/8-bit bases), generation and merging there.

Each test skips on a machine without CUDA. ``benchmarks/gpu_checks.sh`` runs this file, the sharded-engine tests
of ``test_distributed.py`` and the GPU benchmarks in one go.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alpaca_cot.run_folder import RUN_MANIFEST, find_last_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6


def _records() -> list[dict[str, str]]:
    return [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}."}
            for a in range(4) for b in range(4)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cuda-data") / "train.json"
    path.write_text(json.dumps(_records()))
    return path


def _train(model: Path, data: Path, out: Path, *extra: str, cpu: bool = False) -> None:
    """Train in a fresh process (``cpu``: with the GPU hidden), so each run owns its device and memory."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    argv = [sys.executable, "uniform_finetune.py", "--model_name_or_path", str(model), "--data", str(data),
            "--output_dir", str(out), "--report_to", "none", "--val_set_size", "0", "--cutoff_len", "64",
            "--max_steps", str(STEPS), "--learning_rate", "1e-2", "--logging_steps", "1", "--save_steps", str(STEPS),
            "--seed", "1", "--lora_dropout", "0", "--per_gpu_train_batch_size", "4",
            "--gradient_accumulation_steps", "1", *extra]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _losses(run: Path) -> list[float]:
    state = json.loads((find_last_checkpoint(run) / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def _assert_trained(run: Path) -> None:
    losses = _losses(run)
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


def test_fp32_run_on_the_gpu_matches_the_cpu_run(tiny_llama, data_file, tmp_path):
    """Same flags on both devices; on CUDA packed rows are kept apart by a block-diagonal mask, not per-sample SDPA."""
    _train(tiny_llama, data_file, tmp_path / "gpu", "--compute_dtype", "fp32")
    _train(tiny_llama, data_file, tmp_path / "cpu", "--compute_dtype", "fp32", cpu=True)
    assert _losses(tmp_path / "gpu") == pytest.approx(_losses(tmp_path / "cpu"), rel=1e-3)
    got = load_file(tmp_path / "gpu" / "adapter_model.safetensors")
    want = load_file(tmp_path / "cpu" / "adapter_model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-3, msg=name)


def test_default_precision_on_the_gpu_is_bf16_and_trains(tiny_llama, data_file, tmp_path):
    _train(tiny_llama, data_file, tmp_path / "run")
    _assert_trained(tmp_path / "run")
    training_args = torch.load(find_last_checkpoint(tmp_path / "run") / "training_args.bin", weights_only=False)
    assert training_args.bf16 == torch.cuda.is_bf16_supported()
    assert training_args.fp16 == (not torch.cuda.is_bf16_supported())


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_trains_on_the_gpu_and_the_adapter_loads_in_plain_peft(bits, tiny_llama_wide, data_file,
                                                                             tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    run = tmp_path / "run"
    _train(tiny_llama_wide, data_file, run, "--quantization_bit", str(bits))
    _assert_trained(run)
    assert json.loads((run / RUN_MANIFEST).read_text())["quantization_bit"] == bits

    quantization = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
                    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.bfloat16))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_wide, quantization_config=quantization,
                                                device_map={"": 0})
    model = PeftModel.from_pretrained(base, run).eval()
    tokenizer = AutoTokenizer.from_pretrained(run)
    ids = tokenizer("Add 1 and 2.", return_tensors="pt").to("cuda")
    with torch.no_grad():
        adapted = model(**ids).logits
        with model.disable_adapter():
            plain = model(**ids).logits
    assert torch.isfinite(adapted).all()
    assert not torch.allclose(adapted, plain), "the adapter changed nothing"

    result = subprocess.run([sys.executable, "generate.py", "--lora_dir", str(run), "--instruction", "Add 1 and 2.",
                             "--max_new_tokens", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_qlora_run_merges_on_the_gpu_and_reloads_in_plain_transformers(tiny_llama_wide, data_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    run, merged = tmp_path / "run", tmp_path / "merged"
    _train(tiny_llama_wide, data_file, run, "--peft_type", "qlora")
    result = subprocess.run([sys.executable, "merge.py", "--lora_dir", str(run), "--merged_dir", str(merged)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(merged, device_map={"": 0})
    assert getattr(model.config, "quantization_config", None) is None
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 12]], device="cuda")).logits
    assert torch.isfinite(logits).all()
