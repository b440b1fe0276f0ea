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
    assert all(set(r) == {"instruction", "input", "output"} for r in load_records(lines))


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
    assert load_records(one_line) == [{"instruction": "a", "input": "", "output": "b"}]


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
