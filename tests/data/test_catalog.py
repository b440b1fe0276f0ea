"""The dataset catalog, ``--data`` resolution (names, files, globs, mixtures) and ``download``."""

import json
import os
import subprocess
import sys

import pytest

from alpaca_cot.data.catalog import filter_catalog, load_catalog, parse_data_spec, resolve_data
from alpaca_cot.data.commands import main as data_main
from alpaca_cot.errors import UserError
from tests.conftest import ROOT

# Every row of the original README's "Data Collection" table (its names, as catalog keys).
ORIGINAL_TABLE = ["cot", "gpt4all", "GPTeacher", "Guanaco", "HC3", "alpaca", "Natural-Instructions", "belle_cn",
                  "instinwild", "prosocial-dialog", "finance_en", "xP3", "firefly", "instruct", "CodeAlpaca",
                  "alpaca_gpt4", "webGPT", "dolly", "baize", "hh-rlhf", "OIG", "GAOKAO", "camel", "FLAN-Muffin",
                  "COIG", "GPT4Tools", "ShareChat", "Auto-CoT", "MOSS", "ultrachat", "Chinese-medical", "CSL", "pCLUE",
                  "news_commentary", "StackLLaMA"]
ORIGINAL_NAMES = ["alpaca", "belle", "alpaca-belle", "cot", "alpaca-cot", "alpaca-belle-cot", "belle1.5m", "finance",
                  "multiturn_chat", "CoT_Chinese_data", "gpt4all"]


def test_catalog_covers_the_original_table_and_names():
    catalog = load_catalog()
    assert not [name for name in ORIGINAL_TABLE + ORIGINAL_NAMES if name not in catalog]
    for entry in catalog.values():
        assert entry.description and entry.source, entry.name
        assert set(entry.lang) <= {"EN", "CN", "ML"} and set(entry.gen) <= {"HG", "SI", "MIX", "COL"}, entry.name
        assert entry.hub_patterns or entry.make or entry.note, entry.name  # where it comes from, or why nothing
        assert all(f.startswith(entry.folder + "/") for f in entry.files if entry.folder), entry.name
    sized = [catalog[name].records for name in ORIGINAL_TABLE if name != "StackLLaMA"]
    assert all(sized) and catalog["xP3"].records == 78883588


def test_combined_names_resolve_to_their_files():
    catalog = load_catalog()
    assert catalog["alpaca-belle-cot"].files == ("combination/alcapa_plus_belle_plus_cot.json",)
    assert catalog["alpaca-belle-cot"].combines == ("alpaca", "belle", "cot")
    assert catalog["belle1.5m"].files == ("combination/belle_data1.5M_cn.json",)
    assert catalog["multiturn_chat"].files == ("belle_cn/multiturn_chat_0.8M.json",)
    assert len(catalog["belle_cn"].files) == 4
    assert catalog["MOSS"].hub_patterns == ["MOSS/*"]  # folder known, file names not: the folder is fetched


def test_filters_by_tag(capsys):
    names = {e.name for e in filter_catalog(lang="cn", task="COT")}
    assert {"CoT_Chinese_data", "alpaca-belle-cot"} <= names and "alpaca" not in names and "cot" not in names
    assert data_main(["list", "--lang", "CN", "--task", "cot"]) == 0
    out = capsys.readouterr().out
    assert "CoT_Chinese_data" in out and "Chain-of-Thought/CoT_Chinese_data.json" in out and "gpt4all" not in out
    assert data_main(["list", "--json", "--gen", "HG"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"dolly", "cot"} <= {r["name"] for r in rows} and all("HG" in r["gen"] for r in rows)
    with pytest.raises(UserError, match="no dataset has all the tags"):
        data_main(["list", "--lang", "XX"])


def test_downloaded_layouts_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("ALPACA_COT_DATA_DIR", str(tmp_path))
    (tmp_path / "GAOKAO").mkdir()
    (tmp_path / "GAOKAO" / "gaokao.json").write_text("[]")
    (tmp_path / "belle_data_cn.json").write_text("[]")  # the original's flat layout and file name
    (tmp_path / "baize" / "sub").mkdir(parents=True)
    (tmp_path / "baize" / "sub" / "b.json").write_text("[]")
    (tmp_path / "baize" / "a.jsonl").write_text("")
    gaokao, belle, baize = resolve_data(["GAOKAO", "belle:100", "baize:0.25"])
    assert gaokao.path == tmp_path / "GAOKAO" / "gaokao.json"
    assert belle.path.name == "belle_data_cn.json" and belle.count == 100
    assert [p.name for p in baize.files] == ["a.jsonl", "b.json"] and baize.fraction == 0.25
    with pytest.raises(UserError, match=r"--data multiturn_chat: .*multiturn_chat_0.8M.json is not on disk; download "
                                        r"it with `python -m alpaca_cot.data download multiturn_chat`"):
        resolve_data(["multiturn_chat"])
    with pytest.raises(UserError, match="StackLLaMA: .* has no files in QingyiSi/Alpaca-CoT"):
        resolve_data(["StackLLaMA"])


def test_paths_globs_and_amounts(tmp_path):
    for name in ("a.json", "b.json", "c.txt"):
        (tmp_path / name).write_text("[]")
    [source] = resolve_data([f"{tmp_path}/*.json:0.5"])
    assert [p.name for p in source.files] == ["a.json", "b.json"] and source.fraction == 0.5
    [single] = resolve_data([f"{tmp_path / 'a.json'}:20000"])
    assert single.count == 20000 and single.path.name == "a.json"
    assert parse_data_spec("alpaca") == ("alpaca", None, None)
    assert parse_data_spec("alpaca:1.0") == ("alpaca", 1.0, None)
    assert parse_data_spec("alpaca:1") == ("alpaca", None, 1)
    for spec, message in [(f"{tmp_path}/*.jsonl", "the pattern matches no file"),
                          ("alpaca:1.5", r"a fraction must be in \(0, 1\]"), ("alpaca:0.0", "a fraction must be"),
                          ("alpaca:0", "a record count must be at least 1"), (str(tmp_path), "is a folder"),
                          ("alpacca", r"did you mean 'alpaca'")]:
        with pytest.raises(UserError, match=message):
            resolve_data([spec])
    with pytest.raises(UserError, match="--data needs at least one"):
        resolve_data([])


def _download(tmp_path, **env):
    run_env = {**os.environ, "ALPACA_COT_DATA_DIR": str(tmp_path), **env}
    return subprocess.run([sys.executable, "-m", "alpaca_cot.data", "download", "GAOKAO"], cwd=ROOT, env=run_env,
                          capture_output=True, text=True, timeout=120)


def test_download_offline_is_one_clear_line(tmp_path):
    result = _download(tmp_path, HF_HUB_OFFLINE="1")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: download GAOKAO: cannot reach the Hugging Face Hub (HF_HUB_OFFLINE is set); run it where the hub "
        f"is reachable, or copy GAOKAO/gaokao.json from QingyiSi/Alpaca-CoT into {tmp_path}"]


def test_download_without_a_connection(tmp_path):
    # An endpoint nothing listens on: the real huggingface_hub code path, and never a real download in tests.
    result = _download(tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode == 2 and "cannot reach the Hugging Face Hub (no connection)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_download_rejects_unknown_names():
    with pytest.raises(UserError, match=r"download: unknown dataset 'gaokoa' \(did you mean 'GAOKAO'"):
        data_main(["download", "gaokoa"])
