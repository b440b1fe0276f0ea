"""Model-family registry: detection, lookups and loading errors."""

import json

import pytest

from alpaca_cot.errors import UserError
from alpaca_cot.methods import METHODS, lora_targets
from alpaca_cot.models import FAMILIES, detect_family, get_family, load_model, resolve_family, resolve_model_path


def test_llama_is_detected_from_config_json(tiny_llama):
    assert resolve_family(None, str(tiny_llama)).name == "llama"
    assert detect_family({"model_type": "llama"}, "x").name == "llama"


def test_undetectable_family_asks_for_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    with pytest.raises(UserError, match=r"model_type 'mystery'.*pass --model_type"):
        resolve_family(None, str(tmp_path))


def test_unknown_model_type_is_named():
    with pytest.raises(UserError, match=r"--model_type: unknown model type 'lama' \(did you mean 'llama'\?\)"):
        get_family("lama")


def test_nonexistent_model_path():
    with pytest.raises(UserError, match=r"./no/such/model does not exist"):
        resolve_model_path("./no/such/model")


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_hub_ids_pass_through_unresolved():
    assert resolve_model_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


def test_registry_rows_are_complete():
    for name, family in FAMILIES.items():
        assert family.name == name and family.config_model_types and family.lora_targets
    for name, method in METHODS.items():
        assert method.name == name and method.description


def test_lora_targets_the_model_lacks_are_listed(tiny_llama):
    import argparse

    import torch

    model = load_model(str(tiny_llama), FAMILIES["llama"], torch.float32)
    args = argparse.Namespace(lora_target_modules=["query_key_value"])
    with pytest.raises(UserError, match=r"query_key_value not in this model; its Linear layers are: .*q_proj"):
        lora_targets(args, FAMILIES["llama"], model)
    assert lora_targets(argparse.Namespace(lora_target_modules=None), FAMILIES["llama"], model) == ["q_proj", "v_proj"]
    assert lora_targets(argparse.Namespace(lora_target_modules=["all"]), FAMILIES["llama"], model) == "all-linear"
