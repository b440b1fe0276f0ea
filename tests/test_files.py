"""alpaca_cot.files: atomic writes of files and folders, and JSON Lines a killed run resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alpaca_cot.errors import UserError
from alpaca_cot.files import (
    JsonlAppender,
    append_jsonl,
    atomic_folder,
    atomic_path,
    read_done,
    write_json_atomic,
    write_text_atomic,
)


def test_an_atomic_write_leaves_only_the_target(tmp_path):
    target = tmp_path / "summary.json"
    write_json_atomic(target, {"accuracy": 0.5, "名": "值"})
    write_text_atomic(tmp_path / "summary.md", "# 标题\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json", "summary.md"]
    assert json.loads(target.read_text(encoding="utf-8")) == {"accuracy": 0.5, "名": "值"}
    assert "名" in target.read_text(encoding="utf-8")  # not \u-escaped
    assert (tmp_path / "summary.md").read_text(encoding="utf-8") == "# 标题\n"


def test_an_atomic_write_that_fails_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.npy"
    np.save(target, np.arange(3))
    with pytest.raises(RuntimeError, match="killed"), atomic_path(target) as temporary:
        temporary.write_bytes(b"half a fi")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.npy"]
    assert np.load(target).tolist() == [0, 1, 2]
    with atomic_path(target) as temporary, open(temporary, "wb") as out:  # as data/prepare.py writes it
        np.save(out, np.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.npy"]
    assert np.load(target).tolist() == [0, 1, 2, 3, 4]


def test_an_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "models" / "converted"
    with pytest.raises(RuntimeError, match="killed"), atomic_folder(target) as staging:
        (staging / "model.safetensors").write_bytes(b"weights")
        raise RuntimeError("killed")
    assert list((tmp_path / "models").iterdir()) == []  # neither the target nor the staging folder
    with atomic_folder(target) as staging:
        (staging / "config.json").write_text("{}")
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["converted"]
    assert (target / "config.json").read_text() == "{}"
    with atomic_folder(target) as staging:  # another process completed it first: its copy is kept
        (staging / "config.json").write_text('{"late": true}')
    assert (target / "config.json").read_text() == "{}"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["converted"]


def test_jsonl_drops_a_torn_last_line_and_appending_continues_after_it(tmp_path):
    path = tmp_path / "out" / "results.jsonl"
    assert read_done(path, "--output_dir") == []  # no file yet: nothing done
    with JsonlAppender(path) as log:  # creates the folder
        log.write([{"id": 1, "text": "一"}, {"id": 2, "text": "二"}])
    assert path.read_text(encoding="utf-8") == '{"id": 1, "text": "一"}\n{"id": 2, "text": "二"}\n'
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": 3, "te')  # the run was killed mid-line
    assert read_done(path, "--output_dir") == [{"id": 1, "text": "一"}, {"id": 2, "text": "二"}]
    assert path.read_text(encoding="utf-8").endswith('"二"}\n')  # the torn tail is cut off the file
    append_jsonl(path, [{"id": 3, "text": "三"}])
    assert [record["id"] for record in read_done(path, "--output_dir")] == [1, 2, 3]


def test_a_damaged_complete_line_is_named_or_skipped(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 3}\n', encoding="utf-8")
    with pytest.raises(UserError) as caught:
        read_done(path, "--result_dir")
    assert str(caught.value) == f"--result_dir: {path}:2 is not JSON; move the file away"
    assert read_done(path, None) == [{"id": 1}, {"id": 3}]  # the judge's cache: that request is made again
