"""Every source format, converted from the real public files in ../shared/data (and small written files)."""

import csv
import json

import pytest

from alpaca_cot.data import load_records, record_to_messages
from alpaca_cot.data.commands import main as data_main
from alpaca_cot.data.formats import FORMATS, detect_format, flan_cot_templates, get_format
from alpaca_cot.errors import UserError
from tests.conftest import SHARED_DATA, needs_shared_data

FLAN = SHARED_DATA / "flan_cot"
FLAN_COUNTS = {"aqua": 2728, "creak": 6915, "ecqa": 7112, "gsm8k": 7473, "strategyqa": 2061}


@needs_shared_data
@pytest.mark.parametrize("task", sorted(FLAN_COUNTS))
def test_flan_cot_tsv_converts_through_its_task_templates(task):
    records = load_records(FLAN / f"{task}_train.tsv", seed=1)
    assert len(records) == FLAN_COUNTS[task]
    templates = flan_cot_templates()[task]
    with open(FLAN / f"{task}_train.tsv", encoding="utf-8", newline="") as f:
        first = next(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    question, answer, rationale = (cell.replace("\\n", "\n") for cell in first)
    assert (records[0]["instruction"], records[0]["output"]) in {
        (i.format(question=question), o.format(chain_of_thought=rationale, answer=answer)) for i, o in templates}
    assert not any("\\n" in r["instruction"] + r["output"] for r in records)  # the TSVs' literal \n became newlines


@needs_shared_data
def test_flan_cot_matches_the_originals_formatted_strategyqa():
    """Alpaca-CoT's own strategyqa_train.json was made from the same TSV: each record is one of our templates."""
    original = json.loads((SHARED_DATA / "alpaca_cot" / "strategyqa_train.json").read_text(encoding="utf-8"))
    with open(FLAN / "strategyqa_train.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    templates = flan_cot_templates()["strategyqa"]
    assert len(original) == len(rows) == 2061
    mangled = 0
    for record, (question, answer, rationale) in zip(original, rows):
        candidates = {(i.format(question=question), o.format(chain_of_thought=rationale, answer=answer))
                      for i, o in templates}
        if (record["instruction"], record["output"]) not in candidates:
            # the original read the TSV with csv's default quoting, which ate a field's leading '"'
            assert question.startswith('"') or rationale.startswith('"')
            mangled += 1
    assert mangled == 8
    ours = load_records(FLAN / "strategyqa_train.tsv")
    used = {next(k for k, (i, _) in enumerate(templates) if r["instruction"] == i.format(question=q))
            for r, (q, _, _) in zip(ours, rows)}
    assert used == set(range(len(templates)))  # the seeded choice spreads over every template


@needs_shared_data
def test_flan_template_choice_is_seeded():
    path = FLAN / "creak_train.tsv"
    first, again, other = (load_records(path, seed=s) for s in (7, 7, 8))
    assert first == again
    assert sum(a["instruction"] != b["instruction"] for a, b in zip(first, other)) > len(first) // 2


@needs_shared_data
def test_gaokao_objective_questions(tmp_path):
    files = sorted((SHARED_DATA / "gaokao_bench" / "Objective_Questions").glob("*.json"))
    records = [r for path in files for r in load_records(path)]
    assert len(files) == 14 and len(records) == 1781
    math = load_records(SHARED_DATA / "gaokao_bench" / "Objective_Questions" / "2010-2022_Math_I_MCQs.json")
    assert math[0]["instruction"].startswith("1. （5 分) 已知集合") and math[0]["output"].endswith("答案：D")
    assert math[0]["output"].startswith("解:")  # the analysis comes first, then the answer
    minified = tmp_path / "math.json"
    minified.write_text(json.dumps(json.loads(files[9].read_text(encoding="utf-8")), ensure_ascii=False),
                        encoding="utf-8")
    assert load_records(minified) == load_records(files[9])


@needs_shared_data
def test_original_formats_from_real_files():
    sharegpt = load_records(SHARED_DATA / "fastchat" / "dummy_conversation.json")
    assert len(sharegpt) == 500 and any(len(r["conversation"]) == 6 for r in sharegpt)
    firefly = load_records(SHARED_DATA / "firefly" / "dummy_data.jsonl")
    assert len(firefly) == 33 and all(len(r["conversation"]) >= 8 for r in firefly)
    gsm8k = load_records(SHARED_DATA / "gsm8k" / "train.jsonl")
    assert len(gsm8k) == 7473 and gsm8k[0]["output"].endswith("The answer is 72.") and "<<" not in gsm8k[0]["output"]
    dolly = load_records(SHARED_DATA / "dolly" / "dolly.json")  # JSON Lines despite its name
    assert len(dolly) == 12 and dolly[0]["input"].startswith("Virgin Australia")
    belle = load_records(SHARED_DATA / "belle" / "dev1K.json")  # JSON Lines despite its name
    assert len(belle) == 1000 and belle[0]["instruction"].startswith("题目")
    alpaca = load_records(SHARED_DATA / "llama_factory" / "alpaca_zh_demo.json")
    assert len(alpaca) == 1000 and all(r["conversation"] == [] for r in alpaca)


def test_pclue_and_self_instruct_seed_tasks(tmp_path):
    # Shapes of pCLUE's pCLUE_train_*.json lines and Self-Instruct's seed_tasks.jsonl (no copies in ../shared).
    pclue = tmp_path / "pCLUE_train_1.json"
    pclue.write_text(json.dumps({"input": "哪个类别最好的描述了这篇新闻？选项：故事,文化,娱乐\n答案：",
                                 "target": "娱乐", "answer_choices": ["故事", "文化", "娱乐"], "type": "classify"},
                                ensure_ascii=False) + "\n", encoding="utf-8")
    [record] = load_records(pclue)
    assert record["instruction"].endswith("答案：") and record["output"] == "娱乐"
    seeds = tmp_path / "seed_tasks.jsonl"
    seeds.write_text(json.dumps({"id": "seed_task_0", "name": "breakfast_suggestion", "instruction": "Suggest food.",
                                 "instances": [{"input": "", "output": "Eggs."}, {"input": "vegan", "output": "Oats."}],
                                 "is_classification": False}) + "\n")
    first, second = load_records(seeds)
    assert (first["instruction"], first["input"], first["output"]) == ("Suggest food.", "", "Eggs.")
    assert (second["input"], second["output"]) == ("vegan", "Oats.")


def test_belle_turns_become_a_conversation_at_conversion(tmp_path):
    path = tmp_path / "multiturn.json"
    path.write_text(json.dumps([{"instruction": "Human: 你好\nAssistant: 你好！\nHuman: 再见\nAssistant:", "input": "",
                                 "output": "再见！"}], ensure_ascii=False), encoding="utf-8")
    [record] = load_records(path)
    assert [(t["role"], t["content"]) for t in record["conversation"]] == [
        ("user", "你好"), ("assistant", "你好！"), ("user", "再见"), ("assistant", "再见！")]
    assert [m.content for m in record_to_messages(record)[0]] == ["你好", "你好！", "再见", "再见！"]


def test_detection_prefers_the_most_specific_format_and_refuses_ties():
    assert detect_format({"question": "q", "answer": "a", "rationale": "r"}).name == "flan_cot"
    assert detect_format({"question": "q", "answer": ["A"], "analysis": ""}).name == "gaokao"
    assert detect_format({"question": "q", "answer": "a\n#### 1"}).name == "gsm8k"
    with pytest.raises(ValueError, match="matches both"):
        detect_format({"instruction": "i", "output": "o", "response": "r"})
    with pytest.raises(ValueError, match="has no 'output' key"):
        detect_format({"instruction": "i"})
    assert get_format("moss") is FORMATS["firefly"] and get_format("belle") is FORMATS["unified"]
    with pytest.raises(UserError, match=r"--from: unknown format 'shargpt' \(did you mean 'sharegpt'"):
        get_format("shargpt")


@needs_shared_data
def test_convert_command_writes_unified_records(tmp_path, capsys):
    out = tmp_path / "aqua.jsonl"
    assert data_main(["convert", str(FLAN / "aqua_train.tsv"), str(out)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2728 and "2728 records" in capsys.readouterr().out
    assert set(json.loads(lines[0])) == {"instruction", "input", "output", "conversation"}
    as_array = tmp_path / "gaokao.json"
    assert data_main(["convert", "--from", "gaokao_bench",
                      str(SHARED_DATA / "gaokao_bench" / "Objective_Questions" / "2010-2022_Physics_MCQs.json"),
                      str(as_array)]) == 0
    assert len(json.loads(as_array.read_text(encoding="utf-8"))) == 64
    assert load_records(as_array) == load_records(as_array)  # the output reads back as unified records


def test_convert_stops_at_a_bad_record_unless_told_to_skip(tmp_path, capsys):
    source = tmp_path / "mixed.jsonl"
    source.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n{"prompt": "x"}\n')
    out = tmp_path / "out.jsonl"
    with pytest.raises(UserError, match=r"mixed.jsonl:2 malformed JSON Lines record.*--skip_bad_records"):
        data_main(["convert", str(source), str(out)])
    assert not out.exists()  # nothing half-written
    assert data_main(["convert", "--skip_bad_records", str(source), str(out)]) == 0
    assert "1 records from 3 source records" in capsys.readouterr().out and len(out.read_text().splitlines()) == 1


@pytest.mark.slow
@needs_shared_data
def test_every_real_format_trains_in_one_mixture(tiny_llama, tmp_path):
    from tests.conftest import train_tiny

    sources = [f"{FLAN / 'aqua_train.tsv'}:8", f"{SHARED_DATA / 'gsm8k' / 'train.jsonl'}:8",
               f"{SHARED_DATA / 'gaokao_bench' / 'Objective_Questions' / '*Physics*.json'}:8",
               f"{SHARED_DATA / 'dolly' / 'dolly.json'}:4", f"{SHARED_DATA / 'firefly' / 'dummy_data.jsonl'}:4",
               f"{SHARED_DATA / 'fastchat' / 'dummy_conversation.json'}:8", f"{SHARED_DATA / 'belle' / 'dev1K.json'}:8"]
    out = tmp_path / "run"
    assert train_tiny(tiny_llama, FLAN / "aqua_train.tsv", out, "--data", *sources, "--max_steps", "2",
                      "--cutoff_len", "256", "--data_cache_dir", str(tmp_path / "cache")) == 0
    manifest = json.loads((out / "alpaca_cot_run.json").read_text())
    assert [d["records_used"] for d in manifest["data"]] == [8, 8, 8, 4, 4, 8, 8]
