"""The run plan: every flag resolved once, all problems reported together, the manifest saving what was given."""

import dataclasses
import json

import pytest
import torch

from alpaca_cot.cli import parse_finetune_args
from alpaca_cot.errors import UserError
from alpaca_cot.models import FAMILIES
from alpaca_cot.train.plan import Precision, plan_run, resolve_precision


def _flags(tiny_llama, data, out, *extra):
    return parse_finetune_args(["--model_name_or_path", str(tiny_llama), "--data", str(data), "--output_dir",
                                str(out), "--report_to", "none", "--val_set_size", "0", *extra])


def test_a_plan_resolves_everything_before_loading_and_is_frozen(tiny_llama, sample_file, tmp_path):
    args = _flags(tiny_llama, sample_file, tmp_path / "run", "--peft_type", "qlora", "--heldout_eval", "0")
    plan = plan_run(args)
    assert plan.family.name == "llama" and plan.method.name == "qlora" and plan.template.name
    assert plan.quantization_bit == 4 and plan.output_dir == tmp_path / "run" and plan.resume_from is None
    assert len(plan.sources) == 1 and [str(p) for p in plan.sources[0].files] == [str(sample_file)]
    assert plan.global_batch == args.per_gpu_train_batch_size * args.gradient_accumulation_steps
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.quantization_bit = 8
    # The plan keeps its own copy of the flags: nothing rewrites the user's, and theirs cannot change it.
    assert args.quantization_bit is None and plan.flags.quantization_bit is None
    args.lora_r = 999
    assert plan.flags.lora_r != 999
    fields = plan.manifest_fields()
    assert fields["quantization_bit"] == 4 and fields["settings"]["quantization_bit"] is None
    assert not (tmp_path / "run").exists()  # planning writes nothing


def test_every_problem_of_a_run_is_reported_at_once(tmp_path):
    owned = tmp_path / "mine"
    owned.mkdir()
    (owned / "notes.txt").write_text("my work")
    args = parse_finetune_args(["--model_name_or_path", str(tmp_path / "no-model"), "--data", "no_such_dataset",
                                "--output_dir", str(owned), "--report_to", "none"])
    with pytest.raises(UserError) as refused:
        plan_run(args)
    message = str(refused.value)
    assert "\n" not in message
    for cause in ("no_such_dataset", "no-model"):
        assert cause in message, message
    assert (owned / "notes.txt").read_text() == "my work"


def test_flag_problems_come_together_before_anything_is_read(tmp_path):
    with pytest.raises(UserError) as refused:
        parse_finetune_args(["--data", "demo", "--lora_r", "0", "--peft_type", "full", "--quantization_bit", "4",
                             "--fsdp", "--streaming"])
    message = str(refused.value)
    for flag in ("--lora_r must be at least 1", "--peft_type full trains the model's own weights",
                 "--fsdp needs CUDA GPUs" if not torch.cuda.is_available() else "--fsdp",
                 "--streaming needs --max_steps"):
        assert flag in message, message


@pytest.mark.parametrize(("compute", "on_cuda", "weights_train", "expected"), [
    ("fp32", False, False, Precision("fp32", "float32", False, False)),
    ("bf16", False, False, Precision("bf16", "bfloat16", False, True)),  # a frozen base loads in bf16
    ("bf16", False, True, Precision("bf16", "float32", False, True)),  # full / freeze keep fp32 master weights
    ("fp16", False, False, Precision("fp32", "float32", False, False)),  # fp16 needs CUDA
])
def test_precision_on_the_cpu(compute, on_cuda, weights_train, expected):
    assert resolve_precision(compute, FAMILIES["llama"], on_cuda, weights_train) == expected


def test_the_manifest_saves_the_flags_as_given_and_what_was_resolved(tiny_llama, sample_file, tmp_path):
    from tests.conftest import train_tiny

    assert train_tiny(tiny_llama, sample_file, tmp_path / "run", "--max_steps", "1") == 0
    manifest = json.loads((tmp_path / "run" / "alpaca_cot_run.json").read_text())
    assert manifest["settings"]["gradient_checkpointing"] is None  # not given, so not rewritten
    assert manifest["result"]["gradient_checkpointing"] is False  # what the run decided
    assert manifest["precision"]["compute"] in ("bf16", "fp32") and manifest["world_size"] == 1
    assert manifest["model_type"] == "llama" and manifest["peft_type"] == "lora"
