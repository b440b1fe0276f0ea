"""ChatGLM2-6B and ChatGLM3-6B under transformers 5: their own classes fixed in memory, and the one-time conversion
to native GlmForCausalLM, checked against each other on tiny checkpoints built from the real upstream files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.real_checkpoints import REAL_CODE, adamw_losses, build_real_checkpoint, copy_real_files, needs_real_code

pytestmark = needs_real_code
torch = pytest.importorskip("torch")

FAMILIES_UNDER_TEST = ("chatglm2", "chatglm3")
LOGIT_TOLERANCE = 1e-4
PAD_ID = 0  # ChatGLM2/3 tokenizers pad with id 0, on the left


def _sharpen(folder: Path, seed: int = 1) -> None:
    """Norm weights near 1 and projections 10x larger than the builder's std 0.02, so logits span several units:
    a wrong conversion then shows as a difference of the logits' own size, and greedy picks have clear margins."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in weights.items():
        if "layernorm" in name:
            weights[name] = 1 + 0.1 * torch.randn(tensor.shape, generator=generator)
        elif "inv_freq" not in name:
            weights[name] = tensor * 10
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module", params=FAMILIES_UNDER_TEST)
def checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    family = request.param
    folder = build_real_checkpoint(family, tmp_path_factory.mktemp(f"real-{family}") / family)
    _sharpen(folder)
    return family, folder


def _family(name: str):
    from alpaca_cot.models import FAMILIES

    return FAMILIES[name]


def _remote_model(family: str, folder: Path):
    from alpaca_cot.remote import remote_model_class

    return remote_model_class(str(folder), _family(family)).from_pretrained(str(folder), dtype=torch.float32).eval()


def _native_model(family: str, folder: Path):
    from alpaca_cot.models import load_model

    return load_model(str(folder), _family(family), torch.float32, trust_remote_code=True).eval()


def _padded_batch() -> tuple:
    """Two rows of 7 tokens, the second left-padded by 3."""
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(5, 65000, (2, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :3], attention_mask[1, :3] = PAD_ID, 0
    return input_ids, attention_mask


def _logits(model, input_ids, attention_mask):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


def _real_positions_diff(left, right, attention_mask) -> float:
    """Max |difference| over the non-pad positions (what a pad position attends to is the model's own business)."""
    keep = attention_mask.bool()
    return (left[keep] - right[keep]).abs().max().item()


def _assert_all_finite(model) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name


# --- (a) the checkpoint's own classes, fixed in memory ---

def test_fixed_remote_classes_load_weights_and_buffers_and_run_forward(checkpoint):
    from safetensors.torch import load_file

    family, folder = checkpoint
    model = _remote_model(family, folder)
    saved = load_file(folder / "model.safetensors")
    state = model.state_dict()
    assert set(saved) == set(state)
    for name, tensor in saved.items():  # weights AND buffers (rotary inv_freq) come back as saved
        assert torch.equal(state[name], tensor), name
    head_dim_half = json.loads((folder / "config.json").read_text())["kv_channels"] // 2
    expected_inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim_half, 2).float() / head_dim_half)
    # saved in the config's float16 (upstream only reads the buffer's dtype and device)
    assert torch.allclose(state["transformer.rotary_pos_emb.inv_freq"], expected_inv_freq, rtol=1e-3)
    _assert_all_finite(model)
    logits = _logits(model, *_padded_batch())
    assert logits.shape == (2, 7, 65024)
    assert torch.isfinite(logits).all() and logits.std() > 0.5  # sharpened weights: real spread, not ~0


# --- (b) native conversion: logits equal the fixed remote model's, the converted copy is cached ---

def test_converted_model_gives_the_remote_logits_and_is_reused(checkpoint, tmp_path, monkeypatch):
    from alpaca_cot.remote import convert

    family, folder = checkpoint
    monkeypatch.setenv("ALPACA_COT_CACHE", str(tmp_path / "cache"))
    conversions = []
    real_convert = convert._convert_weights
    monkeypatch.setattr(convert, "_convert_weights", lambda *a: conversions.append(a) or real_convert(*a))

    native = _native_model(family, folder)
    assert type(native).__name__ == "GlmForCausalLM"
    assert type(native).__module__ == "transformers.models.glm.modeling_glm"  # no remote code runs
    _assert_all_finite(native)
    remote = _remote_model(family, folder)
    input_ids, attention_mask = _padded_batch()
    expected = _logits(remote, input_ids, attention_mask)
    diff = _real_positions_diff(_logits(native, input_ids, attention_mask), expected, attention_mask)
    assert diff <= LOGIT_TOLERANCE, diff
    assert expected.abs().max() > 1.0  # the tolerance is small against the logits' scale

    again = _native_model(family, folder)
    assert len(conversions) == 1, "the second load converted again instead of reusing the cached copy"
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 1
    assert _real_positions_diff(_logits(again, input_ids, attention_mask), expected, attention_mask) <= LOGIT_TOLERANCE


def test_every_converted_tensor_is_the_remote_tensor_renamed(checkpoint, tmp_path, monkeypatch):
    from alpaca_cot.remote.glm2 import UPSTREAM_MODULE_NAMES, _native_tensors

    family, folder = checkpoint
    monkeypatch.setenv("ALPACA_COT_CACHE", str(tmp_path / "cache"))
    native_state = _native_model(family, folder).state_dict()
    remote = _remote_model(family, folder)
    config = json.loads((folder / "config.json").read_text())
    covered = set()
    for name, tensor in remote.state_dict().items():
        for native_name, value in _native_tensors(name, tensor, config).items():
            assert torch.equal(native_state[native_name], value), native_name
            covered.add(native_name)
    assert covered == set(native_state), set(native_state) ^ covered
    native_linear = {name.rsplit(".", 1)[-1] for name, m in remote.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(UPSTREAM_MODULE_NAMES) == native_linear - {"output_layer"}


def _build_variant(family: str, folder: Path, **edits) -> Path:
    """A tiny checkpoint of ``family`` with config.json edited (the builder keeps the shipped config)."""
    from alpaca_cot.remote import remote_model_class

    copy_real_files(family, folder)
    config_file = folder / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **edits}, indent=2))
    shipped = config_file.read_text()
    cls = remote_model_class(str(folder), _family(family))
    torch.manual_seed(0)
    model = cls(cls.config_class.from_pretrained(folder))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    config_file.write_text(shipped)
    for code in folder.glob("*.py"):
        shutil.copy(REAL_CODE / family / code.name, code)  # save_pretrained may rewrite code files
    _sharpen(folder)
    return folder


def test_conversion_without_multi_query_attention_splits_per_head_qkv(tmp_path, monkeypatch):
    """Without multi-query attention ChatGLM lays q, k, v out per head; the converted model still agrees."""
    folder = _build_variant("chatglm3", tmp_path / "chatglm3", multi_query_attention=False)
    monkeypatch.setenv("ALPACA_COT_CACHE", str(tmp_path / "cache"))
    native = _native_model("chatglm3", folder)
    assert native.config.num_key_value_heads == native.config.num_attention_heads == 4
    input_ids, attention_mask = _padded_batch()
    expected = _logits(_remote_model("chatglm3", folder), input_ids, attention_mask)
    diff = _real_positions_diff(_logits(native, input_ids, attention_mask), expected, attention_mask)
    assert diff <= LOGIT_TOLERANCE, diff


def test_native_config_maps_rope_ratio_and_declines_inexact_checkpoints():
    from alpaca_cot.remote.glm2 import native_conversion

    shipped = json.loads((REAL_CODE / "chatglm3" / "config.json").read_text())
    conversion = native_conversion(shipped)
    native = conversion.config(shipped)
    assert native["model_type"] == "glm" and native["head_dim"] == 128 and native["num_key_value_heads"] == 2
    assert native["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    assert native["vocab_size"] == 65024 and native["intermediate_size"] == 13696 and native["attention_bias"]
    assert conversion.config({**shipped, "rope_ratio": 50})["rope_parameters"]["rope_theta"] == 500000.0  # 32k
    # keys config.json leaves out take ChatGLMConfig's defaults (kv_channels 128, no qkv bias), as upstream does
    sparse = conversion.config({k: v for k, v in shipped.items() if k not in ("kv_channels", "add_qkv_bias")})
    assert sparse["head_dim"] == 128 and sparse["attention_bias"] is False
    for inexact in ({"pre_seq_len": 128}, {"quantization_bit": 4}, {"rmsnorm": False}, {"post_layer_norm": False},
                    {"apply_residual_connection_post_layernorm": True}, {"add_bias_linear": True},
                    {"fp32_residual_connection": True}, {"hidden_dropout": 0.1}, {"kv_channels": 130},
                    {"multi_query_group_num": 3}, {"kv_channels": None}):
        assert native_conversion({**shipped, **inexact}) is None, inexact
    assert native_conversion({k: v for k, v in shipped.items() if k != "multi_query_attention"}) is None  # ChatGLM-6B


# --- (c) generation with the KV cache, converted and fixed-remote ---

@pytest.fixture(params=("native", "remote"))
def generating_model(request, checkpoint, tmp_path, monkeypatch):
    family, folder = checkpoint
    monkeypatch.setenv("ALPACA_COT_CACHE", str(tmp_path / "cache"))
    return _native_model(family, folder) if request.param == "native" else _remote_model(family, folder)


def _greedy(model, input_ids, attention_mask=None, **kwargs):
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6,
                                do_sample=False, pad_token_id=PAD_ID, eos_token_id=None, **kwargs)
    return output[:, input_ids.shape[1]:]


def test_generation_uses_the_cache_and_matches_uncached_and_unbatched(generating_model):
    model = generating_model
    fed = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    generator = torch.Generator().manual_seed(3)
    long_prompt = torch.randint(5, 65000, (1, 6), generator=generator)
    short_prompt = torch.randint(5, 65000, (1, 3), generator=generator)
    cached = _greedy(model, long_prompt)
    assert fed == [6, 1, 1, 1, 1, 1], fed  # after the prompt, every step feeds only the new token
    fed.clear()
    assert torch.equal(_greedy(model, long_prompt, use_cache=False), cached)
    assert fed == [6, 7, 8, 9, 10, 11], fed
    hook.remove()

    batch = torch.cat([long_prompt, torch.cat([torch.full((1, 3), PAD_ID), short_prompt], dim=1)])
    batch_mask = torch.ones_like(batch)
    batch_mask[1, :3] = 0
    batched = _greedy(model, batch, batch_mask)
    assert batched[0].tolist() == cached[0].tolist()
    assert batched[1].tolist() == _greedy(model, short_prompt)[0].tolist()


# --- (d) LoRA training, merge, save and reload ---

def _train_lora(model, targets: list[str]) -> tuple:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                  task_type="CAUSAL_LM"))
    losses = adamw_losses(peft_model, *_padded_batch())
    return peft_model.eval(), losses


@pytest.mark.parametrize("path", ["native", "remote"])
def test_lora_trains_merges_and_reloads(checkpoint, path, tmp_path, monkeypatch):
    from alpaca_cot.remote.glm2 import UPSTREAM_MODULE_NAMES

    family, folder = checkpoint
    monkeypatch.setenv("ALPACA_COT_CACHE", str(tmp_path / "cache"))
    if path == "native":
        model, targets = _native_model(family, folder), list(UPSTREAM_MODULE_NAMES["query_key_value"])
    else:
        model, targets = _remote_model(family, folder), ["query_key_value"]  # the family's default target
    peft_model, losses = _train_lora(model, targets)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 0.5, losses

    input_ids, attention_mask = _padded_batch()
    adapted = _logits(peft_model, input_ids, attention_mask)
    merged = peft_model.merge_and_unload()
    assert _real_positions_diff(_logits(merged, input_ids, attention_mask), adapted, attention_mask) <= 1e-4
    merged.save_pretrained(tmp_path / "merged")
    if path == "native":
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        assert type(reloaded).__name__ == "GlmForCausalLM"
    else:  # the checkpoint's own class reads the merged weights
        from alpaca_cot.remote import remote_model_class

        cls = remote_model_class(str(folder), _family(family))
        reloaded = cls.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    diff = _real_positions_diff(_logits(reloaded.eval(), input_ids, attention_mask), adapted, attention_mask)
    assert diff <= 1e-4, diff
