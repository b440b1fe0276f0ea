"""evaluate.py: each task end to end on tiny models and small files written here; the judge over real HTTP."""

from __future__ import annotations

import csv
import json
import re
import socket
import subprocess
import sys
import time

import pytest

import evaluate
from alpaca_cot.checks import check_evaluate_flags
from alpaca_cot.errors import UserError
from alpaca_cot.eval.judge import build_judge_prompt, parse_score
from alpaca_cot.eval.runner import summarize
from alpaca_cot.eval.tasks import TASKS, parse_choice, with_cue
from tests.conftest import ROOT, SHARED_DATA, needs_embedded_model, needs_shared_data

MMCU = [
    {"类别": "医学", "题目": "人体最大的器官是", "选项": ["A. 心脏", "B. 皮肤", "C. 肝脏", "D. 肺"], "答案": "B"},
    {"类别": "医学", "题目": "正常成人的心率约为每分钟", "选项": ["30次", "75次", "150次", "200次"], "答案": ["B"]},
    {"类别": "法律", "题目": "宪法是国家的", "选项": {"A": "根本法", "B": "普通法", "C": "地方法规"}, "答案": "A"},
]
GAOKAO = {"keywords": "2010-2022_Math_I_MCQs", "example": [
    {"year": "2010", "category": "（新课标）", "question": "1. 1+1= ( )\nA. 1\nB. 2\nC. 3\nD. 4\n", "answer": ["B"],
     "analysis": "", "index": 0, "score": 5},
    {"year": "2011", "category": "（新课标）", "question": "阅读下文，回答问题 ……", "answer": ["A", "C"],
     "analysis": "", "index": 1, "score": 5},  # several questions on one passage: not a single choice
]}
GSM8K = [
    {"question": "Ann has 3 apples and buys 4 more. How many apples does she have?",
     "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A box holds 12 pens. How many pens are in 2 boxes?", "answer": "12 * 2 = <<12*2=24>>24\n#### 24"},
    {"question": "Tom had 1,200 coins and spent 200. How many are left?", "answer": "1200 - 200 = 1000\n#### 1,000"},
]
BELLE = [
    {"question": "写一句关于春天的诗。", "std_answer": "春风又绿江南岸。", "class": "generation"},
    {"question": "3加5等于几？", "std_answer": "8", "class": "math"},
    {"question": "中国的首都是哪里？", "std_answer": "北京", "class": "closed qa"},
]


def _write_json(path, content):
    path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return path


def _lines(folder):
    return [json.loads(line) for line in (folder / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def test_score_parsing_survives_rambling_judges():
    assert parse_score("得分: 0.8分。模型回答基本正确，但不够简洁。") == 0.8
    assert parse_score("Let me think. The answer mentions 3 points, 2 of them right.\n**Score**: 1") == 1.0
    assert parse_score("I would rate this 4/5 overall because step 2 has 1 error.") == 0.8
    assert parse_score("This is fine. I'd give it 0.5 out of 1, considering 10 criteria.") == 0.5
    assert parse_score("模型回答与标准答案一致，给1分。") == 1.0
    assert parse_score("得分: 8") is None  # no scale: a score above 1 cannot be trusted
    assert parse_score("The answer is about Beijing, a city of 21 million people.") is None


def test_choice_letters_parsed_from_generated_answers():
    assert parse_choice("【解析】因为……\n【答案】C <eoa>", "ABCD") == "C"
    assert parse_choice("Option A looks tempting, but the answer is D.", "ABCD") == "D"
    assert parse_choice("答案是AB", "ABCD") == "AB"
    assert parse_choice("B", "ABCD") == "B"
    assert parse_choice("no idea", "ABCD") is None


def test_judge_prompt_leaves_out_the_standard_answer_for_open_ended_categories():
    for category in ("generation", "brainstorming", "rewrite"):
        assert "标准答案:" not in build_judge_prompt(category, "q", "REFERENCE", "a")
    assert "标准答案: REFERENCE" in build_judge_prompt("math", "q", "REFERENCE", "a")
    assert "标准答案: REFERENCE" in build_judge_prompt("Closed QA", "q", "REFERENCE", "a")
    assert with_cue("How many?", "先思考，再决定") == "How many?\n先思考，再决定"


def test_choice_likelihood_equals_hand_computed_log_probabilities(tiny_llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from alpaca_cot.eval.tasks import CHOICE_PROMPT, continuation_logprobs
    from alpaca_cot.infer.generation import prompt_ids
    from alpaca_cot.infer.loading import load_for_inference
    from alpaca_cot.templates import Message

    data = _write_json(tmp_path / "mmcu.json", MMCU)
    out = tmp_path / "choice"
    assert evaluate.main(["--model_name_or_path", str(tiny_llama), "--task", "choice", "--data", str(data),
                          "--output_dir", str(out)]) == 0
    results = _lines(out)
    assert [r["category"] for r in results] == ["医学", "医学", "法律"]
    assert [r["reference"] for r in results] == ["B", "B", "A"]
    assert set(results[2]["logprobs"]) == {"A", "B", "C"}  # the options this question has

    # By hand: one unpadded forward pass per option, log-softmax of the letter after the prompt.
    loaded = load_for_inference(model_name_or_path=str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    for record, result in zip(MMCU, results):
        assert result["question"].startswith(record["题目"])
        prompt = prompt_ids(loaded, [Message("user", f"{CHOICE_PROMPT['zh']}\n\n{result['question']}")])
        for letter, logprob in result["logprobs"].items():
            letter_ids = loaded.tokenizer(letter, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([prompt + letter_ids])).logits[0]
            expected = sum(torch.log_softmax(logits[len(prompt) - 1 + i], -1)[t].item()
                           for i, t in enumerate(letter_ids))
            assert logprob == pytest.approx(expected, abs=1e-3)
        # Letters of several tokens go through the batched path; it agrees on single tokens too.
        letters = list(result["logprobs"])
        batched = continuation_logprobs(loaded, prompt, [loaded.tokenizer(x, add_special_tokens=False)["input_ids"]
                                                         for x in letters])
        assert batched == pytest.approx([result["logprobs"][x] for x in letters], abs=1e-3)
        assert result["prediction"] == max(result["logprobs"], key=result["logprobs"].get)
        assert result["correct"] == (result["prediction"] == result["reference"])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 3 and set(summary["categories"]) == {"医学", "法律"}
    assert summary["accuracy"] == sum(r["correct"] for r in results) / 3
    assert (out / "by_category.png").read_bytes()[:4] == b"\x89PNG"
    assert "| **all** | 3 |" in (out / "summary.md").read_text()


def test_choice_reads_gaokao_and_csv_and_generates(tiny_llama, tmp_path, capsys):
    gaokao = _write_json(tmp_path / "gaokao.json", GAOKAO)
    out = tmp_path / "gaokao"
    assert evaluate.main(["--model_name_or_path", str(tiny_llama), "--task", "choice", "--data", str(gaokao),
                          "--output_dir", str(out), "--generate", "--max_new_tokens", "4"]) == 0
    [result] = _lines(out)  # the multi-question passage is left out
    assert result["category"] == "2010-2022_Math_I_MCQs" and result["reference"] == "B" and result["year"] == "2010"
    assert "response" in result and result["correct"] == (result["prediction"] == "B")

    table = tmp_path / "plain.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "A", "B", "C", "D", "answer", "subject"])
        writer.writerow(["2 + 2 =", "3", "4", "5", "6", "B", "arithmetic"])
        writer.writerow(["Capital of France?", "Paris", "Rome", "Oslo", "Bern", "A", "geography"])
    out = tmp_path / "csv"
    assert evaluate.main(["--model_name_or_path", str(tiny_llama), "--task", "choice", "--data", str(table),
                          "--output_dir", str(out)]) == 0
    assert [r["category"] for r in _lines(out)] == ["arithmetic", "geography"]
    assert "accuracy" in capsys.readouterr().out

    bad = _write_json(tmp_path / "bad.json", [{**MMCU[0], "答案": "E"}])
    assert evaluate.main(["--model_name_or_path", str(tiny_llama), "--task", "choice", "--data", str(bad),
                          "--output_dir", str(tmp_path / "bad")]) == 2
    assert "record 0" in capsys.readouterr().err


def test_math_resumes_after_interruption_and_refuses_other_settings(tiny_run, tmp_path, capsys):
    data = _write_json(tmp_path / "gsm8k.json", GSM8K)
    out = tmp_path / "math"
    common = ["--lora_dir", str(tiny_run), "--task", "math", "--data", str(data), "--output_dir", str(out),
              "--max_new_tokens", "6", "--eval_batch_size", "2"]
    assert evaluate.main([*common, "--limit", "2"]) == 0
    first = _lines(out)
    assert [r["reference"] for r in first] == ["7", "24"]
    with open(out / "results.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": 2, "question": "Tom ha')  # a crash mid-write
    capsys.readouterr()
    assert evaluate.main(common) == 0
    assert "resumed after 2" in capsys.readouterr().out
    results = _lines(out)
    assert results[:2] == first and len(results) == 3 and results[2]["reference"] == "1000"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 3 and summary["categories"]["en"]["records"] == 3
    assert summary["settings"]["cot_cue"] == ""

    assert evaluate.main([*common, "--cot_cue", "Let's think step by step."]) == 2
    assert "other settings" in capsys.readouterr().err and len(_lines(out)) == 3
    assert evaluate.main(["--lora_dir", str(tiny_run), "--task", "judge", "--data", str(data),
                          "--output_dir", str(tmp_path / "j")]) == 2
    assert "--judge_url" in capsys.readouterr().err


@needs_shared_data
def test_choice_reads_the_real_gaokao_folder():
    from alpaca_cot.eval.tasks import load_choice_items

    items = load_choice_items(SHARED_DATA / "gaokao_bench" / "Objective_Questions")
    assert len(items) > 1400 and all(item.reference and set(item.reference) <= set(item.options) for item in items)
    math = [item for item in items if item.category == "2010-2022_Math_I_MCQs"]
    assert len(math) == 214 and math[0].options == "ABCD" and math[0].reference == "D"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@needs_embedded_model
def test_judge_scores_through_a_real_openai_compatible_server(tiny_run, tmp_path, capsys):
    pytest.importorskip("gradio")
    port = _free_port()
    log = open(tmp_path / "judge.log", "w+")
    server = subprocess.Popen([sys.executable, "web.py", "--model_name_or_path", "smollm2-135m-instruct",
                               "--port", str(port), "--max_new_tokens_cap", "16"],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while "OpenAI-compatible API" not in open(tmp_path / "judge.log").read():
            assert server.poll() is None and time.time() < deadline, open(tmp_path / "judge.log").read()[-3000:]
            time.sleep(0.5)
        data = _write_json(tmp_path / "belle.json", BELLE)
        cache = tmp_path / "judge_cache.jsonl"
        common = ["--lora_dir", str(tiny_run), "--task", "judge", "--data", str(data), "--max_new_tokens", "8",
                  "--judge_model", "smollm2", "--judge_cache", str(cache), "--judge_max_tokens", "16"]
        assert evaluate.main([*common, "--output_dir", str(tmp_path / "a"),
                              "--judge_url", f"http://127.0.0.1:{port}/v1"]) == 0
        assert "judge: 3 requests, 0 answered from the cache" in capsys.readouterr().out
    finally:
        server.terminate()
        server.wait(timeout=30)
    results = _lines(tmp_path / "a")
    assert [r["category"] for r in results] == ["generation", "math", "closed qa"]
    assert all(r["judge_reply"] for r in results)  # the served model really answered each request
    assert all(r["score"] == parse_score(r["judge_reply"]) for r in results)
    assert len(cache.read_text().splitlines()) == 3

    # The server is gone: a rerun elsewhere is answered from the cache alone, with the same scores.
    assert evaluate.main([*common, "--output_dir", str(tmp_path / "b"), "--judge_retries", "0",
                          "--judge_url", f"http://127.0.0.1:{port}/v1"]) == 0
    assert "judge: 0 requests, 3 answered from the cache" in capsys.readouterr().out
    assert [r["score"] for r in _lines(tmp_path / "b")] == [r["score"] for r in results]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert set(summary["categories"]) == {"generation", "math", "closed qa"} and summary["metric"] == "score"


def test_judge_cache_cuts_a_torn_last_line_so_the_next_reply_is_kept(tmp_path):
    from alpaca_cot.eval.judge import JudgeClient

    cache = tmp_path / "cache.jsonl"
    cache.write_text(json.dumps({"key": "k1", "reply": "Score: 1"}) + "\n" + '{"key": "k2", "rep')
    client = JudgeClient("http://127.0.0.1:9", "judge", cache)
    assert client.cache == {"k1": "Score: 1"}
    with open(cache, "a") as f:  # what complete() does after paying for a reply
        f.write(json.dumps({"key": "k3", "reply": "Score: 0"}) + "\n")
    assert JudgeClient("http://127.0.0.1:9", "judge", cache).cache == {"k1": "Score: 1", "k3": "Score: 0"}


# ---------------------------------------------------------------- the task table: every row's flags as it says

def _task_args(task, *extra):
    return evaluate.build_parser().parse_args(["--task", task.name, "--data", "x.json", "--output_dir", "e", *extra])


@pytest.mark.parametrize("task", list(TASKS.values()), ids=list(TASKS))
def test_each_task_takes_or_refuses_the_task_only_flags_as_its_row_says(task):
    judge = ["--judge_url", "http://127.0.0.1:9/v1"] if task.needs_judge else []
    check_evaluate_flags(_task_args(task, *judge), TASKS)  # the row's own flags alone are fine
    for flags, applies in ((["--generate"], not task.generates), (["--cot_cue", "Think first."], task.takes_cue)):
        args = _task_args(task, *judge, *flags)
        if applies:
            check_evaluate_flags(args, TASKS)
        else:
            with pytest.raises(UserError, match=f"^{flags[0]} applies to --task "):
                check_evaluate_flags(args, TASKS)
    if task.needs_judge:
        with pytest.raises(UserError, match=f"^--task {task.name} needs --judge_url"):
            check_evaluate_flags(_task_args(task), TASKS)


def test_task_flag_messages_name_the_rows_that_take_each_flag():
    math = TASKS["math"]
    with pytest.raises(UserError) as refused:
        check_evaluate_flags(_task_args(math, "--generate", "--limit", "0"), TASKS)
    assert str(refused.value) == ("--limit must be at least 1 (got 0); "
                                  "--generate applies to --task choice (math and judge always generate)")
    with pytest.raises(UserError, match=r"^--cot_cue applies to --task math$"):
        check_evaluate_flags(_task_args(TASKS["choice"], "--cot_cue", "x"), TASKS)
    with pytest.raises(UserError, match=r"^--task judge needs --judge_url \(an OpenAI-compatible endpoint\)$"):
        check_evaluate_flags(_task_args(TASKS["judge"]), TASKS)


@pytest.mark.parametrize("task", list(TASKS.values()), ids=list(TASKS))
def test_each_task_summarises_its_result_key_under_its_metric_name(task):
    results = [{"category": "a", task.result_key: 1}, {"category": "a", task.result_key: 0},
               {"category": "b", task.result_key: None}]
    summary = summarize(task, results)
    assert summary["metric"] == task.metric and summary[task.metric] == 0.5 and summary["records"] == 3
    assert summary["categories"]["a"][task.metric] == 0.5 and summary["categories"]["b"][task.metric] is None
    if task.unscored:
        assert summary[task.unscored] == 1 and summary["categories"]["b"][task.unscored] == 1
    else:
        assert set(summary) == {"task", "metric", "records", task.metric, "categories"}


@pytest.mark.parametrize("task", list(TASKS.values()), ids=list(TASKS))
def test_the_help_names_the_tasks_each_flag_applies_to(task, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapped inside a description
    with pytest.raises(SystemExit):
        evaluate.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    named = rf"\b{task.name}\b[\w/]*"  # help texts join the names of the rows a flag applies to: "a/b: ..."
    assert f"{task.name}: {task.description}" in text  # --task's help lists every row
    assert bool(re.search(f"{named}: generate an answer", text)) is not task.generates
    assert bool(re.search(f"{named}: appended to each instruction", text)) is task.takes_cue
    assert bool(re.search(rf"judge \(task {named}\)", text)) is task.needs_judge
