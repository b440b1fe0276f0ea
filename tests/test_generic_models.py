"""The generic family row: causal LMs that transformers loads natively and no row claims (Phi-3, Gemma 3, OLMo 2,
Granite, Falcon, GPT-NeoX, GPT-2, StableLM, Cohere, StarCoder2 and the mixtures of experts Mixtral, Qwen2-MoE and
DeepSeek-V3), each a tiny random-weight checkpoint: detected from config.json, adapter targets found in the model,
every method's default targets trained, packed rows kept apart, two LoRA steps saved; then in one fresh process
every run is reloaded, generates with the KV cache (equal to a full forward), and is merged into a folder that plain
transformers loads with the same logits.

The generic row lists exactly the model types tested here: adding one to the row without a tiny config fails."""

import copy
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from alpaca_cot.errors import UserError
from alpaca_cot.models import FAMILIES, detect_family, load_model, load_tokenizer, resolve_family, resolve_template
from tests.conftest import ROOT, SAMPLE_RECORDS, train_tiny

GENERIC = FAMILIES["generic"]
LLAMA_LIKE = {"intermediate_size": 64, "num_key_value_heads": 2, "head_dim": 8}
MIXTURES_OF_EXPERTS = {"mixtral", "qwen2_moe", "deepseek_v3"}
# model_type -> config fields beyond hidden 32, 2 layers, 4 heads (and vocabulary, special token ids).
ARCHITECTURES = {
    "phi3": LLAMA_LIKE,
    "gemma3_text": LLAMA_LIKE,
    "olmo2": LLAMA_LIKE,
    "granite": LLAMA_LIKE,
    "cohere": LLAMA_LIKE,
    "starcoder2": LLAMA_LIKE,
    "stablelm": LLAMA_LIKE,
    "falcon": {},
    "gpt_neox": {"intermediate_size": 64},
    "gpt2": {},
    "mixtral": {**LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                  "shared_expert_intermediate_size": 32},
    # The first layer dense, the second a mixture of experts with a shared expert; latent (MLA) attention.
    "deepseek_v3": {"intermediate_size": 64, "first_k_dense_replace": 1, "n_routed_experts": 4,
                    "num_experts_per_tok": 2, "moe_intermediate_size": 16, "n_group": 1, "topk_group": 1,
                    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
                    "v_head_dim": 8},
}
# Default LoRA targets (every projection of the attention), as found in each model.
LORA_TARGETS = {
    "phi3": ["o_proj", "qkv_proj"],  # Phi-3 registers o_proj first
    "falcon": ["query_key_value", "dense"],
    "gpt_neox": ["query_key_value", "dense"],
    "gpt2": ["c_attn", "attn.c_proj"],  # its MLP has a c_proj too
    "deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
}
# Feed-forward layers found (houlsby's targets), where not LLaMA's gate_proj, up_proj, down_proj: none where experts
# are fused Parameters; DeepSeek-V3's dense MLP and shared experts told apart; GPT-2's are Conv1D, which bottleneck
# adapters do not wrap.
FEEDFORWARD = {
    "phi3": ["gate_up_proj", "down_proj"],
    "starcoder2": ["c_fc", "c_proj"],
    "falcon": ["dense_h_to_4h", "dense_4h_to_h"],
    "gpt_neox": ["dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": [],
    "mixtral": [],
    "qwen2_moe": ["gate_proj", "up_proj", "down_proj"],  # the shared expert's; its gate and the router left out
    "deepseek_v3": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "shared_experts.gate_proj",
                    "shared_experts.up_proj", "shared_experts.down_proj"],
}
UNPACKED = {"falcon", "stablelm"}  # their own attention code: no 4D mask
CHAT = ["<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT})
    tokenizer.chat_template = CHATML
    tokenizer.pad_token = "<unk>"  # named, so that no tokenizer class adds its own
    return tokenizer


def _build(model_type, folder, tokenizer):
    import transformers

    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, **ARCHITECTURES[model_type])
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread; on a shared 2-core machine its spin-waits cost up to 4x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer):
    tokenizer = _tokenizer(tiny_tokenizer)
    return {name: _build(name, tmp_path_factory.mktemp(f"tiny-{name}-"), tokenizer) for name in ARCHITECTURES}


_BASES = {}


def _fresh_model(name, checkpoints):
    """A copy of the loaded tiny model (loaded once per architecture)."""
    if name not in _BASES:
        _BASES[name] = load_model(str(checkpoints[name]), GENERIC, torch.float32)
    return copy.deepcopy(_BASES[name])


def test_the_generic_row_lists_exactly_the_architectures_tested_here():
    from alpaca_cot.models import native_causal_lm_types

    assert set(GENERIC.config_model_types) == set(ARCHITECTURES)
    assert len(ARCHITECTURES) >= 10 and MIXTURES_OF_EXPERTS <= set(ARCHITECTURES)
    claimed = {t for f in FAMILIES.values() if not f.generic for t in f.config_model_types}
    assert not claimed & set(ARCHITECTURES) and set(ARCHITECTURES) <= native_causal_lm_types()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_detected_as_generic_and_packing_follows_the_model_class(name, checkpoints, caplog):
    with caplog.at_level(logging.INFO, logger="alpaca_cot.models"):
        family = resolve_family(None, str(checkpoints[name]))
    assert family.name == "generic" and family.generic
    assert family.packs_samples is (name not in UNPACKED)
    assert f"model_type {name!r} has no family row of its own: using the generic row" in caplog.text


def test_any_other_native_model_type_is_generic_and_a_row_still_wins():
    assert detect_family({"model_type": "opt"}, "facebook/opt-125m").name == "generic"  # not listed: still native
    assert detect_family({"model_type": "qwen2"}, "x").name == "qwen2"
    with pytest.raises(UserError, match=r"model_type 'mystery'.*pass --model_type"):
        detect_family({"model_type": "mystery"}, "x")


def test_model_type_generic_on_a_llama_checkpoint_finds_every_attention_projection(tiny_llama):
    import argparse

    from alpaca_cot.methods import lora_targets

    family = resolve_family("generic", str(tiny_llama))
    model = load_model(str(tiny_llama), family, torch.float32)
    args = argparse.Namespace(lora_target_modules=None)
    assert lora_targets(args, family, model) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert lora_targets(args, FAMILIES["llama"], model) == ["q_proj", "v_proj"]  # the llama row: as before


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_targets_are_found_in_the_model_and_all_is_every_layer_but_the_head(name, checkpoints, caplog):
    import argparse

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from alpaca_cot.methods import default_targets, lora_targets
    from alpaca_cot.module_roles import adaptable_shape

    model = _fresh_model(name, checkpoints)
    with caplog.at_level(logging.INFO, logger="alpaca_cot.methods"):
        targets = lora_targets(argparse.Namespace(lora_target_modules=None), GENERIC, model)
    assert targets == LORA_TARGETS.get(name, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert "generic row: lora_targets = attention, found in the model as " + ", ".join(targets) in caplog.text
    feedforward = default_targets(GENERIC, "bottleneck_sequential", model, linear_only=True)
    assert feedforward == FEEDFORWARD.get(name, ["gate_proj", "up_proj", "down_proj"])
    everything = lora_targets(argparse.Namespace(lora_target_modules=["all"]), GENERIC, model)
    head = _BASES[name].get_output_embeddings()
    layers = {n for n, m in _BASES[name].named_modules() if adaptable_shape(m) and m is not head}
    wrapped = get_peft_model(model, LoraConfig(target_modules=everything, r=2))
    adapted = {n.removeprefix("base_model.model.") for n, m in wrapped.named_modules()
               if isinstance(m, LoraLayer) and adaptable_shape(m.get_base_layer())}
    if name in ("mixtral", "deepseek_v3"):
        # PEFT 0.21 reads these types' transformers-4 expert names (gate/up/down_proj, w1/w2/w3, gate) as the fused
        # experts and router of transformers 5: those get LoRA on their Parameters, Linear layers so named none
        # (DeepSeek's dense MLP and shared experts). It does not for qwen2_moe itself: every Linear, no expert.
        fused = {n for n, m in wrapped.named_modules() if type(m).__name__ == "ParamWrapper"}
        assert any(n.endswith(".mlp.experts") for n in fused) and any(n.endswith(".mlp.gate") for n in fused)
        layers = {n for n in layers if n.rsplit(".", 1)[-1] not in ("gate_proj", "up_proj", "down_proj")}
    assert adapted == layers


def _not_adaptable(name, peft_type):
    """What a method's defaults cannot reach: feed-forward experts fused into Parameters; Conv1D in bottlenecks."""
    if name == "mixtral" and peft_type in ("houlsby", "pfeiffer"):
        return "no layer to adapt in its feedforward.*experts fused into one tensor, has none there"
    if name == "gpt2" and peft_type in ("houlsby", "pfeiffer", "parallel"):
        return "no layer to adapt in its .*not transformers' Conv1D"
    return None


@pytest.mark.parametrize("peft_type", ["lora", "ia3", "houlsby", "pfeiffer", "parallel"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_default_targets_of_every_method_train(name, peft_type, checkpoints):
    """Each method's default targets exist, and a training step reaches every adapter weight."""
    from peft import get_peft_model

    import alpaca_cot_peft  # noqa: F401 - registers the bottleneck adapters
    from alpaca_cot.cli import parse_finetune_args
    from alpaca_cot.data import special_prefix_ids, tokenize_record
    from alpaca_cot.methods import METHODS

    model = _fresh_model(name, checkpoints)
    args = parse_finetune_args(["--data", "demo", "--peft_type", peft_type, "--bottleneck_size", "8"])
    refusal = _not_adaptable(name, peft_type)
    if refusal:
        with pytest.raises(UserError, match=f"{refusal}.*name the layers to adapt"):
            METHODS[peft_type].build_config(args, GENERIC, model, 1)
        return
    model = get_peft_model(model, METHODS[peft_type].build_config(args, GENERIC, model, 1))
    tokenizer = load_tokenizer(str(checkpoints[name]), GENERIC)
    example = tokenize_record(SAMPLE_RECORDS[0], tokenizer, resolve_template(None, GENERIC), 512,
                              special_prefix_ids(tokenizer))
    model(input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]])).loss.backward()
    trained = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(grad is not None for grad in trained.values()), [n for n, g in trained.items() if g is None]
    assert any(float(grad.abs().sum()) > 0 for grad in trained.values())


@pytest.mark.parametrize("attention", ["sdpa", "sdpa_per_sample"])
@pytest.mark.parametrize("name", sorted(set(ARCHITECTURES) - UNPACKED))
def test_packed_rows_give_each_sample_its_own_logits(name, attention, checkpoints):
    """What --packing hands a generic model (4D block-diagonal mask, restarting positions; or one flat row
    attended sample by sample) gives every sample the logits it has alone."""
    from alpaca_cot.train.attention import PackedCollator, use_per_sample_attention

    model = _fresh_model(name, checkpoints).train()  # per-sample attention acts in training mode only
    for dropout in (m for m in model.modules() if isinstance(m, torch.nn.Dropout)):
        dropout.p = 0.0  # GPT-2's are 0.1
    samples = [[1, 40, 41, 42, 43, 44], [1, 50, 51, 52], [1, 60, 61, 62, 63]]
    if attention == "sdpa_per_sample":
        assert use_per_sample_attention(model)
    collator = PackedCollator(0, model.config._attn_implementation)
    rows = [{"input_ids": samples[0] + samples[1], "labels": samples[0] + samples[1], "seq_lens": [6, 4]},
            {"input_ids": samples[2], "labels": samples[2], "seq_lens": [5]}]
    batch = collator(rows)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.reshape(-1, model.config.vocab_size)
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in samples]
    width = batch["input_ids"].shape[-1]
    starts = [0, 6, 10] if attention == "sdpa_per_sample" else [0, 6, width]
    difference = max((packed[start:start + len(ids)] - logits).abs().max().item()
                     for start, ids, logits in zip(starts, samples, alone))
    assert difference < 1e-4, difference


# Trained runs: (architecture, extra flags). Every architecture with LoRA's defaults, Phi-3 packed and in the
# tokenizer's chat template, Falcon asked to pack (its attention cannot: it trains unpacked); and 'all' on the
# mixtures of experts whose fused experts PEFT adapts as Parameters.
FLAGS = {"phi3": ["--packing", "--template", "chat"], "falcon": ["--packing"]}
RUNS = {name: (name, FLAGS.get(name, [])) for name in ARCHITECTURES} | {
    f"{name}-all": (name, ["--lora_target_modules", "all"]) for name in ("mixtral", "deepseek_v3")}

# In one fresh process, per run: reload; generate with the KV cache and compare its logits with a full forward
# of the generated sequence; generate.py answers; merge.py merges; plain transformers loads the merged folder.
_RELOAD_GENERATE_MERGE = """
import contextlib, io, json, sys, traceback
import torch
from transformers import AutoModelForCausalLM
import generate, merge
from alpaca_cot.infer.generation import build_generation_config, prompt_ids
from alpaca_cot.infer.loading import load_for_inference
from alpaca_cot.templates import Message

def check(run, merged):
    loaded = load_for_inference(run)
    ids = torch.tensor([prompt_ids(loaded, [Message("user", "Add the numbers.")], "1 and 2")])
    config = build_generation_config(loaded, max_new_tokens=6, min_new_tokens=6)
    with torch.no_grad():
        out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                    use_cache=True, output_logits=True, return_dict_in_generate=True)
        full = loaded.model(input_ids=out.sequences).logits[0, ids.shape[1] - 1:-1]
        cached = torch.stack(out.logits, 1)[0]
        adapted = loaded.model(input_ids=ids).logits
        with loaded.model.disable_adapter():
            base = loaded.model(input_ids=ids).logits
    with contextlib.redirect_stdout(io.StringIO()) as answer:
        generated = generate.main(["--lora_dir", run, "--instruction", "Add the numbers.", "--max_new_tokens", "4"])
    merged_code = merge.main(["--lora_dir", run, "--merged_dir", merged])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
    return {"family": loaded.family.name, "template": loaded.template.name, "new_tokens": len(out.logits),
            "cache_difference": (cached - full).abs().max().item(), "generate": generated,
            "answer": answer.getvalue(), "merge": merged_code, "merged_type": plain.__class__.__name__,
            "merged_difference": (plain - adapted).abs().max().item(),
            "adapter_effect": (adapted - base).abs().max().item()}

results = {}
for name, (run, merged) in json.loads(sys.argv[1]).items():
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            results[name] = check(run, merged)
    except Exception:
        results[name] = {"error": traceback.format_exc()[-2000:]}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def reloaded_runs(checkpoints, tmp_path_factory):
    """Two LoRA steps per run, saved with their training log; then one fresh process checks every run."""
    folder = tmp_path_factory.mktemp("generic-runs")
    data = folder / "sample.json"
    data.write_text(json.dumps(SAMPLE_RECORDS), encoding="utf-8")
    trained, logs = {}, {}
    package_logger = logging.getLogger("alpaca_cot")
    level = package_logger.level
    for name, (architecture, flags) in RUNS.items():
        handler = _Recorder()
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)
        try:
            code = train_tiny(checkpoints[architecture], data, folder / name, "--max_steps", "2",
                              "--learning_rate", "1e-2", *flags)
        finally:
            package_logger.removeHandler(handler)
            package_logger.setLevel(level)
        logs[name] = "\n".join(handler.lines)
        if code == 0:
            trained[name] = (str(folder / name), str(folder / f"{name}-merged"))
    result = subprocess.run([sys.executable, "-c", _RELOAD_GENERATE_MERGE, json.dumps(trained)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return trained, logs, json.loads(result.stdout.strip().splitlines()[-1])


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(RUNS))
def test_trained_run_reloads_generates_with_the_cache_and_merges(run, reloaded_runs):
    trained, logs, checked = reloaded_runs
    assert run in trained, f"training {run} failed:\n{logs[run][-2000:]}"
    assert "using the generic row" in logs[run]
    result = checked[run]
    assert "error" not in result, result.get("error")
    assert result["family"] == "generic" and result["new_tokens"] == 6
    assert result["cache_difference"] < 1e-4, result  # cached generation = full forward
    assert result["generate"] == 0 and result["answer"].endswith("\n")
    assert result["merge"] == 0 and result["merged_difference"] < 1e-4, result
    assert result["adapter_effect"] > 1e-4, result  # the merged weights carry a real update


@pytest.mark.slow
def test_packing_the_chat_template_and_all_on_generic_models(reloaded_runs):
    _, logs, checked = reloaded_runs
    assert "packed rows attend sample by sample" in logs["phi3"] and checked["phi3"]["template"] == "chat"
    assert "packing off: generic models take no block-diagonal attention mask" in logs["falcon"]
    assert "fused expert weights, which take no dropout: --lora_dropout 0" in logs["mixtral-all"]
    assert "generic row: lora_targets" not in logs["mixtral-all"]  # 'all' is every layer: nothing to find


def test_encoders_with_a_causal_lm_head_are_not_taken_for_decoders():
    """BERT loads as BertLMHeadModel, attending both ways unless told it is a decoder: no generic row for it."""
    from alpaca_cot.models import detect_family

    with pytest.raises(UserError, match=r"cannot tell the model family .* model_type 'bert'.*pass --model_type"):
        detect_family({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "bert-base-uncased")
