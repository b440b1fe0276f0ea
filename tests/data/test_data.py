"""Reading files, record checks, mixtures, dedup, caching, streaming and every bad-input message."""

import json
import os

import pytest

from alpaca_cot.data import (
    IGNORE_INDEX,
    DataOptions,
    effective_val_size,
    load_records,
    prepare_data,
    record_to_messages,
    tokenize_record,
)
from alpaca_cot.data.catalog import load_catalog, resolve_data
from alpaca_cot.errors import UserError
from alpaca_cot.templates import get_template
from tests.conftest import SAMPLE_RECORDS, SHARED_DATA, needs_shared_data, train_tiny

ALPACA = get_template("alpaca")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _numbered(n, prefix="task"):
    return [{"instruction": f"{prefix} {i}", "input": "", "output": f"answer {i}"} for i in range(n)]


def test_json_array_and_json_lines_give_the_same_records(tmp_path, sample_file):
    lines = _write_jsonl(tmp_path / "sample.jsonl", json.loads(sample_file.read_text()))
    assert load_records(sample_file) == load_records(lines)
    assert all(set(r) == {"instruction", "input", "output", "conversation"} for r in load_records(lines))


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(UserError, match=r"bad.json:3: malformed JSON"):
        load_records(path)


def test_malformed_json_lines_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(UserError, match=r"1 of 2 records are invalid: bad.jsonl:2 malformed JSON Lines"):
        load_records(path)


def test_records_without_required_keys_are_named(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}, {"prompt": "x"}]))
    with pytest.raises(UserError, match=r"2 of 3 records are invalid: keys.json:1: record 1 has no 'output' key.*"
                                        r"keys.json:1: record 2 has no 'instruction' key \(keys: prompt\)"):
        load_records(path)
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    assert load_records(path, required=("instruction",))[1]["output"] == ""  # prediction needs no output


def test_empty_data_and_wrong_shape(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(UserError, match="no records"):
        load_records(empty)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(UserError, match="no records"):
        load_records(blank)
    obj = tmp_path / "obj.json"
    obj.write_text('{\n "keywords": [],\n "examples": [{"instruction": "a", "output": "b"}]\n}')
    with pytest.raises(UserError, match="expected a JSON array of records or JSON Lines, found a JSON dict"):
        load_records(obj)
    one_line = tmp_path / "one.jsonl"
    one_line.write_text('{"instruction": "a", "output": "b"}')
    assert load_records(one_line) == [{"instruction": "a", "input": "", "output": "b", "conversation": []}]
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"instruction": "caf\u00e9", "output": "b"}]'.encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_records(latin)


def test_demo_data_resolves_with_its_heldout_split():
    [source] = resolve_data(["demo"])
    assert source.path.name == "demo_train.json" and source.heldout.name == "demo_heldout.json"
    train, heldout = load_records(source.path), load_records(source.heldout)
    assert len(train) == load_catalog()["demo"].records
    assert not {r["input"] for r in train} & {r["input"] for r in heldout}


def test_val_set_size_is_capped_and_zero_allowed():
    assert effective_val_size(2000, 100) == 10
    assert effective_val_size(0, 100) == 0
    assert effective_val_size(5, 3) == 0
    assert effective_val_size(2000, 52000) == 2000


def test_single_turn_mentioning_a_human_stays_single_turn():
    messages, input_text = record_to_messages({"instruction": "Describe a Human: what is it?", "input": "x",
                                               "output": "y"})
    assert len(messages) == 2 and input_text == "x"


def test_sharegpt_conversation_learns_every_assistant_turn(tiny_tokenizer, tmp_path):
    path = tmp_path / "chat.json"
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
             {"from": "human", "value": "bye"}, {"from": "gpt", "value": "ciao"}]
    path.write_text(json.dumps([{"conversations": turns}]))
    [record] = load_records(path)
    example = tokenize_record(record, tiny_tokenizer, ALPACA, cutoff_len=1024, prefix_ids=[])
    learned = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(learned) == "hello</s>ciao</s>"


def test_malformed_source_records_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "robot", "value": "x"}]}) + "\n"
                    + json.dumps({"question": "q", "answer": "no final line"}))
    with pytest.raises(UserError, match=r"bad.jsonl:1 unknown speaker 'robot'.*bad.jsonl:2 a GSM8K 'answer' ends with"):
        load_records(path)


def test_batched_tokenization_equals_record_by_record(tiny_tokenizer, tmp_path):
    from alpaca_cot.data import tokenize_batch

    chat = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                              {"from": "human", "value": "bye"}, {"from": "gpt", "value": "ciao"}]}
    records = load_records(_write_jsonl(tmp_path / "mixed.jsonl", SAMPLE_RECORDS + [chat]))
    batch = {key: [r[key] for r in records] for key in records[0]}
    for cutoff in (1024, 20):
        batched = tokenize_batch(batch, tiny_tokenizer, ALPACA, cutoff, [1])
        one_by_one = [tokenize_record(r, tiny_tokenizer, ALPACA, cutoff, [1]) for r in records]
        assert batched == {key: [e[key] for e in one_by_one] for key in ("input_ids", "attention_mask", "labels")}


def _prepare(tokenizer, tmp_path, specs, val=0, seed=0, **options):
    return prepare_data(resolve_data(specs), tokenizer, ALPACA, 256, val, seed,
                        DataOptions(cache_dir=tmp_path / "cache", **options))


def _instructions(tokenizer, dataset):
    prompts = [tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX])
               for ids, labels in zip(dataset["input_ids"], dataset["labels"])]
    return sorted(p.split("### Instruction:\n")[1].split("\n")[0] for p in prompts)


def test_mixture_amounts_are_sampled_with_the_seed(tiny_tokenizer, tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", _numbered(40, "alpha"))
    b = _write_jsonl(tmp_path / "b.jsonl", _numbered(30, "beta"))
    first = _prepare(tiny_tokenizer, tmp_path, [f"{a}:0.25", f"{b}:12"], seed=1)
    again = _prepare(tiny_tokenizer, tmp_path, [f"{a}:0.25", f"{b}:12"], seed=1)
    other = _prepare(tiny_tokenizer, tmp_path, [f"{a}:0.25", f"{b}:12"], seed=2)
    chosen = _instructions(tiny_tokenizer, first.train)
    assert len(chosen) == 22 and sum(c.startswith("alpha") for c in chosen) == 10
    assert chosen == _instructions(tiny_tokenizer, again.train) != _instructions(tiny_tokenizer, other.train)
    source_a, source_b = first.manifest
    assert (source_a["records_available"], source_a["records_used"], source_a["amount"]) == (40, 10, 0.25)
    assert (source_b["records_available"], source_b["records_used"]) == (30, 12)
    assert len(source_a["sha256"]) == 64 and source_a["files"][0]["path"] == str(a)
    with pytest.raises(UserError, match=r"b.jsonl:31: the source has only 30 records; ask for at most 30"):
        _prepare(tiny_tokenizer, tmp_path, [f"{b}:31"])


def test_dedup_and_bad_records(tiny_tokenizer, tmp_path):
    rows = _numbered(10) + _numbered(5)  # 5 exact duplicates
    path = _write_jsonl(tmp_path / "dups.jsonl", rows)
    other = _write_jsonl(tmp_path / "other.jsonl", _numbered(3) + _numbered(2, "new"))  # 3 seen in the first file
    deduped = _prepare(tiny_tokenizer, tmp_path, [str(path), str(other)], dedup=True)
    assert len(deduped.train) == 12 and deduped.duplicates == 8
    assert [m["duplicates_removed"] for m in deduped.manifest] == [5, 3]
    assert len(_prepare(tiny_tokenizer, tmp_path, [str(path)]).train) == 15  # kept without --dedup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text() + '{"instruction": \n{"prompt": "p"}\n')
    with pytest.raises(UserError, match=r"--data .*bad.jsonl: 2 of 17 records are invalid: bad.jsonl:16 malformed "
                                        r"JSON Lines.*bad.jsonl:17 has no 'instruction' key.*--skip_bad_records"):
        _prepare(tiny_tokenizer, tmp_path, [str(bad)])
    skipped = _prepare(tiny_tokenizer, tmp_path, [str(bad)], skip_bad_records=True)
    bad_first = tmp_path / "bad_first.jsonl"
    bad_first.write_text('{"instruction": "a" "output": "b"}\n' + path.read_text())
    assert _prepare(tiny_tokenizer, tmp_path, [str(bad_first)], skip_bad_records=True).bad_records == 1
    assert len(skipped.train) == 15 and skipped.bad_records == 2 and skipped.manifest[0]["bad_records_skipped"] == 2
    nothing = _write_jsonl(tmp_path / "nothing.jsonl", [{"prompt": "p"}])
    with pytest.raises(UserError, match="no usable records"):
        _prepare(tiny_tokenizer, tmp_path, [str(nothing)], skip_bad_records=True)


def test_second_prepare_loads_the_tokenized_cache(tiny_tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", SAMPLE_RECORDS * 5)
    first = _prepare(tiny_tokenizer, tmp_path, [str(path)], val=3)
    files = [f["filename"] for f in first.train.cache_files]
    stamps = {name: os.stat(name).st_mtime_ns for name in files}
    second = _prepare(tiny_tokenizer, tmp_path, [str(path)], val=3)
    assert not first.cache_hit and second.cache_hit
    assert [f["filename"] for f in second.train.cache_files] == files
    assert {name: os.stat(name).st_mtime_ns for name in files} == stamps  # not re-tokenized
    assert second.train["input_ids"] == first.train["input_ids"] and len(second.validation) == 3
    third = prepare_data(resolve_data([str(path)]), tiny_tokenizer, ALPACA, 64, 3, 0,
                         DataOptions(cache_dir=tmp_path / "cache"))
    assert not third.cache_hit  # another --cutoff_len is another tokenized set
    path.write_text(path.read_text().replace("Blue.", "Red."))
    assert not _prepare(tiny_tokenizer, tmp_path, [str(path)], val=3).cache_hit  # changed content, new hash


def test_parallel_tokenization_gives_the_same_examples(tiny_tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", _numbered(40))
    serial = _prepare(tiny_tokenizer, tmp_path, [str(path)])
    parallel = _prepare(tiny_tokenizer, tmp_path / "p", [str(path)], num_proc=2)
    assert parallel.train["input_ids"] == serial.train["input_ids"]


def test_streaming_reads_lazily_with_the_same_columns(tiny_tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", _numbered(30) + _numbered(5))
    data = _prepare(tiny_tokenizer, tmp_path, [f"{path}:20"], val=4, streaming=True, dedup=True)
    assert data.streaming and data.train_size is None and len(data.validation) == 4
    examples = list(data.train)
    assert len(examples) == 16 and set(examples[0]) == {"input_ids", "attention_mask", "labels"}
    small = _prepare(tiny_tokenizer, tmp_path, [str(path)], val=2000, streaming=True)
    assert len(small.validation) == 3 and len(list(small.train)) == 32  # capped at a tenth, as without streaming
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(UserError, match=r"bad.jsonl:2 malformed JSON Lines.*--skip_bad_records"):
        list(_prepare(tiny_tokenizer, tmp_path, [str(bad)], streaming=True).train)


def test_streaming_needs_max_steps():
    from alpaca_cot.checks import check_data_flags
    from alpaca_cot.cli import build_finetune_parser

    args = build_finetune_parser().parse_args(["--data", "demo", "--streaming"])
    with pytest.raises(UserError, match="--streaming needs --max_steps N"):
        check_data_flags(args)
    args = build_finetune_parser().parse_args(["--data", "demo", "--data_format", "sharegtp"])
    with pytest.raises(UserError, match="--data_format: unknown format 'sharegtp'"):
        check_data_flags(args)


def test_training_on_a_mixture_records_what_was_used(tiny_llama, tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", SAMPLE_RECORDS * 2)
    b = _write_jsonl(tmp_path / "b.jsonl", _numbered(20))
    out = tmp_path / "run"
    assert train_tiny(tiny_llama, a, out, "--data", f"{a}:0.5", f"{b}:6", "--dedup", "--max_steps", "1",
                      "--data_cache_dir", str(tmp_path / "cache")) == 0
    manifest = json.loads((out / "alpaca_cot_run.json").read_text())
    used = [(d["name"], d["records_available"], d["duplicates_removed"], d["records_used"]) for d in manifest["data"]]
    assert used == [(str(a), 20, 10, 5), (str(b), 20, 0, 6)]
    assert manifest["settings"]["dedup"] is True and manifest["result"]["train_examples"] == 11


def test_training_streamed(tiny_llama, tmp_path):
    data = _write_jsonl(tmp_path / "a.jsonl", SAMPLE_RECORDS * 3)
    out = tmp_path / "run"
    assert train_tiny(tiny_llama, data, out, "--streaming", "--max_steps", "2") == 0
    manifest = json.loads((out / "alpaca_cot_run.json").read_text())
    assert manifest["result"]["global_step"] == 2 and manifest["data"][0]["streaming"] is True
    assert train_tiny(tiny_llama, data, tmp_path / "run2", "--streaming") == 2  # no --max_steps: one error line


@needs_shared_data
def test_training_on_real_sharegpt_conversations(tiny_llama, tmp_path):
    data = SHARED_DATA / "fastchat" / "dummy_conversation.json"
    assert train_tiny(tiny_llama, data, tmp_path / "run", "--max_steps", "2", "--cutoff_len", "256",
                      "--data_cache_dir", str(tmp_path / "cache")) == 0


def test_validate_reports_problems_duplicates_and_token_lengths(tiny_llama, tmp_path, capsys):
    from alpaca_cot.data.commands import main as data_main

    rows = SAMPLE_RECORDS + SAMPLE_RECORDS[:2] + [{"instruction": "x", "input": "", "output": "y" * 2000}]
    path = _write_jsonl(tmp_path / "v.jsonl", rows)
    path.write_text(path.read_text() + '{"prompt": "p"}\n')
    assert data_main(["validate", str(path), "--model", str(tiny_llama), "--cutoff_len", "200"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["source_records"], report["records"], report["malformed"]) == (14, 13, 1)
    assert report["first_problems"] == [f"{path}:14 has no 'instruction' key (keys: prompt)"]
    assert report["exact_duplicates"] == 2 and report["empty_fields"]["input"] == 3
    tokens = report["tokens"]
    assert tokens["template"] == "alpaca" and tokens["over_cutoff_len"] == 1 and tokens["max"] > 200
    assert tokens["p50"] <= tokens["p90"] <= tokens["p99"] <= tokens["max"]
    good = _write_jsonl(tmp_path / "good.jsonl", SAMPLE_RECORDS)
    assert data_main(["validate", str(good)]) == 0 and "tokens" not in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("content, named", [
    ('[{"instruction": "a", "input": "", "output": "b"},\n{"instruction": "c", "inp', ":2: malformed JSON"),
    ("", ": holds no records"),
    ("[]", ": holds no records"),
])
def test_a_broken_training_file_is_one_line_naming_it(content, named, tiny_llama, tmp_path, capsys):
    """datasets wraps what its generator raises (DatasetGenerationError) and refuses an empty one: still one line."""
    import uniform_finetune

    data = tmp_path / "broken.json"
    data.write_text(content, encoding="utf-8")
    code = uniform_finetune.main(["--model_name_or_path", str(tiny_llama), "--data", str(data), "--output_dir",
                                  str(tmp_path / "out"), "--report_to", "none", "--max_steps", "1",
                                  "--heldout_eval", "0"])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert f"{data}{named}" in errors[0]
