"""Flags, --config YAML precedence, the original README's command lines."""

import json
import shlex

import pytest

from alpaca_cot.cli import DEMO_CONFIG, parse_finetune_args
from alpaca_cot.errors import UserError

# The uniform_finetune.py command lines of the original README (model path made local).
ORIGINAL_COMMANDS = [
    "--model_type llama --model_name_or_path ./m --data alpaca-belle-cot --lora_target_modules q_proj v_proj "
    "--per_gpu_train_batch_size 4 --learning_rate 3e-4 --epochs 1",
    "--model_type chatglm --model_name_or_path ./m --data alpaca-belle-cot --lora_target_modules query_key_value "
    "--lora_r 32 --lora_alpha 32 --lora_dropout 0.1 --per_gpu_train_batch_size 2 --learning_rate 2e-5 --epochs 1",
    "--model_type llama --model_name_or_path ./m --data alpaca-belle-cot --peft_type adalora "
    "--per_gpu_train_batch_size 4 --learning_rate 3e-4 --epochs 1",
    "--model_type llama --model_name_or_path ./m --data alpaca --peft_type prompt --num_virtual_tokens 20 "
    "--per_gpu_train_batch_size 4 --learning_rate 3e-4 --epochs 1 --cutoff_len 512 --val_set_size 0",
    "--model_type llama --model_name_or_path ./m --data alpaca --peft_type p_tuning --prompt_encoder_hidden_size 128 "
    "--report_to none --compute_dtype bf16 --quantization_bit 4 --gradient_accumulation_steps 32",
    "--model_type llama --model_name_or_path ./m --data alpaca --peft_type prefix --resume_from_checkpoint "
    "--local_rank 0 --size 7b",
]


@pytest.mark.parametrize("command", ORIGINAL_COMMANDS)
def test_original_command_lines_parse(command):
    args = parse_finetune_args(shlex.split(command))
    assert args.data and args.model_name_or_path == "./m"


def test_bare_resume_flag_means_latest():
    args = parse_finetune_args(["--data", "demo", "--resume_from_checkpoint"])
    assert args.resume_from_checkpoint is True


def test_no_data_runs_the_demo_recipe():
    args = parse_finetune_args([])
    assert args.data == ["demo"] and args.config == str(DEMO_CONFIG)
    assert args.heldout_eval == 50 and args.max_steps > 0 and args.report_to == "none"


def test_flags_beat_config_file_which_beats_defaults(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: [demo]\nlearning_rate: 1e-4\nlora_r: 4\nepochs: 2\n")
    args = parse_finetune_args(["--config", str(config), "--lora_r", "16"])
    assert args.lora_r == 16  # flag
    assert args.learning_rate == 1e-4 and args.epochs == 2  # file ("1e-4" converted by the flag's type)
    assert args.cutoff_len == 512  # default


def test_unknown_config_key_names_key_and_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: [demo]\nlora_rank: 4\n")
    with pytest.raises(UserError, match=r"run.yaml: unknown key 'lora_rank' \(did you mean 'lora_r'\?\)"):
        parse_finetune_args(["--config", str(config)])


def test_bad_config_values_are_all_reported(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: [demo]\npeft_type: lorra\nlora_r: many\n")
    with pytest.raises(UserError, match=r"peft_type: 'lorra' is not one of.*lora_r: 'many' is not a valid int"):
        parse_finetune_args(["--config", str(config)])


def test_missing_config_file():
    with pytest.raises(UserError, match="--config: nope.yaml does not exist"):
        parse_finetune_args(["--config", "nope.yaml"])


def test_invalid_numbers_are_collected():
    with pytest.raises(UserError, match=r"--per_gpu_train_batch_size must be at least 1.*--learning_rate must be"):
        parse_finetune_args(["--data", "demo", "--per_gpu_train_batch_size", "0", "--learning_rate", "-1"])


def test_every_shipped_config_parses():
    from pathlib import Path

    for config in sorted(Path(DEMO_CONFIG).parent.glob("*.yaml")):
        first_lines = config.read_text().splitlines()[:6]
        if any("python -m alpaca_cot.eval.study" in line for line in first_lines):
            continue  # a study grid, not a training config: tests/eval/test_study.py parses it
        assert any("python uniform_finetune.py" in line for line in first_lines), f"{config} lacks its command"
        parse_finetune_args(["--config", str(config)])


def test_default_output_dir_follows_the_original_layout_without_mixture_amounts_or_wildcards():
    from argparse import Namespace

    from alpaca_cot.train.recipe import default_output_dir

    args = Namespace(model_name_or_path="models/llama-7b/", data=["alpaca:0.5", "belle:2000", "./x/mine.json"],
                     learning_rate=3e-4, peft_type="lora")
    assert default_output_dir(args) == "saved_models/llama-7b_alpaca-belle-mine_0.0003/lora"
    args.data = ["data/*.jsonl"]
    assert default_output_dir(args) == "saved_models/llama-7b_data_0.0003/lora"


@pytest.mark.parametrize("script", ["generate", "predict", "server", "evaluate"])
def test_out_of_range_generation_flags_are_one_line_before_loading(script, tmp_path, capsys):
    import importlib

    main = importlib.import_module(script).main
    data = tmp_path / "x.json"
    data.write_text(json.dumps([{"instruction": "1 + 1?", "input": "", "output": "#### 2"}]), encoding="utf-8")
    required = {"generate": ["--instruction", "hi"],
                "predict": ["--data", str(data), "--result_dir", str(tmp_path / "out.jsonl")],
                "server": [],
                "evaluate": ["--task", "math", "--data", str(data), "--output_dir", str(tmp_path / "eval")]}[script]
    code = main(["--model_name_or_path", str(tmp_path / "never-loaded"), *required, "--max_new_tokens", "-5",
                 "--temperature", "-1", "--top_p", "1.5", "--num_beams", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == ("error: --max_new_tokens must be >= 1 (got -5); --temperature must be >= 0 (got -1.0); "
                      "--num_beams must be >= 1 (got 0); --top_p must be <= 1 (got 1.5)")
