"""ChatGLM-6B (GLM v1) under transformers 5: the checkpoint's own classes with alpaca_cot.remote.chatglm's in-memory
fixes, on a tiny random-weight checkpoint built from the real upstream files (../shared/remote_code/chatglm).

GLM v1 has no native equivalent, so there is no conversion: these are the product path's tests. Prompts are built
as the official tokenizer builds them (``... [gMASK] <sop>``) from config.json's ids, since the tokenizer is not
needed to test the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.real_checkpoints import REAL_CODE, build_real_checkpoint, needs_real_code

pytestmark = needs_real_code


def _ids() -> dict[str, int]:
    config = json.loads((REAL_CODE / "chatglm" / "config.json").read_text(encoding="utf-8"))
    return {name: config[f"{name}_token_id"] for name in ("bos", "eos", "mask", "gmask", "pad")}


def _prompt(*tokens: int) -> list[int]:
    """Ordinary tokens, then [gMASK] <sop>, as the official tokenizer ends every prompt."""
    ids = _ids()
    return [*tokens, ids["gmask"], ids["bos"]]


def _family():
    from alpaca_cot.models import FAMILIES

    return FAMILIES["chatglm"]


def _liven(folder: Path) -> None:
    """Weights large enough that greedy tokens depend on the prompt (LayerNorms at identity, std 0.2): at the
    builder's std 0.02 every prompt yields the same token, which would let a broken mask or cache pass."""
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(1)
    tensors = load_file(folder / "model.safetensors")
    for name, tensor in tensors.items():
        if "layernorm" in name:
            tensors[name] = torch.full_like(tensor, 1.0 if name.endswith("weight") else 0.0)
        elif "inv_freq" not in name:
            tensors[name] = (torch.randn(tensor.shape, generator=generator) * 0.2).to(tensor.dtype)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = build_real_checkpoint("chatglm", tmp_path_factory.mktemp("chatglm") / "checkpoint")
    _liven(folder)
    return folder


def _load(folder: Path, dtype=None):
    from alpaca_cot.models import load_model

    return load_model(str(folder), _family(), dtype or torch.float32, trust_remote_code=True)


@pytest.fixture(scope="module")
def model(checkpoint: Path):
    return _load(checkpoint).eval()


def _logits(model, ids: list[list[int]], mask: list[list[int]] | None = None):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask)).logits


# ----------------------------------------------------------------------------------------------- (a), (b) loading


def test_every_fix_cures_what_its_probe_finds(checkpoint: Path) -> None:
    from alpaca_cot.remote import remote_model_class
    from alpaca_cot.remote.chatglm import MODEL_FIXES

    cls = remote_model_class(str(checkpoint), _family())
    assert set(cls._alpaca_cot_fixed) == {fix.defect for fix in MODEL_FIXES}
    assert [fix.defect for fix in MODEL_FIXES if fix.present(cls)] == []


def test_loads_every_weight_and_buffer_of_the_checkpoint(checkpoint: Path, model) -> None:
    from safetensors.torch import load_file

    from alpaca_cot.models import read_model_config
    from alpaca_cot.remote.chatglm import native_conversion

    assert native_conversion(read_model_config(str(checkpoint))) is None
    saved = load_file(checkpoint / "model.safetensors")
    loaded = model.state_dict()
    assert set(saved) == set(loaded)
    for name, tensor in saved.items():
        assert loaded[name].dtype == torch.float32, name  # asked for float32: no float16 left behind
        assert torch.equal(loaded[name], tensor.float()), name
    assert all(torch.isfinite(t).all() for t in [*model.parameters(), *model.buffers()])
    assert "transformer.layers.0.attention.rotary_emb.inv_freq" in saved
    logits = _logits(model, [_prompt(5, 6, 7)])
    assert logits.shape == (1, 5, 130528) and torch.isfinite(logits).all()


def test_rotary_frequencies_missing_from_the_checkpoint_are_computed(checkpoint: Path, model,
                                                                     tmp_path: Path) -> None:
    """transformers 5 hands a buffer missing from the file to _init_weights, which upstream leaves empty."""
    from safetensors.torch import load_file, save_file

    stripped = tmp_path / "no_inv_freq"
    shutil.copytree(checkpoint, stripped)
    tensors = {k: v for k, v in load_file(stripped / "model.safetensors").items() if "inv_freq" not in k}
    save_file(tensors, stripped / "model.safetensors", metadata={"format": "pt"})
    reloaded = _load(stripped).eval()
    dim = 64 // 4 // 2  # hidden / heads / 2 position streams
    expected = (1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)).half().float()
    for layer in reloaded.transformer.layers:
        assert torch.equal(layer.attention.rotary_emb.inv_freq, expected)
    prompt = [_prompt(5, 6, 7, 8)]
    assert torch.equal(_logits(reloaded, prompt), _logits(model, prompt))


def test_bfloat16_rotary_table_keeps_positions_apart(checkpoint: Path) -> None:
    """Upstream counts positions in the model's dtype: in bfloat16, 256 and 257 were one position."""
    half = _load(checkpoint, torch.bfloat16)
    rotary = half.transformer.layers[0].attention.rotary_emb
    assert rotary.inv_freq.dtype == torch.bfloat16
    cos, sin = rotary(torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16), seq_len=300)
    assert cos.dtype == torch.bfloat16 and not torch.equal(cos[256], cos[257])
    angles = torch.arange(300).float()[:, None] * rotary.inv_freq.float()[None]
    exact = torch.cat([angles, angles], -1)[:, None, :]
    assert (cos.float() - exact.cos()).abs().max() < 4e-3 and (sin.float() - exact.sin()).abs().max() < 4e-3


# ----------------------------------------------------------------------------------------------- GLM layout


def test_layout_equals_the_models_own_for_unpadded_prompts(model) -> None:
    from alpaca_cot.remote.chatglm import glm_layout

    ids = _ids()
    prompts = [_prompt(5, 6, 7, 8), [5, ids["mask"], 7, ids["bos"], 11, 12], [5, ids["gmask"], 7, ids["mask"],
                                                                              ids["bos"], 9]]
    for prompt in prompts:
        tokens = torch.tensor([prompt])
        mask_token = ids["gmask"] if ids["gmask"] in prompt else ids["mask"]
        upstream_positions = model.get_position_ids(tokens, mask_positions=[prompt.index(mask_token)],
                                                    device="cpu", use_gmasks=[mask_token == ids["gmask"]])
        mask, positions = glm_layout(tokens, None, model.config)
        assert torch.equal(mask, model.get_masks(tokens, "cpu")), prompt
        assert torch.equal(positions, upstream_positions), prompt


def test_padding_on_either_side_leaves_each_rows_logits_alone(model) -> None:
    """A 2D padding mask (what the collator and generate pass) keeps pads out and numbers positions over the
    real tokens: upstream took it for its own 4D mask."""
    pad = _ids()["pad"]
    short, long = _prompt(9, 10) + [40, 41], _prompt(5, 6, 7, 8) + [30, 31, 32]
    alone_short, alone_long = _logits(model, [short])[0], _logits(model, [long])[0]
    gap = len(long) - len(short)
    right = _logits(model, [long, short + [pad] * gap], [[1] * len(long), [1] * len(short) + [0] * gap])
    left = _logits(model, [long, [pad] * gap + short], [[1] * len(long), [0] * gap + [1] * len(short)])
    assert (right[0] - alone_long).abs().max() < 1e-5 and (left[0] - alone_long).abs().max() < 1e-5
    assert (right[1, :len(short)] - alone_short).abs().max() < 1e-5
    assert (left[1, gap:] - alone_short).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------- (c) generation


def _generate(model, rows: list[list[int]], mask: list[list[int]] | None = None, **options) -> list[list[int]]:
    tokens = torch.tensor(rows)
    masks = torch.tensor(mask) if mask is not None else torch.ones_like(tokens)
    output = model.generate(input_ids=tokens, attention_mask=masks, max_new_tokens=6, do_sample=False, **options)
    return output[:, tokens.shape[1]:].tolist()


def _input_lengths(model, call):
    """What ``call()`` returns, and the number of tokens each forward of the GLM stack was given."""
    lengths: list[int] = []

    def record(module, args, kwargs):
        lengths.append(kwargs["input_ids"].shape[1])

    hook = model.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        return call(), lengths
    finally:
        hook.remove()


def test_generate_feeds_one_new_token_per_step_from_the_cache(model) -> None:
    prompt = _prompt(5, 6, 7, 8)
    cached, cached_lengths = _input_lengths(model, lambda: _generate(model, [prompt]))
    uncached, uncached_lengths = _input_lengths(model, lambda: _generate(model, [prompt], use_cache=False))
    assert cached_lengths == [len(prompt)] + [1] * 5
    assert uncached_lengths == list(range(len(prompt), len(prompt) + 6))
    assert cached == uncached
    assert len(set(cached[0])) > 1  # not one token repeated: the comparison can fail
    beams = _generate(model, [prompt], num_beams=2)  # beam search reorders the Cache, not upstream's tuples
    assert beams == _generate(model, [prompt], num_beams=2, use_cache=False)


def test_left_padded_batch_generates_what_each_prompt_generates_alone(model) -> None:
    pad = _ids()["pad"]
    long, short = _prompt(5, 6, 7, 8), _prompt(9, 10)
    alone = [_generate(model, [long])[0], _generate(model, [short])[0]]
    assert alone[0] != alone[1]
    batch, lengths = _input_lengths(model, lambda: _generate(model, [long, [pad, pad] + short],
                                                             [[1] * 6, [0, 0, 1, 1, 1, 1]]))
    assert batch == alone
    assert lengths == [6] + [1] * 5


# ----------------------------------------------------------------------------------------------- (d) training


def _training_batch() -> dict:
    """Two rows of prompt then answer after <sop>, right-padded as the training collator pads; labels cover the
    answer (<sop> on) only."""
    ids = _ids()
    rows = [_prompt(5, 6, 7) + [20, 21, 22, ids["eos"]], _prompt(9, 10) + [30, 31, ids["eos"]]]
    width = max(map(len, rows))
    start = [row.index(ids["bos"]) for row in rows]
    return {
        "input_ids": torch.tensor([row + [ids["pad"]] * (width - len(row)) for row in rows]),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
        "labels": torch.tensor([[-100] * s + row[s:] + [-100] * (width - len(row)) for s, row in zip(start, rows)]),
    }


def _lora_model(checkpoint: Path, checkpointing: bool = False):
    from peft import LoraConfig, get_peft_model

    base = _load(checkpoint)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    torch.manual_seed(0)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                        target_modules=list(_family().lora_targets))
    return get_peft_model(base, config)


def _train(model, steps: int = 5) -> tuple[list[float], list]:
    """Losses of ``steps`` AdamW steps on one batch, and the first step's adapter gradients."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses, first_gradients = [], []
    for step in range(steps):
        loss = model(**_training_batch()).loss
        loss.backward()
        if step == 0:
            first_gradients = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, first_gradients


@pytest.fixture(scope="module")
def trained(checkpoint: Path):
    model = _lora_model(checkpoint)
    losses, _ = _train(model)
    return model.eval(), losses


def test_lora_on_query_key_value_trains(trained) -> None:
    model, losses = trained
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"query_key_value"}
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.5


def test_gradient_checkpointing_gives_the_same_gradients(checkpoint: Path) -> None:
    """Each block checkpoints through the function transformers made from the caller's kwargs."""
    import warnings

    plain, checkpointed = _lora_model(checkpoint), _lora_model(checkpoint, checkpointing=True)
    calls = []
    for layer in checkpointed.get_base_model().transformer.layers:
        given = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *args, given=given, **kwargs: calls.append(1) or given(*args,
                                                                                                          **kwargs)
    plain_losses, plain_gradients = _train(plain, steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpointed_losses, checkpointed_gradients = _train(checkpointed, steps=1)
    assert not [w for w in caught if "use_reentrant" in str(w.message)]
    assert len(calls) == 2  # one per layer: non-reentrant recomputation does not call it again
    assert checkpointed_losses == plain_losses
    assert len(plain_gradients) == len(checkpointed_gradients) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_gradients, checkpointed_gradients))
    assert any(g.abs().max() > 0 for g in checkpointed_gradients)


def test_lora_model_generates_with_its_cache(trained) -> None:
    model, _ = trained
    prompt = _prompt(5, 6, 7, 8)
    assert _generate(model, [prompt]) == _generate(model, [prompt], use_cache=False)


def test_merged_model_gives_the_adapter_models_logits(trained) -> None:
    import copy

    model = copy.deepcopy(trained[0])
    batch = _training_batch()
    with torch.no_grad():
        adapter = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        merged = model.merge_and_unload()
        assert (merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                - adapter).abs().max() <= 1e-4


def test_merged_model_saves_and_reloads(trained, tmp_path: Path) -> None:
    """The saved folder is a whole checkpoint: weights, config and the upstream code (byte for byte)."""
    import copy

    model = copy.deepcopy(trained[0])
    batch = _training_batch()
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "modeling_chatglm.py").read_bytes() == \
        (REAL_CODE / "chatglm" / "modeling_chatglm.py").read_bytes()
    reloaded = _load(tmp_path / "merged").eval()
    with torch.no_grad():
        before = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        after = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (after - before).abs().max() <= 1e-4
