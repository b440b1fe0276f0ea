"""Entry scripts called through main([...]) on the tiny model: training, saving, reloading, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import generate
import uniform_finetune
from alpaca_cot.run_folder import RUN_MANIFEST
from tests.conftest import ROOT
from tests.conftest import train_tiny as _train


def _logged_losses(out):
    state = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_training_lowers_the_loss_and_saves_a_complete_run(tiny_llama, sample_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_llama, sample_file, out, "--max_steps", "40", "--learning_rate", "2e-2",
                  "--lora_target_modules", "all",
                  "--lora_r", "16", "--logging_steps", "1", "--save_steps", "40") == 0
    printed = capsys.readouterr().out
    assert "trained 40 steps" in printed
    assert f"python generate.py --lora_dir {out} --instruction 'Add the numbers.' --input '1 and 2'" in printed
    losses = _logged_losses(out)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # the loss really falls
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", RUN_MANIFEST):
        assert (out / name).is_file(), name
    manifest = json.loads((out / RUN_MANIFEST).read_text())
    assert manifest["model_type"] == "llama" and manifest["template"] == "alpaca"
    assert manifest["base_model"] == str(tiny_llama)
    [data] = manifest["data"]
    assert data["records"] == 10 and len(data["sha256"]) == 64
    assert manifest["settings"]["lora_r"] == 16 and manifest["versions"]["transformers"]
    assert manifest["result"]["last_loss"] == losses[-1]
    assert not list(out.glob(".saving-*"))  # no staging left behind
    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())


def test_plain_peft_loads_the_adapter_and_generate_reads_the_run(tiny_llama, sample_file, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert _train(tiny_llama, sample_file, out, "--max_steps", "2", "--lora_r", "4") == 0
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = PeftModel.from_pretrained(base, out)  # outside our code
    assert model.peft_config["default"].r == 4
    capsys.readouterr()
    # No --lora_r, no base path: both come from the saved run.
    assert generate.main(["--lora_dir", str(out), "--instruction", "Add the numbers.", "--input", "1 and 2",
                          "--max_new_tokens", "5"]) == 0
    first = capsys.readouterr().out
    assert generate.main(["--lora_dir", str(out), "--instruction", "Add the numbers.", "--input", "1 and 2",
                          "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out == first  # greedy: reproducible


@pytest.mark.parametrize("peft_type", ["lora", "prompt", "houlsby",
                                       *(pytest.param(peft_type, marks=pytest.mark.slow) for peft_type in
                                         ["adalora", "ia3", "p_tuning", "prefix", "pfeiffer", "parallel"])])
def test_every_method_trains_saves_and_reloads(peft_type, tiny_llama, sample_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import alpaca_cot_peft  # noqa: F401 - the bottleneck types need the extension registered

    out = tmp_path / peft_type
    assert _train(tiny_llama, sample_file, out, "--peft_type", peft_type, "--max_steps", "3",
                  "--num_virtual_tokens", "4", "--prompt_encoder_hidden_size", "16", "--bottleneck_size", "8") == 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out)
    assert model.peft_config["default"].peft_type.value.lower().replace("_", "") == {
        "lora": "lora", "adalora": "adalora", "ia3": "ia3", "prompt": "prompttuning", "p_tuning": "ptuning",
        "prefix": "prefixtuning", "houlsby": "bottleneck", "pfeiffer": "bottleneck", "parallel": "bottleneck",
    }[peft_type]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    assert torch.isfinite(logits).all()
    assert generate.main(["--lora_dir", str(out), "--instruction", "Name a colour.", "--max_new_tokens", "3"]) == 0


@pytest.mark.parametrize("peft_type", ["lora", *(pytest.param(peft_type, marks=pytest.mark.slow) for peft_type in
                                                ["adalora", "ia3", "houlsby", "parallel", "prompt", "prefix"])])
def test_adapter_methods_train_on_a_4bit_base(peft_type, tiny_llama_wide, sample_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / peft_type
    assert _train(tiny_llama_wide, sample_file, out, "--peft_type", peft_type, "--quantization_bit", "4",
                  "--max_steps", "2", "--bottleneck_size", "8", "--num_virtual_tokens", "4") == 0
    assert generate.main(["--lora_dir", str(out), "--instruction", "Name a colour.", "--max_new_tokens", "3"]) == 0


def test_resume_gives_the_same_next_step_loss(tiny_llama, sample_file, tmp_path):
    import shutil

    common = ("--max_steps", "6", "--save_steps", "3", "--logging_steps", "1", "--lora_dropout", "0.1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(tiny_llama, sample_file, straight, *common) == 0
    # A run that stopped after its step-3 checkpoint: only that checkpoint is on disk.
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    assert _train(tiny_llama, sample_file, resumed, *common, "--resume_from_checkpoint") == 0
    after_resume = _logged_losses(resumed)[3:]
    assert len(after_resume) == 3
    assert after_resume == pytest.approx(_logged_losses(straight)[3:], rel=1e-5)


BAD_INPUTS = [
    (["--data", "missing.json"], "--data: file missing.json does not exist"),
    (["--data", "alpaca"], "alpaca_data_cleaned.json is not on disk; download it with"),
    (["--data", "alpacca"], "did you mean 'alpaca'"),
    (["--data", "demo", "--model_name_or_path", "./no/model"], "./no/model does not exist"),
    (["--data", "demo", "--peft_type", "lorra"], "invalid choice: 'lorra'"),
    (["--data", "demo", "--model_type", "lama"], "invalid choice: 'lama'"),
    (["--data", "demo", "--lora_target_modules", "query_key_value", "--max_steps", "1"],
     "query_key_value not in this model; its Linear layers are:"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS)
def test_bad_input_gives_one_line_and_nonzero_exit(argv, message, tiny_llama, tmp_path):
    if "--model_name_or_path" not in argv:
        argv = [*argv, "--model_name_or_path", str(tiny_llama)]
    result = subprocess.run([sys.executable, "uniform_finetune.py", *argv, "--output_dir", str(tmp_path / "o"),
                             "--report_to", "none"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines()
                   if line.startswith(("error:", "uniform_finetune.py: error"))]
    assert len(error_lines) == 1


def test_bad_records_name_file_and_record(tiny_llama, tmp_path, capsys):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "reply": "d"}]))
    assert _train(tiny_llama, data, tmp_path / "o", "--max_steps", "1") == 2
    err = capsys.readouterr().err
    assert "bad.json: 1 of 2 records are invalid: bad.json:1: record 1 has no 'output' key" in err


def test_generate_without_adapter_or_model_is_refused(capsys):
    assert generate.main(["--instruction", "hi"]) == 2
    assert "give --lora_dir" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_reads_instructions_from_stdin(tiny_llama, sample_file, tmp_path):
    out = tmp_path / "run"
    assert _train(tiny_llama, sample_file, out, "--max_steps", "1") == 0
    result = subprocess.run([sys.executable, "generate.py", "--lora_dir", str(out), "--max_new_tokens", "3"],
                            cwd=ROOT, input="Name a colour.\n\nAdd the numbers.\n", capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) >= 2


@pytest.mark.parametrize("bits", ["4", "8"])
def test_quantized_base_on_the_cpu_trains_and_reloads_quantized(bits, tiny_llama_wide, sample_file, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    assert _train(tiny_llama_wide, sample_file, out, "--quantization_bit", bits, "--max_steps", "2") == 0
    assert json.loads((out / RUN_MANIFEST).read_text())["quantization_bit"] == int(bits)
    capsys.readouterr()
    assert generate.main(["--lora_dir", str(out), "--instruction", "Name a colour.", "--max_new_tokens", "3"]) == 0


@pytest.mark.slow
def test_wandb_logs_offline_without_a_key_and_never_blocks(tiny_llama, sample_file, tmp_path):
    pytest.importorskip("wandb")
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc login either
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "uniform_finetune.py", "--model_name_or_path", str(tiny_llama), "--data", str(sample_file),
         "--output_dir", str(out), "--report_to", "wandb", "--max_steps", "2", "--val_set_size", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "logging offline" in result.stderr
    assert list((out / "wandb").glob("offline-run-*"))


def test_small_data_with_the_original_val_set_size_evaluates_instead_of_crashing(tiny_llama, tmp_path):
    records = [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i}"} for i in range(40)]
    data = tmp_path / "small.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "run"
    # --val_set_size 2000 on 40 records: capped to 4; eval/save intervals derived from the run length.
    argv = ["--model_name_or_path", str(tiny_llama), "--data", str(data), "--output_dir", str(out),
            "--report_to", "none", "--val_set_size", "2000", "--epochs", "1", "--gradient_accumulation_steps", "1",
            "--no_packing"]  # one example per row, so the step count below is the original's
    assert uniform_finetune.main(argv) == 0
    state = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    assert any("eval_loss" in entry for entry in state["log_history"])
    assert state["global_step"] == 9  # ceil(36 / 4)


@pytest.mark.slow
def test_adalora_really_reallocates_the_rank_budget(tiny_llama, sample_file, tmp_path):
    out = tmp_path / "adalora"
    assert _train(tiny_llama, sample_file, out, "--peft_type", "adalora", "--max_steps", "12",
                  "--adalora_tinit", "2", "--adalora_tfinal", "2", "--adalora_delta_t", "1",
                  "--adalora_init_r", "8", "--lora_r", "2") == 0
    rank_pattern = json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
    assert rank_pattern, "the budget was never reallocated"
    assert sum(sum(mask) for mask in rank_pattern.values()) < 8 * len(rank_pattern)


def test_qlora_is_lora_on_a_4bit_base_and_loraplus_trains(tiny_llama_wide, sample_file, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    assert _train(tiny_llama_wide, sample_file, out, "--peft_type", "qlora", "--loraplus_lr_ratio", "16",
                  "--max_steps", "2") == 0
    manifest = json.loads((out / RUN_MANIFEST).read_text())
    assert manifest["quantization_bit"] == 4 and manifest["peft_type"] == "qlora"
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert _train(tiny_llama_wide, sample_file, tmp_path / "q8", "--peft_type", "qlora",
                  "--quantization_bit", "8") == 2
    assert "trains on a 4-bit base" in capsys.readouterr().err
    assert _train(tiny_llama_wide, sample_file, tmp_path / "p", "--peft_type", "prompt",
                  "--loraplus_lr_ratio", "16") == 2
    assert "--loraplus_lr_ratio applies to LoRA methods" in capsys.readouterr().err


def test_bottleneck_runs_are_served_but_not_merged(tiny_llama, sample_file, tmp_path, capsys):
    import merge

    out = tmp_path / "houlsby"
    assert _train(tiny_llama, sample_file, out, "--peft_type", "houlsby", "--bottleneck_size", "8",
                  "--max_steps", "2") == 0
    assert generate.main(["--lora_dir", str(out), "--instruction", "Name a colour.", "--max_new_tokens", "3"]) == 0
    assert merge.main(["--lora_dir", str(out), "--merged_dir", str(tmp_path / "m")]) == 2
    assert "non-linear in its input, so it cannot be folded" in capsys.readouterr().err


def test_a_run_shorter_than_the_logging_interval_still_prints_its_summary(tiny_llama, sample_file, tmp_path, capsys):
    """--max_steps below --logging_steps logs no loss; the summary line used to crash on it."""
    assert _train(tiny_llama, sample_file, tmp_path / "run", "--max_steps", "2", "--logging_steps", "5") == 0
    assert "trained 2 steps" in capsys.readouterr().out
