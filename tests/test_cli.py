"""Flags, --config YAML precedence, the original README's command lines."""

import json
import shlex

import pytest

from alpaca_cot.cli import DEMO_CONFIG, build_finetune_parser, parse_finetune_args
from alpaca_cot.errors import UserError
from alpaca_cot.methods import ADAPTER_INITS, BOTTLENECK_PLACEMENTS, METHODS, NON_LINEARITIES
from alpaca_cot.models import FAMILIES, QUANTIZATIONS
from alpaca_cot.presets import DEFAULT_PRESET, GENERATION_FLAGS, GENERATION_PRESETS
from alpaca_cot.templates import TEMPLATES

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

    from alpaca_cot.train.plan import default_output_dir

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
    assert err[0] == ("error: --max_new_tokens must be at least 1 (got -5); --temperature must be at least 0 "
                      "(got -1.0); --num_beams must be at least 1 (got 0); --top_p must be at most 1 (got 1.5)")


# ---------------------------------------------------------------- every flag's choices are its table's rows

def _action(parser, flag):
    return next(action for action in parser._actions if flag in action.option_strings)


TRAINING_TABLES = {"--peft_type": METHODS, "--model_type": FAMILIES, "--template": TEMPLATES,
                   "--quantization_bit": QUANTIZATIONS, "--non_linearity": NON_LINEARITIES,
                   "--adapter_init": ADAPTER_INITS}


@pytest.mark.parametrize("flag", TRAINING_TABLES)
def test_each_training_flag_offers_exactly_the_rows_of_its_table(flag):
    parser = build_finetune_parser()
    assert sorted(_action(parser, flag).choices) == sorted(TRAINING_TABLES[flag])
    for row in TRAINING_TABLES[flag]:  # and each row parses
        assert getattr(parser.parse_args([flag, str(row)]), flag[2:]) == row


@pytest.mark.parametrize("placement", list(BOTTLENECK_PLACEMENTS))
def test_every_bottleneck_placement_is_a_peft_type_named_in_the_help(placement):
    parser = build_finetune_parser()
    assert placement in _action(parser, "--peft_type").choices
    assert placement in _action(parser, "--bottleneck_size").help


INFERENCE_SCRIPTS = ("generate", "predict", "server", "web", "evaluate")


@pytest.mark.parametrize("script", INFERENCE_SCRIPTS)
@pytest.mark.parametrize("preset", list(GENERATION_PRESETS))
def test_every_preset_is_a_preset_choice_of_every_inference_script(script, preset):
    import importlib

    parser = importlib.import_module(script).build_parser()
    assert list(_action(parser, "--preset").choices) == list(GENERATION_PRESETS)
    assert _action(parser, "--preset").default == DEFAULT_PRESET
    assert f"{preset}: {GENERATION_PRESETS[preset].description}" in _action(parser, "--preset").help


@pytest.mark.parametrize("preset", GENERATION_PRESETS.values(), ids=list(GENERATION_PRESETS))
def test_every_preset_holds_valid_generation_settings(preset):
    from transformers import GenerationConfig

    GenerationConfig(**preset.settings).validate(strict=True)


@pytest.mark.parametrize("script", INFERENCE_SCRIPTS)
def test_every_inference_script_declares_the_generation_flags_once_from_the_table(script):
    import importlib

    parser = importlib.import_module(script).build_parser()
    group = next(g for g in parser._action_groups if g.title == "generation")
    assert [a.dest for a in group._group_actions] == ["preset", *GENERATION_FLAGS]
    for flag in GENERATION_FLAGS.values():
        action = _action(parser, f"--{flag.name}")
        assert action.type is flag.type and action.default is None and action in group._group_actions


def test_the_command_line_reads_the_extension_tables_without_importing_torch_or_peft():
    import subprocess
    import sys

    from tests.conftest import ROOT

    script = ("import sys; import alpaca_cot.cli; "
              "print(sys.modules['alpaca_cot_peft.tables'].__file__, 'torch' in sys.modules, 'peft' in sys.modules)")
    checkout = ROOT / "peft" / "src" / "alpaca_cot_peft" / "tables.py"
    for flags in ([], ["-S"]):  # -S: no site-packages, so no installed extension: read from the checkout's peft/
        result = subprocess.run([sys.executable, *flags, "-c", script], cwd=ROOT, capture_output=True, text=True,
                                timeout=120, check=True)
        path, torch_imported, peft_imported = result.stdout.split()
        assert path.endswith("alpaca_cot_peft/tables.py") and (path == str(checkout) or not flags)
        assert torch_imported == peft_imported == "False"


def test_the_extension_shares_the_tables_the_command_line_read():
    import alpaca_cot_peft

    assert alpaca_cot_peft.PLACEMENTS is BOTTLENECK_PLACEMENTS
    assert alpaca_cot_peft.NON_LINEARITIES is NON_LINEARITIES and alpaca_cot_peft.INIT_SCHEMES is ADAPTER_INITS


@pytest.mark.parametrize("bits", list(QUANTIZATIONS))
def test_every_quantization_bit_builds_a_bitsandbytes_config_of_that_width(bits):
    import torch
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(**QUANTIZATIONS[bits](torch.bfloat16))
    assert [b for b in (4, 8) if getattr(config, f"load_in_{b}bit")] == [bits]
