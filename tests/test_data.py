"""Data loading, record checks, dataset names and every bad-input message."""

import json

import pytest

from alpaca_cot.catalog import load_catalog, resolve_data
from alpaca_cot.data import effective_val_size, load_records, record_to_messages
from alpaca_cot.errors import UserError
from tests.conftest import SHARED_DATA, needs_shared_data


def test_json_array_and_json_lines_give_the_same_records(tmp_path, sample_file):
    lines = tmp_path / "sample.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in json.loads(sample_file.read_text())) + "\n")
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
    with pytest.raises(UserError, match=r"bad.jsonl:2: malformed JSON Lines"):
        load_records(path)


def test_records_without_required_keys_are_named(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}, {"prompt": "x"}]))
    with pytest.raises(UserError, match=r"2 of 3 records are invalid: record 1 has no 'output' key.*record 2 has "
                                        r"no 'instruction' key"):
        load_records(path)


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
    obj.write_text('{\n "keywords": [],\n "example": [{"instruction": "a", "output": "b"}]\n}')
    with pytest.raises(UserError, match="expected a JSON array of records, found a JSON dict"):
        load_records(obj)
    one_line = tmp_path / "one.jsonl"
    one_line.write_text('{"instruction": "a", "output": "b"}')
    assert load_records(one_line) == [{"instruction": "a", "input": "", "output": "b", "conversation": []}]


def test_missing_file():
    with pytest.raises(UserError, match="does not exist"):
        resolve_data(["no/such/file.json"])


def test_registered_name_not_on_disk_says_where_and_how():
    with pytest.raises(UserError) as info:
        resolve_data(["alpaca-belle-cot"])
    message = str(info.value)
    assert "alcapa_plus_belle_plus_cot.json is not on disk" in message
    assert "hf download QingyiSi/Alpaca-CoT --repo-type dataset" in message
    assert "\n" not in message


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UserError, match=r"did you mean 'alpaca'"):
        resolve_data(["alpacca"])


def test_demo_data_resolves_with_its_heldout_split():
    [source] = resolve_data(["demo"])
    assert source.path.name == "demo_train.json" and source.heldout.name == "demo_heldout.json"
    train, heldout = load_records(source.path), load_records(source.heldout)
    assert len(train) == load_catalog()["demo"]["records"]
    assert not {r["input"] for r in train} & {r["input"] for r in heldout}


def test_original_names_are_in_the_catalog():
    for name in ["alpaca", "belle", "alpaca-belle", "cot", "alpaca-cot", "alpaca-belle-cot", "belle1.5m", "finance",
                 "multiturn_chat"]:
        assert name in load_catalog()


def test_val_set_size_is_capped_and_zero_allowed():
    assert effective_val_size(2000, 100) == 10
    assert effective_val_size(0, 100) == 0
    assert effective_val_size(5, 3) == 0
    assert effective_val_size(2000, 52000) == 2000


def test_multi_turn_record_becomes_a_conversation():
    messages, _ = record_to_messages(
        {"instruction": "Human: 你好\nAssistant: 你好！\nHuman: 再见\nAssistant:", "input": "", "output": "再见！"})
    assert [(m.role, m.content) for m in messages] == [
        ("user", "你好"), ("assistant", "你好！"), ("user", "再见"), ("assistant", "再见！")]


def test_single_turn_mentioning_a_human_stays_single_turn():
    messages, input_text = record_to_messages({"instruction": "Describe a Human: what is it?", "input": "x",
                                               "output": "y"})
    assert len(messages) == 2 and input_text == "x"


@needs_shared_data
def test_real_alpaca_and_belle_files_load():
    assert len(load_records(SHARED_DATA / "llama_factory" / "alpaca_en_demo.json")) == 999
    belle = load_records(SHARED_DATA / "belle" / "dev1K.json")  # JSON Lines despite its name
    assert len(belle) == 1000 and belle[0]["instruction"].startswith("题目")


def test_source_formats_are_read_directly(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"id": "x", "conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "hi"},
                                      {"from": "gpt", "value": "hello"}, {"from": "human", "value": "bye"},
                                      {"from": "gpt", "value": "ciao"}]},
        {"conversation_id": 1, "conversation": [{"human": "你好", "assistant": "你好！"}]},
        {"instruction": "When?", "context": "In 2000.", "response": "2000", "category": "closed_qa"},
        {"question": "2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    sharegpt, firefly, dolly, gsm8k = load_records(path)
    assert [(m.role, m.content) for m in record_to_messages(sharegpt)[0]] == [
        ("user", "Be kind.\n\nhi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ciao")]
    assert (firefly["instruction"], firefly["output"]) == ("你好", "你好！")
    assert (dolly["instruction"], dolly["input"], dolly["output"]) == ("When?", "In 2000.", "2000")
    assert gsm8k["output"] == "2 + 3 = 5\nThe answer is 5."


def test_malformed_source_records_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "robot", "value": "x"}]}) + "\n"
                    + json.dumps({"question": "q", "answer": "no final line"}))
    with pytest.raises(UserError, match=r"record 0 unknown speaker 'robot'.*record 1 a GSM8K 'answer' ends with"):
        load_records(path)


@needs_shared_data
def test_real_files_in_their_original_formats_load():
    from alpaca_cot.data import IGNORE_INDEX  # noqa: F401

    sharegpt = load_records(SHARED_DATA / "fastchat" / "dummy_conversation.json")
    assert len(sharegpt) == 500 and any(len(r["conversation"]) == 6 for r in sharegpt)
    firefly = load_records(SHARED_DATA / "firefly" / "dummy_data.jsonl")
    assert len(firefly) == 33 and all(len(r["conversation"]) >= 8 for r in firefly)
    gsm8k = load_records(SHARED_DATA / "gsm8k" / "train.jsonl")
    assert len(gsm8k) == 7473 and gsm8k[0]["output"].endswith("The answer is 72.") and "<<" not in gsm8k[0]["output"]
    dolly = load_records(SHARED_DATA / "dolly" / "dolly.json")
    assert len(dolly) == 12 and dolly[0]["input"].startswith("Virgin Australia")


def test_sharegpt_conversation_learns_every_assistant_turn(tiny_tokenizer, tmp_path):
    from alpaca_cot.data import IGNORE_INDEX, tokenize_record
    from alpaca_cot.templates import get_template

    path = tmp_path / "chat.json"
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
             {"from": "human", "value": "bye"}, {"from": "gpt", "value": "ciao"}]
    path.write_text(json.dumps([{"conversations": turns}]))
    [record] = load_records(path)
    example = tokenize_record(record, tiny_tokenizer, get_template("alpaca"), cutoff_len=1024, prefix_ids=[])
    learned = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(learned) == "hello</s>ciao</s>"


@needs_shared_data
def test_training_on_real_sharegpt_conversations(tiny_llama, tmp_path):
    from tests.conftest import train_tiny

    data = SHARED_DATA / "fastchat" / "dummy_conversation.json"
    assert train_tiny(tiny_llama, data, tmp_path / "run", "--max_steps", "2", "--cutoff_len", "256") == 0
