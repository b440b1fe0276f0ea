"""Every model family of the registry: detected from config.json, its default targets of every method trained,
loss falling on a fixed batch, two LoRA steps saved, then in a fresh process: reloaded, generating with the KV
cache (batched answers equal one-at-a-time ones), merged and the merged folder reloaded with equal logits.

Remote-code families are tiny random-weight checkpoints built from their REAL upstream code and tokenizer files
(``../shared/remote_code``, see tests/real_checkpoints.py); without that folder they skip with that reason. A
native family without a tiny config here fails the suite."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from alpaca_cot.models import FAMILIES, load_model, load_tokenizer, resolve_family, resolve_template
from tests.conftest import ROOT, SAMPLE_RECORDS, train_tiny
from tests.real_checkpoints import REAL_CODE, REAL_FAMILIES, build_real_checkpoint

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
    "generic": ("Phi3Config", LLAMA_LIKE),  # any model_type no row claims: Phi-3 here (tests/test_generic_models.py)
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


class _Checkpoints(dict):
    """A tiny checkpoint folder per family, built on first use; folder names carry the family name, as hub ids
    do. A family whose build fails raises its own error in its own tests only."""

    def __init__(self, tmp_path_factory, tiny_tokenizer):
        super().__init__()
        self._tmp, self._tokenizer = tmp_path_factory, tiny_tokenizer

    def __missing__(self, name):
        family = FAMILIES[name]
        folder = self._tmp.mktemp(f"tiny-{name}-")
        if family.trust_remote_code:
            assert name in REAL_FAMILIES, f"remote-code family {name!r} has no real checkpoint files"
            if not REAL_CODE.is_dir():
                pytest.skip(f"{REAL_CODE} (real upstream code and tokenizers of {name}) is not present")
            self[name] = build_real_checkpoint(name, folder)
        else:
            assert name in TINY_CONFIGS, f"family {name!r} has no tiny config in tests/test_families.py"
            self[name] = _build_native(name, folder, self._tokenizer)
        return self[name]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer):
    return _Checkpoints(tmp_path_factory, tiny_tokenizer)


@pytest.fixture(params=sorted(FAMILIES))
def family_model(request, checkpoints):
    return request.param, checkpoints[request.param]


# Remote-code families are slow rows in the tests that take these: tests/remote/ trains each of them quickly.
FAMILY_ROWS = [pytest.param(name, marks=pytest.mark.slow) if FAMILIES[name].trust_remote_code else name
               for name in sorted(FAMILIES)]


def _trust(name):
    return ["--trust_remote_code"] if FAMILIES[name].trust_remote_code else []


def test_family_is_detected_from_config_json(family_model):
    name, folder = family_model
    assert resolve_family(None, str(folder)).name == name


@pytest.mark.parametrize("peft_type", ["lora", *(pytest.param(peft_type, marks=pytest.mark.slow)
                                                for peft_type in ["ia3", "houlsby", "pfeiffer", "parallel"])])
@pytest.mark.parametrize("family_model", FAMILY_ROWS, indirect=True)
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


@pytest.mark.parametrize("template", ["alpaca", pytest.param("own", marks=pytest.mark.slow)])
@pytest.mark.parametrize("peft_type", ["lora", pytest.param("houlsby", marks=pytest.mark.slow)])
@pytest.mark.parametrize("family_model", FAMILY_ROWS, indirect=True)
def test_loss_is_finite_and_falls_on_a_fixed_batch(family_model, peft_type, template):
    """Five AdamW steps on one batch of two records (right-padded, as training pads) lower the loss."""
    import torch
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq

    import alpaca_cot_peft  # noqa: F401 - registers the bottleneck adapters with PEFT
    from alpaca_cot.cli import parse_finetune_args
    from alpaca_cot.data import IGNORE_INDEX, special_prefix_ids, tokenize_record
    from alpaca_cot.methods import METHODS

    name, folder = family_model
    family = FAMILIES[name]
    if template == "own" and not family.own_template:
        pytest.skip(f"{name} has no template of its own")
    trust = family.trust_remote_code
    tokenizer = load_tokenizer(str(folder), family, trust)
    tokenizer.padding_side = "right"
    prompt_format = resolve_template(family.own_template if template == "own" else "alpaca", family)
    examples = [tokenize_record(record, tokenizer, prompt_format, 512, special_prefix_ids(tokenizer))
                for record in SAMPLE_RECORDS[:2]]
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(examples)
    torch.manual_seed(0)
    model = load_model(str(folder), family, torch.float32, trust_remote_code=trust)
    args = parse_finetune_args(["--data", "demo", "--peft_type", peft_type, "--bottleneck_size", "16"])
    model = get_peft_model(model, METHODS[peft_type].build_config(args, family, model, 5))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**{key: batch[key] for key in ("input_ids", "attention_mask", "labels")}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses


# Run in a separate, fresh process: every run is reloaded from disk (base, adapter, tokenizer, remote code).
# Per run: generate.py answers; generation feeds the model one new token per step after the prompt (the KV cache
# is used); a batch of two prompts of different lengths answers as each prompt alone; merge.py folds the adapter
# and the merged folder, reloaded, gives the adapter's logits.
_CHECK_EVERY_RUN = """
import contextlib, io, json, sys, traceback
import os
import torch
import evaluate, generate, merge, predict
from alpaca_cot.infer.generation import build_generation_config, generate_token_ids, prompt_ids
from alpaca_cot.infer.loading import load_for_inference
from alpaca_cot.serve.chat import ChatSession
from alpaca_cot.templates import Message

def scripts(run, folder):
    # predict.py and evaluate.py (math: generation; choice: option likelihoods) answer from the run
    data = os.path.join(folder, "questions.json")
    with open(data, "w", encoding="utf-8") as f:
        json.dump([{"instruction": "Add 1 and 2.", "input": "", "output": "#### 3"},
                   {"instruction": "计算 3 加 4。", "input": "", "output": "#### 7"}], f, ensure_ascii=False)
    choice = os.path.join(folder, "choice.json")
    with open(choice, "w", encoding="utf-8") as f:
        json.dump([{"question": "2 + 2 =", "A": "3", "B": "4", "answer": "B", "subject": "math"}], f)
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        codes = [predict.main(["--lora_dir", run, "--data", data, "--result_dir", os.path.join(folder, "p.jsonl"),
                               "--max_new_tokens", "3"]),
                 evaluate.main(["--lora_dir", run, "--task", "math", "--data", data, "--output_dir",
                                os.path.join(folder, "math"), "--max_new_tokens", "3"]),
                 evaluate.main(["--lora_dir", run, "--task", "choice", "--data", choice, "--output_dir",
                                os.path.join(folder, "choice")])]
    return codes, sink.getvalue()[-1500:]

def check(run, merged_dir):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = generate.main(["--lora_dir", run, "--instruction", "Add the numbers.", "--input", "1 and 2",
                              "--max_new_tokens", "4"])
    if code != 0:
        return {"error": "generate.py: " + err.getvalue()[-1500:]}
    codes, log = scripts(run, os.path.dirname(merged_dir))
    if codes != [0, 0, 0]:
        return {"error": f"predict/evaluate exit codes {codes}: {log}"}
    loaded = load_for_inference(run)
    session = ChatSession(loaded, build_generation_config(loaded, max_new_tokens=3))  # server.py and web.py
    for text in ("你好", "And then?"):
        "".join(session.stream_reply(text))
    if len(session.history) != 4:
        return {"error": f"chat history {session.history}"}
    config = build_generation_config(loaded, max_new_tokens=5)
    config.eos_token_id = None  # random weights: run every step, whatever the tokens
    widths = []
    base = loaded.model.get_base_model()
    base.register_forward_pre_hook(lambda m, a, kw: widths.append((kw.get("input_ids") if "input_ids" in kw
                                                                     else a[0]).shape[-1]), with_kwargs=True)
    prompts = [prompt_ids(loaded, [Message("user", text)]) for text in ("Name a colour.", "Add 11 and 12, please.")]
    alone = [generate_token_ids(loaded, [ids], config, batch_size=1)[0] for ids in prompts]
    steps_alone = list(widths)
    together = generate_token_ids(loaded, prompts, config, batch_size=2)
    probe = torch.tensor([prompts[1]])
    with torch.no_grad():
        adapter_logits = loaded.model(input_ids=probe).logits.float()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = merge.main(["--lora_dir", run, "--merged_dir", merged_dir])
    if code != 0:
        return {"error": "merge.py failed"}
    merged = load_for_inference(model_name_or_path=merged_dir, template=loaded.template.name,
                                trust_remote_code=True)
    with torch.no_grad():
        merged_logits = merged.model(input_ids=probe).logits.float()
    return {"answer": out.getvalue(), "steps_alone": steps_alone, "prompt_lengths": [len(p) for p in prompts],
            "alone": alone, "together": together,
            "merged_difference": float((merged_logits - adapter_logits).abs().max())}

results = {}
for name, (run, merged_dir) in json.loads(sys.argv[1]).items():
    try:
        results[name] = check(run, merged_dir)
    except Exception:
        results[name] = {"error": traceback.format_exc()[-3000:]}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def reloaded_runs(checkpoints, tmp_path_factory):
    """Two LoRA steps per family (chat families in their own template: the alpaca path is trained above), saved;
    then one fresh process reloads every run (template from its manifest), generates and merges it."""
    folder = tmp_path_factory.mktemp("family-runs")
    data = folder / "sample.json"
    data.write_text(json.dumps(SAMPLE_RECORDS), encoding="utf-8")
    trained = {}
    for name in FAMILIES:
        if FAMILIES[name].trust_remote_code and not REAL_CODE.is_dir():
            continue
        out = folder / name
        own = ["--template", FAMILIES[name].own_template] if FAMILIES[name].own_template else []
        try:
            code = train_tiny(checkpoints[name], data, out, "--max_steps", "2", "--cutoff_len", "2048",
                              *_trust(name), *own)
        except Exception:  # noqa: BLE001 - that family's own tests report it
            continue
        if code == 0:
            trained[name] = str(out)
    jobs = {name: (run, str(folder / f"{name}-checks" / "merged")) for name, run in trained.items()}
    for _run, merged in jobs.values():
        Path(merged).parent.mkdir()
    result = subprocess.run([sys.executable, "-c", _CHECK_EVERY_RUN, json.dumps(jobs)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return trained, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_train_save_reload_in_a_fresh_process_and_generate(family_model, reloaded_runs):
    name, _ = family_model
    trained, checked = reloaded_runs
    assert name in trained, f"training {name} failed"
    result = checked[name]
    assert "error" not in result, result["error"]


@pytest.mark.slow
def test_generation_uses_the_kv_cache(family_model, reloaded_runs):
    """After the prompt, every forward of one-at-a-time generation gets exactly one new token."""
    name, _ = family_model
    result = reloaded_runs[1].get(name, {"error": f"training {name} failed"})
    assert "error" not in result, result["error"]
    first, second = result["prompt_lengths"]
    assert result["steps_alone"] == [first, 1, 1, 1, 1, second, 1, 1, 1, 1]


@pytest.mark.slow
def test_batched_greedy_answers_equal_one_at_a_time(family_model, reloaded_runs):
    name, _ = family_model
    result = reloaded_runs[1].get(name, {"error": f"training {name} failed"})
    assert "error" not in result, result["error"]
    assert result["together"] == result["alone"]


@pytest.mark.slow
def test_merged_folder_reloads_with_the_adapters_logits(family_model, reloaded_runs):
    name, _ = family_model
    result = reloaded_runs[1].get(name, {"error": f"training {name} failed"})
    assert "error" not in result, result["error"]
    assert result["merged_difference"] <= 1e-4
