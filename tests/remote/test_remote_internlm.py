"""InternLM and InternLM2 under transformers 5, on tiny checkpoints of the real upstream files (../shared/remote_code):
both convert once to a native LlamaForCausalLM, checked against the checkpoints' own classes (fixed in memory);
checkpoints whose RoPE LLaMA cannot express (dynamic NTK) keep those fixed classes."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from alpaca_cot.errors import UserError
from alpaca_cot.models import FAMILIES
from alpaca_cot.remote import internlm, internlm2
from tests import real_checkpoints
from tests.real_checkpoints import (
    adamw_losses,
    build_real_checkpoint,
    loaded_model,
    needs_real_code,
    own_code_model,
)

pytestmark = needs_real_code
needs_einops = pytest.mark.skipif(importlib.util.find_spec("einops") is None,
                                  reason="InternLM2's own modelling code imports einops (pip install einops)")

NAMES = ("internlm", "internlm2")
SUPPORT = {"internlm": internlm, "internlm2": internlm2}
ROPE_BASE = {"internlm": 10000.0, "internlm2": 1e6}  # v1's code hard-codes its base; internlm2-chat-7b: 1e6
PROMPTS = ([5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15])  # token ids; a batch left-pads the second with pad id 2
PAD = 2
# variants built from the same real files with config.json edits: biases on q/k/v/o; MQA (one KV head: the
# whole wqkv group is 4 queries + k + v) with linear RoPE scaling; dynamic NTK RoPE, which stays remote code
# (InternLM v1's code here ignores the later revision's `rotary` key: the config alone decides the path)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "internlm-bias": ("internlm", {"bias": True}),
    "internlm2-bias-mqa-linear": ("internlm2", {"bias": True, "num_key_value_heads": 1,
                                                "rope_scaling": {"type": "linear", "factor": 2.0}}),
    "internlm2-dynamic": ("internlm2", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}),
    "internlm-dynamic": ("internlm", {"rotary": {"base": 10000, "type": "dynamic"}}),
}


def _build(family: str, folder: Path, edits: dict[str, Any]) -> Path:
    """build_real_checkpoint with ``edits`` on top of the tiny config (the model is built from the edited one)."""
    copy = real_checkpoints.copy_real_files

    def copy_with_edits(name: str, target: Path) -> Path:
        copy(name, target)
        config = json.loads((target / "config.json").read_text(encoding="utf-8"))
        (target / "config.json").write_text(json.dumps({**config, **edits}, indent=2), encoding="utf-8")
        return target

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(real_checkpoints, "copy_real_files", copy_with_edits)
        return build_real_checkpoint(family, folder)


class _Checkpoints(dict):
    """Tiny checkpoints by name, each built on first use (the InternLM2 ones need einops)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Path:
        family, edits = VARIANTS.get(name, (name, {}))
        self[name] = _build(family, self.root / name, edits) if edits else build_real_checkpoint(name, self.root / name)
        return self[name]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _Checkpoints(tmp_path_factory.mktemp("internlm"))


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ALPACA_COT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _family(checkpoint: str) -> str:
    return VARIANTS[checkpoint][0] if checkpoint in VARIANTS else checkpoint


def _cases(*checkpoints: str) -> list[Any]:
    return [pytest.param(name, marks=needs_einops) if _family(name) == "internlm2" else name for name in checkpoints]


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(prompt) for prompt in PROMPTS)
    ids = torch.tensor([[PAD] * (width - len(p)) + list(p) for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    return ids, mask


def _assert_all_finite(model: torch.nn.Module) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert not tensor.is_meta and torch.isfinite(tensor).all(), name


def _logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()


def _assert_same_logits(first: torch.Tensor, second: torch.Tensor, mask: torch.Tensor) -> float:
    """Max abs difference on real tokens (padded positions attend to nothing real: implementation noise).

    Random std-0.02 weights give logits of about 0.02, so the difference is also held to 1e-5 of their size:
    a q/k/v split in the wrong head order differs by about 6e-4, which 1e-4 alone would barely see."""
    difference = (first - second).abs()[mask.bool()].max().item()
    assert difference <= 1e-4 and difference <= 1e-5 * first.abs().max().item(), difference
    return difference


# (a) the checkpoints' own classes load, with true rotary buffers, and run under transformers 5 ---------------------

@pytest.mark.parametrize("name", _cases(*NAMES))
def test_own_classes_load_true_rotary_buffers_and_run(checkpoints: dict[str, Path], name: str) -> None:
    from safetensors.torch import load_file

    model = own_code_model(checkpoints[name], name)
    saved = load_file(checkpoints[name] / "model.safetensors")
    assert all(torch.equal(model.state_dict()[key], value) for key, value in saved.items())
    built_in_memory = type(model)(model.config)  # its own __init__ computes the buffers
    buffers = dict(model.named_buffers())
    assert buffers.keys() == dict(built_in_memory.named_buffers()).keys() and buffers
    for key, value in built_in_memory.named_buffers():
        assert torch.equal(buffers[key], value), key  # transformers 5 left them as torch.empty garbage
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    expected = 1.0 / ROPE_BASE[name] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    inv_freqs = [value for key, value in buffers.items() if key.endswith("inv_freq")]
    assert len(inv_freqs) == model.config.num_hidden_layers
    assert all(torch.allclose(value, expected) for value in inv_freqs)
    _assert_all_finite(model)
    ids, mask = _padded_batch()
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
    assert output.logits.shape == (2, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(output.logits).all()
    assert abs(output.loss.item() - math.log(model.config.vocab_size)) < 0.1  # random weights: near uniform


# (b) the native conversion: LlamaForCausalLM with the same logits, converted once --------------------------------

@pytest.mark.parametrize("checkpoint", _cases("internlm", "internlm2", "internlm-bias", "internlm2-bias-mqa-linear"))
def test_converted_llama_gives_the_logits_of_the_own_classes(
        checkpoints: dict[str, Path], cache_root: Path, monkeypatch: pytest.MonkeyPatch, checkpoint: str) -> None:
    from transformers import LlamaForCausalLM

    from alpaca_cot.remote import convert

    family, folder = _family(checkpoint), checkpoints[checkpoint]
    reference = own_code_model(folder, family)
    converted = loaded_model(folder, family)
    assert type(converted) is LlamaForCausalLM
    _assert_all_finite(converted)
    bias = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("bias", False)
    attention = converted.model.layers[0].self_attn
    assert all((getattr(attention, proj).bias is not None) == bias for proj in ("q_proj", "k_proj", "v_proj", "o_proj"))
    ids, mask = _padded_batch()
    difference = _assert_same_logits(_logits(reference, ids, mask), _logits(converted, ids, mask), mask)
    print(f"{checkpoint}: max |logit difference| converted vs own classes = {difference:.3g}")

    monkeypatch.setattr(convert, "_convert_weights", lambda *args: pytest.fail("converted a second time"))
    again = loaded_model(folder, family)
    assert len(list((cache_root / "converted").iterdir())) == 1
    assert torch.equal(_logits(again, ids, mask), _logits(converted, ids, mask))


def test_native_conversion_declines_what_llama_cannot_express() -> None:
    plain = {"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 10000.0, "rope_scaling": None}
    assert internlm.native_conversion(plain).config(plain)["rope_parameters"]["rope_theta"] == 10000.0
    origin = {**plain, "rotary": {"base": 50000, "type": "origin"}}
    assert internlm.native_conversion(origin).config(origin)["rope_parameters"]["rope_theta"] == 50000.0
    assert internlm.native_conversion({**plain, "rotary": {"base": 10000, "type": "dynamic"}}) is None
    assert internlm.native_conversion({**plain, "rope_theta": 5e5}) is None  # v1 code would ignore it
    v1 = internlm.native_conversion(plain).config({**plain, "num_key_value_heads": 1, "bias": True})
    assert v1["num_key_value_heads"] == 4 and v1["attention_bias"] is True  # v1 ignores num_key_value_heads

    config2 = {**plain, "rope_theta": 1e6, "num_key_value_heads": 2}
    assert internlm2.native_conversion(config2).config(config2)["rope_parameters"] == {
        "rope_type": "default", "rope_theta": 1e6}
    linear = {**config2, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert internlm2.native_conversion(linear).config(linear)["rope_parameters"] == {
        "rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    assert internlm2.native_conversion({**config2, "rope_scaling": {"type": "dynamic", "factor": 2.0}}) is None
    with pytest.raises(UserError, match="has no LLaMA counterpart"):
        internlm2.native_conversion(config2).tensors("model.layers.0.attention.extra.weight", None, config2)


def test_wqkv_split_follows_the_grouped_layout() -> None:
    config = {"hidden_size": 8, "num_attention_heads": 4, "num_key_value_heads": 2}  # head size 2, 2 queries a group
    rows = torch.arange(16).repeat_interleave(2).reshape(16, 2)  # 8 heads of 2 rows: q0 q1 k0 v0 q2 q3 k1 v1
    q, k, v = internlm2.split_wqkv(rows, config)
    assert q[:, 0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert k[:, 0].tolist() == [4, 5, 12, 13] and v[:, 0].tolist() == [6, 7, 14, 15]


@pytest.mark.parametrize("checkpoint", _cases("internlm-dynamic", "internlm2-dynamic"))
def test_dynamic_rope_checkpoints_keep_their_fixed_own_classes(
        checkpoints: dict[str, Path], cache_root: Path, checkpoint: str) -> None:
    family, folder = _family(checkpoint), checkpoints[checkpoint]
    model = loaded_model(folder, family)
    assert type(model).__module__.startswith("transformers_modules.")
    assert not (cache_root / "converted").exists()
    _assert_all_finite(model)


# (c) generation with the KV cache ---------------------------------------------------------------------------------

def _generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool = True) -> list:
    output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                            use_cache=use_cache, pad_token_id=PAD, eos_token_id=None)
    return output[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("checkpoint", _cases("internlm", "internlm2", "internlm-dynamic", "internlm2-dynamic"))
def test_generate_uses_the_kv_cache(checkpoints: dict[str, Path], cache_root: Path, checkpoint: str) -> None:
    model = loaded_model(checkpoints[checkpoint], _family(checkpoint))
    lengths: list[int] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    single = torch.tensor([PROMPTS[0]])
    cached = _generate(model, single, torch.ones_like(single))
    assert lengths == [len(PROMPTS[0])] + [1] * 5  # after the prompt, one new token a step
    lengths.clear()
    assert _generate(model, single, torch.ones_like(single), use_cache=False) == cached
    assert lengths == [len(PROMPTS[0]) + step for step in range(6)]
    ids, mask = _padded_batch()
    alone = [_generate(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long))[0] for p in PROMPTS]
    assert _generate(model, ids, mask) == alone


# (d) training: LoRA on the family's default targets, merge, save, reload ----------------------------------------

def _lora_targets(family: str, model: torch.nn.Module) -> list[str]:
    """The row's LoRA targets on the loaded model: on a converted one, fused upstream names (InternLM2's wqkv)
    become LLaMA's; the own classes keep them."""
    names = SUPPORT[family].UPSTREAM_MODULE_NAMES if type(model).__name__ == "LlamaForCausalLM" else {}
    return list(dict.fromkeys(target for name in FAMILIES[family].lora_targets for target in names.get(name, (name,))))


@pytest.mark.parametrize("checkpoint", _cases("internlm", "internlm2", "internlm2-dynamic"))
def test_lora_trains_merges_and_reloads(
        checkpoints: dict[str, Path], cache_root: Path, tmp_path: Path, checkpoint: str) -> None:
    from peft import LoraConfig, get_peft_model

    family, folder = _family(checkpoint), checkpoints[checkpoint]
    model = loaded_model(folder, family)
    targets = _lora_targets(family, model)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets))
    wrapped = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in peft_model.named_parameters()
               if ".lora_A" in name}
    assert wrapped == set(targets)
    ids, mask = _padded_batch()
    losses = adamw_losses(peft_model, ids, mask, use_cache=False)
    # random std-0.02 weights keep every activation small: the loss starts at ln(vocab) and moves little
    assert all(math.isfinite(value) for value in losses), losses
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])) and losses[-1] < losses[0] - 1e-3, losses
    peft_model.eval()
    adapted = _logits(peft_model, ids, mask)
    merged = peft_model.merge_and_unload()
    _assert_same_logits(adapted, _logits(merged, ids, mask), mask)
    merged.save_pretrained(tmp_path / "merged")
    if checkpoint in VARIANTS:  # own classes: reloaded with them, from the saved copy of the code
        reloaded = own_code_model(tmp_path / "merged", family)
    else:
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        assert type(reloaded).__name__ == "LlamaForCausalLM"
    _assert_same_logits(adapted, _logits(reloaded, ids, mask), mask)
