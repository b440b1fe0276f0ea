"""MOSS (moss-moon-003, a CodeGen model) under transformers 5: its own classes fixed in memory load, with correct
weights and buffers, and run; the checkpoint converts once to native CodeGenForCausalLM with equal logits; the
converted model generates with its KV cache and trains with LoRA, merges and reloads natively.

Built from the real upstream files (``../shared/remote_code/moss``) with tiny random weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from alpaca_cot.errors import UserError
from alpaca_cot.models import FAMILIES, load_model
from alpaca_cot.remote import moss, remote_model_class
from tests.real_checkpoints import REAL_CODE, adamw_losses, build_real_checkpoint, copy_real_files, needs_real_code

pytestmark = needs_real_code
FAMILY = FAMILIES["moss"]
PAD = 106068  # <eom>, MOSS's eos: what the family pads with
MAX_DIFF = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_real_checkpoint("moss", tmp_path_factory.mktemp("tiny-moss"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The checkpoint's own MossForCausalLM, fixed in memory."""
    return remote_model_class(str(checkpoint), FAMILY).from_pretrained(str(checkpoint), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def native(checkpoint, tmp_path_factory):
    """The checkpoint through our loader: converted once to CodeGenForCausalLM (in a module-private cache)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ALPACA_COT_CACHE", str(tmp_path_factory.mktemp("cache")))
        return load_model(str(checkpoint), FAMILY, torch.float32, trust_remote_code=True).eval()


def _batch():
    """Two rows of 7 token ids, the second left-padded by 3."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 106000, (2, 7), generator=generator)
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, :3] = 0
    input_ids[1, :3] = PAD
    return input_ids, attention_mask


def _logits(model, input_ids, attention_mask):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()


def _sinusoid_table(positions: int, dim: int) -> torch.Tensor:
    """GPT-J's rotary table, written out: sin then cos of position * 10000^(-2i/dim)."""
    frequencies = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * frequencies
    return torch.cat((angles.sin(), angles.cos()), dim=1).float()


# (a) the checkpoint's own classes, fixed in memory ---------------------------------------------------------------

def test_every_fixed_defect_is_present_in_the_upstream_code(tmp_path):
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from alpaca_cot.remote.fixes import apply_fixes

    folder = copy_real_files("moss", tmp_path / "moss-unfixed")  # a module of its own, not yet fixed
    model_class = get_class_from_dynamic_module("modeling_moss.MossForCausalLM", str(folder))
    assert [fix.present(model_class) for fix in moss.MODEL_FIXES] == [True, True, True]
    assert apply_fixes(moss.MODEL_FIXES, model_class) == [fix.defect for fix in moss.MODEL_FIXES]
    assert not moss.MODEL_FIXES[0].present(model_class)  # get_head_mask is there now


def test_own_classes_load_weights_and_buffers_exactly(checkpoint, reference):
    from safetensors.torch import load_file

    assert type(reference).__name__ == "MossForCausalLM"
    saved = load_file(checkpoint / "model.safetensors")
    state = reference.state_dict()
    assert set(saved) == set(state)
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    size = 2048
    assert torch.equal(reference.transformer.h[0].attn.causal_mask[0, 0], torch.ones(size, size).tril().bool())

    logits = _logits(reference, *_batch())  # the forward rebuilds the tensors from_pretrained left on meta
    assert logits.shape == (2, 7, 107008) and torch.isfinite(logits).all()
    attention = reference.transformer.h[1].attn
    assert torch.allclose(attention.embed_positions, _sinusoid_table(size, 8), atol=1e-5)
    assert float(attention.scale_attn) == 4.0  # sqrt(head_dim 16)


def test_checkpoint_without_causal_mask_gets_the_lower_triangle(checkpoint, reference, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "moss-no-mask"
    shutil.copytree(checkpoint, folder)
    weights = load_file(checkpoint / "model.safetensors")
    kept = {name: tensor for name, tensor in weights.items() if not name.endswith("causal_mask")}
    assert len(kept) == len(weights) - 2  # one mask per layer
    (folder / "model.safetensors").chmod(0o644)
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})

    model = remote_model_class(str(folder), FAMILY).from_pretrained(str(folder), dtype=torch.float32).eval()
    for block in model.transformer.h:  # unfixed: all False, every token attends to the future
        assert torch.equal(block.attn.causal_mask, reference.transformer.h[0].attn.causal_mask)
    batch = _batch()
    assert (_logits(model, *batch) - _logits(reference, *batch)).abs().max() == 0


# (b) the native conversion ---------------------------------------------------------------------------------------

def test_quantised_checkpoints_are_refused_with_the_way_out():
    shipped = json.loads((REAL_CODE / "moss" / "config.json").read_text(encoding="utf-8"))
    assert shipped["wbits"] == 8
    with pytest.raises(UserError, match=r"GPTQ-quantised \(config.json wbits=8.*fnlp/moss-moon-003-sft"):
        moss.native_conversion(shipped)
    float_config = {key: value for key, value in shipped.items() if key not in ("wbits", "groupsize")}
    assert moss.native_conversion({**float_config, "wbits": 32}) is not None


def test_native_config_is_codegen_with_the_same_shape():
    from transformers import CodeGenConfig

    shipped = json.loads((REAL_CODE / "moss" / "config.json").read_text(encoding="utf-8"))
    del shipped["wbits"], shipped["groupsize"]
    conversion = moss.native_conversion(shipped)
    native = CodeGenConfig(**conversion.config(shipped))
    assert (native.n_embd, native.n_layer, native.n_head, native.rotary_dim) == (6144, 34, 24, 64)
    assert (native.n_positions, native.vocab_size, native.activation_function) == (2048, 107008, "gelu_new")
    assert native.tie_word_embeddings is False and native.layer_norm_epsilon == 1e-5
    assert (native.bos_token_id, native.eos_token_id) == (106028, 106068)
    assert conversion.tensors("transformer.h.3.attn.causal_mask", torch.ones(1), shipped) == {}
    weight = torch.zeros(3, 2)
    assert conversion.tensors("transformer.h.3.attn.qkv_proj.weight", weight, shipped) == {
        "transformer.h.3.attn.qkv_proj.weight": weight}


def test_converted_model_gives_the_reference_logits(native, reference):
    assert type(native).__name__ == "CodeGenForCausalLM"
    for name, tensor in [*native.named_parameters(), *native.named_buffers()]:
        assert torch.isfinite(tensor).all(), name
    input_ids, attention_mask = _batch()
    expected, logits = _logits(reference, input_ids, attention_mask), _logits(native, input_ids, attention_mask)
    real = attention_mask.bool()  # padded positions are never read (masked from loss and generation)
    difference = (logits - expected)[real].abs().max().item()
    assert difference <= MAX_DIFF
    assert difference <= 1e-4 * (expected[real].max() - expected[real].min()).item()
    # the padded row's real tokens give what the same tokens give unpadded: the mask is applied
    alone = _logits(native, input_ids[1:, 3:], attention_mask[1:, 3:])
    assert (alone[0] - logits[1, 3:]).abs().max() <= 1e-5


def test_second_load_reuses_the_converted_copy(checkpoint, monkeypatch, tmp_path):
    from alpaca_cot.remote import convert

    monkeypatch.setenv("ALPACA_COT_CACHE", str(tmp_path))
    first = load_model(str(checkpoint), FAMILY, torch.float32, trust_remote_code=True)
    converted = list((tmp_path / "converted").iterdir())
    assert len(converted) == 1 and converted[0].name.startswith("moss-")
    assert json.loads((converted[0] / "config.json").read_text())["model_type"] == "codegen"

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(convert, "_convert_weights", no_second_conversion)
    second = load_model(str(checkpoint), FAMILY, torch.float32, trust_remote_code=True)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# (c) generation with the KV cache --------------------------------------------------------------------------------

def _greedy(model, input_ids, attention_mask, use_cache=True, new_tokens=6):
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache, pad_token_id=PAD)
    return output[:, input_ids.shape[1]:]


def test_generation_uses_the_cache_and_matches_recomputing(native):
    prompt = torch.tensor([[11, 2003, 57, 901, 4400]])
    lengths = []
    hook = native.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        cached = _greedy(native, prompt, torch.ones_like(prompt))
    finally:
        hook.remove()
    assert lengths == [5, 1, 1, 1, 1, 1]
    assert torch.equal(cached, _greedy(native, prompt, torch.ones_like(prompt), use_cache=False))


def test_left_padded_batch_generates_what_each_prompt_does_alone(native):
    prompts = [[11, 2003, 57, 901, 4400], [731, 88, 15020]]
    input_ids = torch.tensor([prompts[0], [PAD, PAD, *prompts[1]]])
    attention_mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    batched = _greedy(native, input_ids, attention_mask)
    for row, prompt in enumerate(prompts):
        alone = torch.tensor([prompt])
        assert batched[row].tolist() == _greedy(native, alone, torch.ones_like(alone))[0].tolist()


# (d) LoRA training, merging, saving --------------------------------------------------------------------------------

def test_lora_on_default_targets_trains_merges_and_reloads_natively(checkpoint, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    monkeypatch.setenv("ALPACA_COT_CACHE", str(tmp_path / "cache"))
    model = load_model(str(checkpoint), FAMILY, torch.float32, trust_remote_code=True)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(FAMILY.lora_targets))
    model = get_peft_model(model, config)
    adapted = sorted(name for name, module in model.named_modules() if hasattr(module, "lora_A"))
    assert adapted == [f"base_model.model.transformer.h.{i}.attn.qkv_proj" for i in range(2)]

    input_ids, attention_mask = _batch()
    losses = adamw_losses(model, input_ids, attention_mask)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses


    model.eval()
    adapter_logits = _logits(model, input_ids, attention_mask)
    with model.disable_adapter():
        base_logits = _logits(model, input_ids, attention_mask)
    assert (adapter_logits - base_logits).abs().max() > 10 * MAX_DIFF  # the merge checks below can fail
    merged = model.merge_and_unload()
    real = attention_mask.bool()
    assert (_logits(merged, input_ids, attention_mask) - adapter_logits)[real].abs().max() <= MAX_DIFF
    merged.save_pretrained(tmp_path / "merged")
    reloaded = load_model(str(tmp_path / "merged"), FAMILY, torch.float32, trust_remote_code=True).eval()
    assert type(reloaded).__name__ == "CodeGenForCausalLM"
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 1  # the merged copy loads as it is
    assert (_logits(reloaded, input_ids, attention_mask) - adapter_logits)[real].abs().max() <= MAX_DIFF
