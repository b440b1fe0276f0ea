"""Every model family of the registry: detected from config.json, trained with its default targets,
reloaded in a fresh process and generating. A family without a tiny config here fails the suite."""

import copy
import subprocess
import sys

import pytest

from alpaca_cot.models import FAMILIES, resolve_family
from tests.conftest import ROOT, train_tiny

SMALL = {"vocab_size": None, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
LLAMA_LIKE = {**SMALL, "intermediate_size": 64, "num_key_value_heads": 2, "head_dim": 8}

TINY_CONFIGS = {
    "llama": ("LlamaConfig", LLAMA_LIKE),
    "mistral": ("MistralConfig", LLAMA_LIKE),
    "qwen2": ("Qwen2Config", LLAMA_LIKE),
    "qwen3": ("Qwen3Config", LLAMA_LIKE),
    "gemma": ("GemmaConfig", LLAMA_LIKE),
    "glm4": ("Glm4Config", LLAMA_LIKE),
    "bloom": ("BloomConfig", {"vocab_size": None, "hidden_size": 32, "n_layer": 2, "n_head": 4}),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tmp_path_factory, tiny_tokenizer):
    import torch
    import transformers

    name = request.param
    assert name in TINY_CONFIGS, f"family {name!r} has no tiny config in tests/test_families.py"
    config_class, fields = TINY_CONFIGS[name]
    config = getattr(transformers, config_class)(**{**fields, "vocab_size": len(tiny_tokenizer)},
                                                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(f"tiny-{name}")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer = copy.deepcopy(tiny_tokenizer)
    # Naming every special token keeps family tokenizer classes (e.g. Qwen2's) from adding their own.
    tokenizer.pad_token = "<unk>"
    tokenizer.save_pretrained(folder)
    return name, folder


def test_family_is_detected_from_config_json(family_model):
    name, folder = family_model
    assert resolve_family(None, str(folder)).name == name


@pytest.mark.parametrize("peft_type", ["lora", "ia3", "houlsby", "pfeiffer", "parallel"])
def test_default_targets_of_every_method_exist(family_model, peft_type, sample_file, tmp_path):
    _, folder = family_model
    assert train_tiny(folder, sample_file, tmp_path / "run", "--peft_type", peft_type, "--max_steps", "1",
                      "--bottleneck_size", "8") == 0


def test_train_save_reload_in_a_fresh_process_and_generate(family_model, sample_file, tmp_path):
    name, folder = family_model
    out = tmp_path / "run"
    assert train_tiny(folder, sample_file, out, "--max_steps", "2") == 0
    result = subprocess.run([sys.executable, "generate.py", "--lora_dir", str(out), "--instruction", "Add the numbers.",
                             "--input", "1 and 2", "--max_new_tokens", "4"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
