"""Every model family of the registry: detected from config.json, its default targets of every method trained,
two LoRA steps saved, reloaded in a fresh process and generating. A family without a tiny config (native) or a
fixture checkpoint (remote code, tests/fixtures/remote_code) fails the suite."""

import copy
import json
import subprocess
import sys

import pytest

from alpaca_cot.models import FAMILIES, load_model, load_tokenizer, resolve_family, resolve_template
from tests.conftest import ROOT, SAMPLE_RECORDS, train_tiny
from tests.remote_checkpoints import REMOTE_FAMILIES, build_remote_checkpoint

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


def _build_native(name, folder, tiny_tokenizer):
    import torch
    import transformers

    config_class, fields = TINY_CONFIGS[name]
    config = getattr(transformers, config_class)(**{**fields, "vocab_size": len(tiny_tokenizer)},
                                                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer = copy.deepcopy(tiny_tokenizer)
    # Naming every special token keeps family tokenizer classes (e.g. Qwen2's) from adding their own.
    tokenizer.pad_token = "<unk>"
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer):
    """A tiny checkpoint folder per family; folder names carry the family name, as hub ids do."""
    folders = {}
    for name, family in FAMILIES.items():
        folder = tmp_path_factory.mktemp(f"tiny-{name}-")
        if family.trust_remote_code:
            assert name in REMOTE_FAMILIES, f"remote-code family {name!r} has no tests/fixtures/remote_code folder"
            folders[name] = build_remote_checkpoint(name, folder)
        else:
            assert name in TINY_CONFIGS, f"family {name!r} has no tiny config in tests/test_families.py"
            folders[name] = _build_native(name, folder, tiny_tokenizer)
    return folders


@pytest.fixture(params=sorted(FAMILIES))
def family_model(request, checkpoints):
    return request.param, checkpoints[request.param]


def _trust(name):
    return ["--trust_remote_code"] if FAMILIES[name].trust_remote_code else []


def test_family_is_detected_from_config_json(family_model):
    name, folder = family_model
    assert resolve_family(None, str(folder)).name == name


@pytest.mark.parametrize("peft_type", ["lora", "ia3", "houlsby", "pfeiffer", "parallel"])
def test_default_targets_of_every_method_train(family_model, peft_type):
    """The family's default targets of each method exist, and a training step reaches every adapter weight."""
    import torch
    from peft import get_peft_model

    from alpaca_cot.cli import parse_finetune_args
    from alpaca_cot.data import special_prefix_ids, tokenize_record
    from alpaca_cot.methods import METHODS

    name, folder = family_model
    family = FAMILIES[name]
    trust = family.trust_remote_code
    tokenizer = load_tokenizer(str(folder), family, trust)
    model = load_model(str(folder), family, torch.float32, trust_remote_code=trust)
    args = parse_finetune_args(["--data", "demo", "--peft_type", peft_type, "--bottleneck_size", "8"])
    model = get_peft_model(model, METHODS[peft_type].build_config(args, family, model, 1))
    example = tokenize_record(SAMPLE_RECORDS[0], tokenizer, resolve_template(None, family), 512,
                              special_prefix_ids(tokenizer))
    model(input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]])).loss.backward()
    trained = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(grad is not None for grad in trained.values()), [n for n, g in trained.items() if g is None]
    assert any(float(grad.abs().sum()) > 0 for grad in trained.values())


# Run in a separate, fresh process: every run is reloaded from disk (base, adapter, tokenizer, remote code).
_GENERATE_EVERY_RUN = """
import contextlib, io, json, sys, traceback
import generate
results = {}
for name, run in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = generate.main(["--lora_dir", run, "--instruction", "Add the numbers.", "--input", "1 and 2",
                                  "--max_new_tokens", "4"])
    except Exception:
        code, err = 1, io.StringIO(traceback.format_exc())
    results[name] = {"code": code, "answer": out.getvalue(), "error": err.getvalue()[-1500:]}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def reloaded_runs(checkpoints, tmp_path_factory):
    """Two LoRA steps per family (chat families in their own template: the alpaca path is trained above), saved;
    then one fresh process reloads every run (template from its manifest) and generates."""
    folder = tmp_path_factory.mktemp("family-runs")
    data = folder / "sample.json"
    data.write_text(json.dumps(SAMPLE_RECORDS), encoding="utf-8")
    trained = {}
    for name, checkpoint in checkpoints.items():
        out = folder / name
        own = ["--template", FAMILIES[name].own_template] if FAMILIES[name].own_template else []
        # --cutoff_len 2048: MOSS's meta instruction alone is ~900 tokens for the byte-level fixture tokenizer.
        if train_tiny(checkpoint, data, out, "--max_steps", "2", "--cutoff_len", "2048", *_trust(name), *own) == 0:
            trained[name] = str(out)
    result = subprocess.run([sys.executable, "-c", _GENERATE_EVERY_RUN, json.dumps(trained)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return trained, json.loads(result.stdout.strip().splitlines()[-1])


def test_train_save_reload_in_a_fresh_process_and_generate(family_model, reloaded_runs):
    name, _ = family_model
    trained, generated = reloaded_runs
    assert name in trained, f"training {name} failed"
    assert generated[name]["code"] == 0, generated[name]["error"]
    assert generated[name]["answer"].endswith("\n")  # one answer line (random weights: any text)
