"""The battery of user mistakes: every script, every kind of mistake, one table.

Each row runs a script's ``main`` on a mistake and asserts what docs/mistakes.md promises: exit 2, exactly one
``error:`` line, no traceback, and that the line names the file, record or flag at fault. docs/mistakes.md's count of
tested mistakes is ``len(MISTAKES)`` plus the cases that need their own set-up at the end of this file.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import evaluate
import generate
import merge
import predict
import server
import uniform_finetune
import web
from alpaca_cot.data import commands as data_commands
from alpaca_cot.errors import UserError
from alpaca_cot.eval import study

ROOT = Path(__file__).resolve().parent.parent
GOOD_RECORDS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}"}
                for a in range(3) for b in range(3)]

SCRIPTS: dict[str, Callable[[list[str]], int]] = {
    "train": uniform_finetune.main, "generate": generate.main, "predict": predict.main, "evaluate": evaluate.main,
    "merge": merge.main, "server": server.main, "web": web.main, "study": study.main,
}


def _data_cli(argv: list[str]) -> int:
    from alpaca_cot.cli import run_cli

    return run_cli(lambda: data_commands.main(argv))


SCRIPTS["data"] = _data_cli

# Files a row can name as {name}: written into the test's folder before it runs.
FILES: dict[str, str | bytes] = {
    "good.json": json.dumps(GOOD_RECORDS),
    "empty.json": "",
    "truncated.json": json.dumps(GOOD_RECORDS)[:-30],
    "numbers.json": "[1, 2, 3]",
    "no_output.json": json.dumps([{"instruction": "Say hi."}]),
    "latin1.json": '[{"instruction": "Caf\xe9?", "input": "", "output": "oui"}]'.encode("latin-1"),
    "binary.json": bytes(range(256)) * 4,
    "bad_line.jsonl": json.dumps(GOOD_RECORDS[0]) + "\n{broken\n",
    "mcq.json": json.dumps({"example": [{"question": "1+1? A. 2 B. 3", "answer": ["A"], "analysis": ""}]}),
    "missing.yaml": None,
    "bad.yaml": "lora_r: [1, 2\n",
    "unknown_key.yaml": "lora_rr: 8\n",
    "wrong_type.yaml": "lora_r: many\n",
    "list.yaml": "- lora_r\n",
    "grid_bad.yaml": "grid: [\n",
    "notes.txt": "my notes",
}


@dataclass(frozen=True)
class Mistake:
    """One row: the script, its argv (with {placeholders}), and what the error line must name."""

    name: str
    script: str
    argv: str
    names: tuple[str, ...]

    def __str__(self) -> str:
        return self.name


def _m(name: str, script: str, argv: str, *names: str) -> Mistake:
    return Mistake(name, script, argv, names)


TRAIN = "--model_name_or_path {model} --report_to none --val_set_size 0 --max_steps 1 --output_dir {tmp}/out"
INFER = "--lora_dir {run} --max_new_tokens 2"

MISTAKES = [
    # --- data files, wherever they are read
    _m("train: missing data file", "train", f"{TRAIN} --data {{tmp}}/missing.json", "missing.json"),
    _m("train: empty data file", "train", f"{TRAIN} --data {{tmp}}/empty.json", "empty.json"),
    _m("train: truncated JSON array", "train", f"{TRAIN} --data {{tmp}}/truncated.json", "truncated.json"),
    _m("train: array of numbers", "train", f"{TRAIN} --data {{tmp}}/numbers.json", "numbers.json"),
    _m("train: record without output", "train", f"{TRAIN} --data {{tmp}}/no_output.json", "no_output.json"),
    _m("train: not UTF-8", "train", f"{TRAIN} --data {{tmp}}/latin1.json", "latin1.json"),
    _m("train: binary file", "train", f"{TRAIN} --data {{tmp}}/binary.json", "binary.json"),
    _m("train: JSON Lines with a broken line", "train", f"{TRAIN} --data {{tmp}}/bad_line.jsonl", "bad_line.jsonl:2"),
    _m("train: streaming a truncated file", "train", f"{TRAIN} --streaming --data {{tmp}}/truncated.json",
       "truncated.json"),
    _m("train: streaming a broken line", "train", f"{TRAIN} --streaming --data {{tmp}}/bad_line.jsonl",
       "bad_line.jsonl:2"),
    _m("train: empty folder as data", "train", f"{TRAIN} --data {{tmp}}/emptydir", "emptydir"),
    _m("train: glob matching nothing", "train", f"{TRAIN} --data {{tmp}}/nothing*.json", "nothing*.json"),
    _m("train: unknown dataset name", "train", f"{TRAIN} --data alpacaa", "alpacaa"),
    _m("train: bad amount", "train", f"{TRAIN} --data {{tmp}}/good.json:-3", "good.json:-3"),
    _m("train: unknown --data_format", "train", f"{TRAIN} --data {{tmp}}/good.json --data_format nope",
       "--data_format"),
    _m("predict: truncated data", "predict", f"{INFER} --data {{tmp}}/truncated.json --result_dir {{tmp}}/r.jsonl",
       "truncated.json"),
    _m("predict: missing data", "predict", f"{INFER} --data {{tmp}}/missing.json --result_dir {{tmp}}/r.jsonl",
       "missing.json"),
    _m("predict: not UTF-8", "predict", f"{INFER} --data {{tmp}}/latin1.json --result_dir {{tmp}}/r.jsonl",
       "latin1.json"),
    _m("evaluate: missing data", "evaluate", f"{INFER} --task math --data {{tmp}}/missing.json --output_dir {{tmp}}/e",
       "missing.json"),
    _m("evaluate: a damaged eval_settings.json in --output_dir", "evaluate",
       f"{INFER} --task math --data {{tmp}}/good.json --output_dir {{broken_eval}}", "eval_settings.json"),
    _m("evaluate: choice data of the wrong shape", "evaluate",
       f"{INFER} --task choice --data {{tmp}}/numbers.json --output_dir {{tmp}}/e", "numbers.json"),
    _m("data validate: truncated", "data", "validate {tmp}/truncated.json", "truncated.json"),
    _m("data validate: missing", "data", "validate {tmp}/missing.json", "missing.json"),
    _m("data convert: bad records", "data", "convert {tmp}/no_output.json {tmp}/c.jsonl", "no_output.json"),
    _m("data convert: unknown --from", "data", "convert {tmp}/good.json {tmp}/c.jsonl --from nope", "--from"),
    _m("data download: unknown name", "data", "download alpacaa", "alpacaa"),
    # --- YAML
    _m("train: missing --config", "train", f"{TRAIN} --config {{tmp}}/missing.yaml", "missing.yaml"),
    _m("train: invalid YAML", "train", f"{TRAIN} --config {{tmp}}/bad.yaml", "bad.yaml"),
    _m("train: unknown YAML key", "train", f"{TRAIN} --config {{tmp}}/unknown_key.yaml", "lora_rr"),
    _m("train: YAML value of the wrong type", "train", f"{TRAIN} --config {{tmp}}/wrong_type.yaml", "lora_r"),
    _m("train: YAML that is a list", "train", f"{TRAIN} --config {{tmp}}/list.yaml", "list.yaml"),
    _m("study: missing grid", "study", "{tmp}/missing.yaml", "missing.yaml"),
    _m("study: invalid grid YAML", "study", "{tmp}/grid_bad.yaml", "grid_bad.yaml"),
    # --- training flags: each named with its range
    _m("train: --lora_r 0", "train", f"{TRAIN} --data {{tmp}}/good.json --lora_r 0", "--lora_r"),
    _m("train: --learning_rate 0", "train", f"{TRAIN} --data {{tmp}}/good.json --learning_rate 0", "--learning_rate"),
    _m("train: --lora_dropout 1.5", "train", f"{TRAIN} --data {{tmp}}/good.json --lora_dropout 1.5", "--lora_dropout"),
    _m("train: --epochs 0", "train", "--data {tmp}/good.json --epochs 0 --report_to none", "--epochs"),
    _m("train: --per_gpu_train_batch_size 0", "train", f"{TRAIN} --data {{tmp}}/good.json --per_gpu_train_batch_size 0",
       "--per_gpu_train_batch_size"),
    _m("train: --gradient_accumulation_steps -1", "train",
       f"{TRAIN} --data {{tmp}}/good.json --gradient_accumulation_steps -1", "--gradient_accumulation_steps"),
    _m("train: --cutoff_len 0", "train", f"{TRAIN} --data {{tmp}}/good.json --cutoff_len 0", "--cutoff_len"),
    _m("train: --packing_len below --cutoff_len", "train", f"{TRAIN} --data {{tmp}}/good.json --packing_len 8",
       "--packing_len"),
    _m("train: --loss_chunk_size -1", "train", f"{TRAIN} --data {{tmp}}/good.json --loss_chunk_size -1",
       "--loss_chunk_size"),
    _m("train: --adapter_scaling text", "train", f"{TRAIN} --data {{tmp}}/good.json --adapter_scaling big",
       "--adapter_scaling"),
    _m("train: --adalora_delta_t 0", "train", f"{TRAIN} --data {{tmp}}/good.json --peft_type adalora "
       "--adalora_delta_t 0", "--adalora_delta_t"),
    _m("train: --adalora_tinit -1", "train", f"{TRAIN} --data {{tmp}}/good.json --peft_type adalora "
       "--adalora_tinit -1", "--adalora_tinit"),
    _m("train: --trainable_layers 0", "train", f"{TRAIN} --data {{tmp}}/good.json --peft_type freeze "
       "--trainable_layers 0", "--trainable_layers"),
    _m("train: --ddp_timeout 0", "train", f"{TRAIN} --data {{tmp}}/good.json --ddp_timeout 0", "--ddp_timeout"),
    _m("train: --save_steps 0", "train", f"{TRAIN} --data {{tmp}}/good.json --save_steps 0", "--save_steps"),
    _m("train: --heldout_eval -1", "train", f"{TRAIN} --data {{tmp}}/good.json --heldout_eval -1", "--heldout_eval"),
    _m("train: --streaming without --max_steps", "train", "--data {tmp}/good.json --streaming --report_to none",
       "--streaming"),
    _m("train: --preprocessing_num_workers 0", "train",
       f"{TRAIN} --data {{tmp}}/good.json --preprocessing_num_workers 0", "--preprocessing_num_workers"),
    _m("train: --peft_type unknown", "train", f"{TRAIN} --data {{tmp}}/good.json --peft_type nope", "--peft_type"),
    _m("train: --quantization_bit 3", "train", f"{TRAIN} --data {{tmp}}/good.json --quantization_bit 3",
       "--quantization_bit"),
    _m("train: --lora_r text", "train", f"{TRAIN} --data {{tmp}}/good.json --lora_r many", "--lora_r"),
    _m("train: unknown flag", "train", f"{TRAIN} --data {{tmp}}/good.json --lora_rank 8", "--lora_rank"),
    _m("train: --fsdp on a CPU", "train", f"{TRAIN} --data {{tmp}}/good.json --fsdp", "--fsdp"),
    _m("train: --loraplus_lr_ratio on prompt tuning", "train",
       f"{TRAIN} --data {{tmp}}/good.json --peft_type prompt --loraplus_lr_ratio 16", "--loraplus_lr_ratio"),
    # --- generation flags, every inference script
    _m("generate: --max_new_tokens 0", "generate", "--lora_dir {run} --max_new_tokens 0 --instruction hi",
       "--max_new_tokens"),
    _m("generate: --temperature -1", "generate", f"{INFER} --temperature -1 --instruction hi", "--temperature"),
    _m("generate: --top_p 0", "generate", f"{INFER} --top_p 0 --instruction hi", "--top_p"),
    _m("generate: --top_p 1.5", "generate", f"{INFER} --top_p 1.5 --instruction hi", "--top_p"),
    _m("generate: --num_beams 0", "generate", f"{INFER} --num_beams 0 --instruction hi", "--num_beams"),
    _m("predict: --predict_batch_size 0", "predict",
       f"{INFER} --data {{tmp}}/good.json --result_dir {{tmp}}/r.jsonl --predict_batch_size 0", "--predict_batch_size"),
    _m("predict: --cutoff_len 0", "predict", f"{INFER} --data {{tmp}}/good.json --result_dir {{tmp}}/r.jsonl "
       "--cutoff_len 0", "--cutoff_len"),
    _m("evaluate: --eval_batch_size 0", "evaluate", f"{INFER} --task math --data {{tmp}}/good.json --output_dir "
       "{tmp}/e --eval_batch_size 0", "--eval_batch_size"),
    _m("evaluate: --limit 0", "evaluate", f"{INFER} --task math --data {{tmp}}/good.json --output_dir {{tmp}}/e "
       "--limit 0", "--limit"),
    _m("evaluate: --task unknown", "evaluate", f"{INFER} --task nope --data {{tmp}}/good.json --output_dir {{tmp}}/e",
       "--task"),
    _m("generate: --top_k -1", "generate", f"{INFER} --top_k -1 --instruction hi", "--top_k"),
    _m("generate: --repetition_penalty 0", "generate", f"{INFER} --repetition_penalty 0 --instruction hi",
       "--repetition_penalty"),
    _m("generate: --no_repeat_ngram_size -1", "generate", f"{INFER} --no_repeat_ngram_size -1 --instruction hi",
       "--no_repeat_ngram_size"),
    _m("evaluate: --cutoff_len 0", "evaluate", f"{INFER} --task math --data {{tmp}}/good.json --output_dir {{tmp}}/e "
       "--cutoff_len 0", "--cutoff_len"),
    _m("evaluate: --judge_retries -1", "evaluate", f"{INFER} --task math --data {{tmp}}/good.json --output_dir "
       "{tmp}/e --judge_retries -1", "--judge_retries"),
    _m("evaluate: --judge_max_tokens 0", "evaluate", f"{INFER} --task math --data {{tmp}}/good.json --output_dir "
       "{tmp}/e --judge_max_tokens 0", "--judge_max_tokens"),
    _m("data validate: --cutoff_len 0", "data", "validate {tmp}/good.json --cutoff_len 0", "--cutoff_len"),
    _m("server: --max_context 0", "server", f"{INFER} --max_context 0", "--max_context"),
    _m("server: --top_p 2", "server", f"{INFER} --top_p 2", "--top_p"),
    # --- model and adapter folders
    _m("train: model folder missing", "train", "--model_name_or_path {tmp}/nomodel --data {tmp}/good.json "
       "--report_to none --output_dir {tmp}/out", "nomodel"),
    _m("train: model folder without config.json", "train", "--model_name_or_path {tmp}/emptydir --data "
       "{tmp}/good.json --report_to none --output_dir {tmp}/out", "emptydir"),
    _m("train: model config.json not JSON", "train", "--model_name_or_path {broken_model} --data {tmp}/good.json "
       "--report_to none --output_dir {tmp}/out", "config.json"),
    _m("train: model weights truncated", "train", "--model_name_or_path {torn_model} --data {tmp}/good.json "
       "--report_to none --val_set_size 0 --output_dir {tmp}/out", "model.safetensors"),
    _m("generate: --lora_dir missing", "generate", "--lora_dir {tmp}/norun --instruction hi", "norun"),
    _m("generate: --lora_dir without an adapter", "generate", "--lora_dir {tmp}/emptydir --instruction hi",
       "emptydir"),
    _m("generate: adapter weights truncated", "generate", "--lora_dir {torn_run} --instruction hi",
       "adapter_model.safetensors"),
    _m("generate: adapter_config.json not JSON", "generate", "--lora_dir {broken_run} --instruction hi",
       "adapter_config.json"),
    _m("generate: alpaca_cot_run.json not JSON", "generate", "--lora_dir {broken_manifest} --instruction hi",
       "alpaca_cot_run.json"),
    _m("generate: adapter of another base", "generate",
       "--lora_dir {run} --model_name_or_path {wide_model} --instruction hi", "--lora_dir"),
    _m("merge: adapter of another base", "merge", "--lora_dir {run} --model_name_or_path {wide_model} "
       "--merged_dir {tmp}/m", "--lora_dir"),
    _m("train: --resume_from_checkpoint missing", "train",
       f"{TRAIN} --data {{tmp}}/good.json --resume_from_checkpoint {{tmp}}/nockpt", "nockpt"),
    _m("train: bare --resume_from_checkpoint, nothing to resume", "train",
       f"{TRAIN} --data {{tmp}}/good.json --resume_from_checkpoint", "--resume_from_checkpoint"),
    _m("train: resuming a checkpoint of another base", "train",
       "--model_name_or_path {wide_model} --data {tmp}/good.json --report_to none --val_set_size 0 --max_steps 2 "
       "--output_dir {tmp}/out --resume_from_checkpoint {run}/checkpoint-1", "checkpoint-1"),
    # --- output locations: never a user's files, never a torn result
    _m("train: --output_dir is a file", "train", "--model_name_or_path {model} --data {tmp}/good.json "
       "--report_to none --output_dir {tmp}/notes.txt", "notes.txt"),
    _m("train: --output_dir under a file", "train", "--model_name_or_path {model} --data {tmp}/good.json "
       "--report_to none --output_dir {tmp}/notes.txt/run", "notes.txt"),
    _m("train: --output_dir holds a finished run", "train", "--model_name_or_path {model} --data {tmp}/good.json "
       "--report_to none --output_dir {run}", "--overwrite_output_dir"),
    _m("train: --output_dir holds the user's files", "train", "--model_name_or_path {model} --data {tmp}/good.json "
       "--report_to none --output_dir {tmp}/mine", "mine"),
    _m("train: --output_dir is the base model", "train", "--model_name_or_path {model} --data {tmp}/good.json "
       "--report_to none --output_dir {model}", "base model"),
    _m("predict: --result_dir is a folder", "predict", f"{INFER} --data {{tmp}}/good.json --result_dir {{tmp}}/mine",
       "--result_dir"),
    _m("predict: --result_dir is the data file", "predict",
       f"{INFER} --data {{tmp}}/good.json --result_dir {{tmp}}/good.json", "--result_dir"),
    _m("predict: --result_dir holds other results", "predict",
       f"{INFER} --data {{tmp}}/good.json --result_dir {{tmp}}/other.jsonl", "other.jsonl"),
    _m("evaluate: --output_dir holds the user's files", "evaluate",
       f"{INFER} --task math --data {{tmp}}/good.json --output_dir {{tmp}}/mine", "mine"),
    _m("merge: --merged_dir not empty", "merge", "--lora_dir {run} --merged_dir {tmp}/mine", "mine"),
    _m("merge: --merged_dir is a file", "merge", "--lora_dir {run} --merged_dir {tmp}/notes.txt", "notes.txt"),
    _m("data convert: OUT exists", "data", "convert {tmp}/good.json {tmp}/notes.txt", "notes.txt"),
    _m("data convert: OUT is IN", "data", "convert {tmp}/good.json {tmp}/good.json", "good.json"),
    # --- ports
    _m("web: --host on the network without a key", "web", "--lora_dir {run} --host 0.0.0.0", "--api_key"),
    _m("web: --share without a key", "web", "--lora_dir {run} --share", "--api_key"),
    _m("web: --api_key not ASCII", "web", "--lora_dir {run} --api_key clé", "--api_key"),
    _m("web: --max_request_bytes 0", "web", "--lora_dir {run} --max_request_bytes 0", "--max_request_bytes"),
    _m("web: --max_queue -1", "web", "--lora_dir {run} --max_queue -1", "--max_queue"),
    _m("web: --max_new_tokens_cap 0", "web", "--lora_dir {run} --max_new_tokens_cap 0 --port {free_port}",
       "--max_new_tokens_cap"),
    _m("web: --max_prompt_tokens 0", "web", "--lora_dir {run} --max_prompt_tokens 0 --port {free_port}",
       "--max_prompt_tokens"),
    _m("web: --port out of range", "web", "--lora_dir {run} --port 70000", "--port"),
    _m("web: --port taken", "web", "--lora_dir {run} --port {taken_port}", "--port"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama, tiny_llama_wide, tiny_run) -> dict[str, str]:
    """Folders the rows name: broken models and runs, a taken port (held open for the module)."""
    root = tmp_path_factory.mktemp("mistake-world")
    broken_model = root / "broken-model"
    shutil.copytree(tiny_llama, broken_model)
    (broken_model / "config.json").write_text('{"model_type": "llama", ')
    torn_model = root / "torn-model"
    shutil.copytree(tiny_llama, torn_model)
    weights = torn_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    torn_run = root / "torn-run"
    shutil.copytree(tiny_run, torn_run)
    adapter = torn_run / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    broken_run = root / "broken-run"
    shutil.copytree(tiny_run, broken_run)
    (broken_run / "adapter_config.json").write_text("{")
    broken_manifest = root / "broken-manifest"
    shutil.copytree(tiny_run, broken_manifest)
    (broken_manifest / "alpaca_cot_run.json").write_text('{"base_model": ')
    broken_eval = root / "broken-eval"
    broken_eval.mkdir()
    (broken_eval / "eval_settings.json").write_text('{"task": ')
    return {"model": str(tiny_llama), "wide_model": str(tiny_llama_wide), "run": str(tiny_run),
            "broken_model": str(broken_model), "torn_model": str(torn_model), "torn_run": str(torn_run),
            "broken_run": str(broken_run), "broken_manifest": str(broken_manifest),
            "broken_eval": str(broken_eval)}


@pytest.fixture(scope="module")
def taken_port():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _prepare(tmp: Path) -> None:
    for name, content in FILES.items():
        if content is None:
            continue
        path = tmp / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    (tmp / "emptydir").mkdir()
    (tmp / "mine").mkdir()
    (tmp / "mine" / "README.md").write_text("my own notes")
    (tmp / "other.jsonl").write_text(json.dumps({"instruction": "Something else.", "generate": "x"}) + "\n")


def assert_one_error_line(code: int, err: str, names: tuple[str, ...]) -> str:
    """Exit 2, exactly one ``error:`` line, no traceback, and the line names what it must."""
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


@pytest.mark.parametrize("mistake", MISTAKES, ids=str)
def test_every_mistake_gets_one_line_naming_its_cause(mistake, world, taken_port, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output folder, if any, lands here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _prepare(tmp_path)
    values = {**world, "tmp": str(tmp_path), "taken_port": str(taken_port), "free_port": str(_free_port())}
    argv = [part.format(**values) for part in mistake.argv.split()]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    try:
        code = SCRIPTS[mistake.script](argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    assert_one_error_line(code, err, mistake.names)
    changed = [p for p, stamp in before.items() if not p.exists() or p.stat().st_mtime_ns != stamp]
    assert not changed, f"a mistake changed the user's files: {changed}"


def test_the_table_covers_every_script():
    assert {m.script for m in MISTAKES} == set(SCRIPTS)
    assert len({m.name for m in MISTAKES}) == len(MISTAKES)


def test_a_mistake_in_a_subprocess_prints_nothing_else(tmp_path):
    """The real entry point, as a user runs it: stdout empty, stderr the one line."""
    result = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--lora_dir", str(tmp_path / "norun"),
                             "--instruction", "hi"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1, result.stderr


def _mount_small_disk(folder: Path) -> bool:
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    return mounted


def test_a_full_disk_is_named_and_leaves_no_torn_checkpoint(tiny_llama_wide, tmp_path, capsys):
    disk = tmp_path / "disk"
    if not _mount_small_disk(disk):
        pytest.skip("mounting a small tmpfs needs root (mount -t tmpfs); a full disk cannot be made here")
    try:
        data = tmp_path / "good.json"
        data.write_text(json.dumps(GOOD_RECORDS))
        code = uniform_finetune.main(
            ["--model_name_or_path", str(tiny_llama_wide), "--data", str(data), "--output_dir", str(disk / "run"),
             "--report_to", "none", "--val_set_size", "0", "--max_steps", "3", "--save_steps", "1",
             "--lora_r", "64", "--lora_target_modules", "all"])
        line = assert_one_error_line(code, capsys.readouterr().err, (str(disk / "run"), "ran out of space"))
        assert "--resume_from_checkpoint" in line
        assert not [p for p in (disk / "run").glob("checkpoint-*")], "a torn checkpoint was left behind"
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_predictions_onto_a_full_disk_are_named(tiny_run, tmp_path, capsys):
    disk = tmp_path / "disk"
    if not _mount_small_disk(disk):
        pytest.skip("mounting a small tmpfs needs root (mount -t tmpfs); a full disk cannot be made here")
    try:
        # Fill the disk to its last byte (dd stops at "No space left on device").
        subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=4k"], capture_output=True)
        data = tmp_path / "good.json"
        data.write_text(json.dumps(GOOD_RECORDS))
        code = predict.main(["--lora_dir", str(tiny_run), "--data", str(data), "--result_dir",
                             str(disk / "results.jsonl"), "--max_new_tokens", "2"])
        assert_one_error_line(code, capsys.readouterr().err, ("out of disk space", "run the same command again"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_damaged_data_cache_is_rebuilt_not_a_traceback(tiny_llama, tmp_path, caplog):
    data, cache = tmp_path / "good.json", tmp_path / "cache"
    data.write_text(json.dumps(GOOD_RECORDS))

    def train(out: str) -> int:
        return uniform_finetune.main(["--model_name_or_path", str(tiny_llama), "--data", str(data), "--output_dir",
                                      str(tmp_path / out), "--report_to", "none", "--val_set_size", "0",
                                      "--max_steps", "1", "--data_cache_dir", str(cache)])

    assert train("first") == 0
    damaged = list(cache.rglob("*.arrow"))
    assert damaged
    for arrow in damaged:  # cut short, as a full disk or a bad copy leaves them
        arrow.write_bytes(arrow.read_bytes()[:300])
    assert train("second") == 0
    assert "is damaged" in caplog.text and "rebuilding it" in caplog.text
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()


def test_a_read_only_output_location_is_named(tmp_path):
    from alpaca_cot.files import check_writable_location

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders: the check cannot fail as root")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(UserError, match="read-only"):
            check_writable_location("--output_dir", locked / "run")
    finally:
        locked.chmod(0o700)


def test_overwrite_output_dir_replaces_a_finished_run_and_its_checkpoints(tiny_llama, tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "checkpoint-99").mkdir()  # another run's, further along: a bare resume must never find it
    data = tmp_path / "good.json"
    data.write_text(json.dumps(GOOD_RECORDS))
    assert uniform_finetune.main(["--model_name_or_path", str(tiny_llama), "--data", str(data), "--output_dir",
                                  str(run), "--report_to", "none", "--val_set_size", "0", "--max_steps", "1",
                                  "--overwrite_output_dir"]) == 0
    assert not (run / "checkpoint-99").exists()
    assert json.loads((run / "alpaca_cot_run.json").read_text())["result"]["global_step"] == 1
