"""Baichuan under transformers 5, on tiny checkpoints of the real upstream files (../shared/remote_code):
Baichuan-13B-Chat's code (ALiBi: its own classes, fixed in memory) and Baichuan2-7B-Chat's (RoPE: converted once to
a native LlamaForCausalLM, checked against its own fixed classes)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from alpaca_cot.models import FAMILIES
from alpaca_cot.remote import baichuan
from alpaca_cot.remote.fixes import apply_fixes
from tests.real_checkpoints import (
    REAL_CODE,
    adamw_losses,
    build_real_checkpoint,
    loaded_model,
    needs_real_code,
    own_code_model,
)

pytestmark = needs_real_code

PROMPTS = ([5, 6, 7, 8, 9], [11, 12, 13])  # token ids; the batch left-pads the second one with pad id 0
STEPS = 5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("baichuan")
    return {name: build_real_checkpoint(name, root / name) for name in ("baichuan", "baichuan2")}


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ALPACA_COT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(prompt) for prompt in PROMPTS)
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    return ids, mask


def _assert_all_finite(model: torch.nn.Module) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert not tensor.is_meta and torch.isfinite(tensor).all(), name


def _max_diff_on_real_tokens(first: torch.Tensor, second: torch.Tensor, mask: torch.Tensor) -> float:
    """Padded positions attend to nothing real: their logits are implementation noise, so they are left out."""
    return (first - second).abs()[mask.bool()].max().item()


# (a) the checkpoints' own classes load and run under transformers 5 -------------------------------------------------

@pytest.mark.parametrize("name", ["baichuan", "baichuan2"])
def test_own_classes_load_weights_and_run_a_forward(checkpoints: dict[str, Path], name: str) -> None:
    from safetensors.torch import load_file

    model = own_code_model(checkpoints[name], name)
    saved = load_file(checkpoints[name] / "model.safetensors")
    assert {key: value for key, value in model.state_dict().items() if key in saved}.keys() == saved.keys()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in saved.items())
    _assert_all_finite(model)  # before the first forward: Baichuan-13B then adds its ALiBi mask (-inf by design)
    ids, mask = _padded_batch()
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=mask, return_dict=None)  # PEFT passes None: no tuple
    assert output.logits.shape == (2, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(output.logits).all()


def test_baichuan2_rotary_tables_are_rebuilt_from_the_meta_device(checkpoints: dict[str, Path]) -> None:
    model = own_code_model(checkpoints["baichuan2"], "baichuan2")
    with torch.no_grad():
        model(input_ids=torch.tensor([PROMPTS[0]]))
    rotary = model.model.layers[0].self_attn.rotary_emb
    dim = 2 * rotary.inv_freq.shape[0]
    expected = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    assert torch.equal(rotary.inv_freq, expected)
    assert rotary.cos_cached.shape[-2] == model.config.max_position_embeddings
    assert torch.allclose(rotary.cos_cached[0, 0, 3, : dim // 2], torch.cos(3 * expected))


def test_stream_generator_is_only_exempted_where_imported_lazily(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import dynamic_module_utils

    modelling = REAL_CODE / "baichuan" / "modeling_baichuan.py"
    assert baichuan._imported_only_inside_functions(str(modelling), "transformers_stream_generator")
    top_level = tmp_path / "eager.py"
    top_level.write_text("import transformers_stream_generator\nimport not_installed_package\n", encoding="utf-8")
    apply_fixes(baichuan.IMPORT_FIXES)
    assert "transformers_stream_generator" not in dynamic_module_utils.get_imports(str(modelling))
    assert dynamic_module_utils.get_imports(str(top_level)) == ["not_installed_package",
                                                                "transformers_stream_generator"]
    # installed but broken under transformers 5 (what pip gives today) also counts as unusable
    broken = tmp_path / "site" / "transformers_stream_generator"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("from transformers import DisjunctiveConstraint\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(dynamic_module_utils, "get_imports", inspect.unwrap(dynamic_module_utils.get_imports))
    assert baichuan._stream_generator_unusable()


def test_training_does_not_checkpoint_unless_asked(checkpoints: dict[str, Path]) -> None:
    model = own_code_model(checkpoints["baichuan"], "baichuan")
    assert model.config.gradient_checkpointing is False  # upstream: (False,), which is true
    assert model.model.gradient_checkpointing is False and not model.is_gradient_checkpointing


# (b) Baichuan2-7B converts to LLaMA, exactly; Baichuan-13B (ALiBi) does not convert ---------------------------------

def test_conversion_is_chosen_from_config_json_alone() -> None:
    alibi = json.loads((REAL_CODE / "baichuan" / "config.json").read_text(encoding="utf-8"))
    rope = json.loads((REAL_CODE / "baichuan2" / "config.json").read_text(encoding="utf-8"))
    assert baichuan.native_conversion(alibi) is None
    assert baichuan.native_conversion({**rope, "z_loss_weight": 1e-4}) is None  # a loss term LLaMA lacks
    assert baichuan.native_conversion(rope).architecture == "LlamaForCausalLM"
    native = baichuan.native_conversion(rope).config(rope)
    assert (native["model_type"], native["num_key_value_heads"], native["rms_norm_eps"]) == ("llama", 4, 1e-6)
    assert native["rope_parameters"]["rope_theta"] == 10000.0 and "auto_map" not in native


def test_tensor_mapping_splits_w_pack_and_normalises_only_baichuan2_heads() -> None:
    tensors = baichuan.native_conversion({"max_position_embeddings": 8}).tensors
    packed = torch.arange(12.0).reshape(6, 2)  # hidden 2: rows q q k k v v
    split = tensors("model.layers.3.self_attn.W_pack.weight", packed, {})
    assert [split[f"model.layers.3.self_attn.{p}_proj.weight"].tolist() for p in "qkv"] == [
        [[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10, 11]]]
    head = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    unit_rows = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    baichuan2_7b = {"architectures": ["BaichuanForCausalLM"], "vocab_size": 125696}
    baichuan_7b = {"architectures": ["BaiChuanForCausalLM"], "vocab_size": 64000}  # Baichuan-1: a plain head
    for config, expected in [(baichuan2_7b, unit_rows), ({**baichuan2_7b, "vocab_size": 64000}, unit_rows),
                             ({"vocab_size": 125696}, unit_rows), (baichuan_7b, head)]:
        assert torch.equal(tensors("lm_head.weight", head, config)["lm_head.weight"], expected), config
    assert tensors("model.layers.0.self_attn.rotary_emb.inv_freq", head, {}) == {}


def test_baichuan2_converted_logits_equal_its_own_classes(checkpoints: dict[str, Path], cache_root: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from alpaca_cot.remote import convert

    folder = checkpoints["baichuan2"]
    converted = loaded_model(folder, "baichuan2")
    assert type(converted).__name__ == "LlamaForCausalLM"
    _assert_all_finite(converted)
    assert torch.allclose(converted.lm_head.weight.norm(dim=-1), torch.ones(converted.config.vocab_size))
    reference = own_code_model(folder, "baichuan2")
    ids, mask = _padded_batch()
    with torch.no_grad():
        diff = _max_diff_on_real_tokens(converted(input_ids=ids, attention_mask=mask).logits,
                                        reference(input_ids=ids, attention_mask=mask).logits, mask)
    print(f"baichuan2 converted vs own classes: max |logit diff| = {diff:.3g}")
    assert diff <= 1e-4
    copies = sorted((cache_root / "converted").iterdir())

    def no_second_conversion(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(convert, "_convert_weights", no_second_conversion)
    again = loaded_model(folder, "baichuan2")
    assert sorted((cache_root / "converted").iterdir()) == copies and len(copies) == 1
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, converted(input_ids=ids).logits)


def test_baichuan_alibi_loads_its_own_fixed_classes(checkpoints: dict[str, Path], cache_root: Path) -> None:
    model = loaded_model(checkpoints["baichuan"], "baichuan")
    assert type(model).__name__ == "BaichuanForCausalLM" and hasattr(model.model.layers[0].self_attn, "W_pack")
    assert not (cache_root / "converted").exists()


# (c) generation with the KV cache -----------------------------------------------------------------------------------

def _greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None, **kwargs: object) -> list:
    output = model.generate(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                            max_new_tokens=6, min_new_tokens=6, do_sample=False, repetition_penalty=1.0,
                            pad_token_id=0, **kwargs)
    return output[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("name", ["baichuan", "baichuan2"])
def test_generate_uses_the_cache_and_matches_uncached_and_unpadded(checkpoints: dict[str, Path], cache_root: Path,
                                                                   name: str) -> None:
    model = loaded_model(checkpoints[name], name)
    lengths: list[int] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    single = torch.tensor([PROMPTS[0]])
    cached = _greedy(model, single)
    assert lengths == [len(PROMPTS[0])] + [1] * 5  # prefill, then one new token per step
    lengths.clear()
    assert _greedy(model, single, use_cache=False) == cached
    assert lengths == [len(PROMPTS[0]) + step for step in range(6)]
    ids, mask = _padded_batch()
    alone = [_greedy(model, torch.tensor([prompt]))[0] for prompt in PROMPTS]
    assert _greedy(model, ids, mask) == alone
    # beam search reorders the cache between steps (upstream's tuple reordering would fail on transformers' Cache)
    assert _greedy(model, single, num_beams=2) == _greedy(model, single, num_beams=2, use_cache=False)


# (d) training: LoRA on the default targets, merge, save, reload ------------------------------------------------------

def _lora_targets(model: torch.nn.Module, name: str) -> list[str]:
    """The family's default targets; in a converted model the fused W_pack became q/k/v_proj."""
    present = {module_name.rsplit(".", 1)[-1] for module_name, _ in model.named_modules()}
    targets = [native for target in FAMILIES[name].lora_targets
               for native in (baichuan.UPSTREAM_MODULE_NAMES.get(target, (target,)) if target not in present
                              else (target,))]
    assert targets and set(targets) <= present
    return targets


def _train(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> list[float]:
    return adamw_losses(model, ids, mask, steps=STEPS, labels=labels)


@pytest.mark.parametrize("name", ["baichuan", "baichuan2"])
def test_lora_trains_merges_saves_and_reloads(checkpoints: dict[str, Path], cache_root: Path, tmp_path: Path,
                                              name: str) -> None:
    from peft import LoraConfig, get_peft_model

    model = loaded_model(checkpoints[name], name)
    targets = _lora_targets(model, name)
    print(f"{name}: LoRA targets {targets} on {type(model).__name__}")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    ids, mask = _padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    losses = _train(peft_model, ids, mask, labels)
    print(f"{name}: losses {[round(loss, 4) for loss in losses]}")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))  # a frozen model would stay flat
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids, attention_mask=mask).logits
        merged = peft_model.merge_and_unload().eval()
        merged_logits = merged(input_ids=ids, attention_mask=mask).logits
    merge_diff = _max_diff_on_real_tokens(adapted, merged_logits, mask)
    if name == "baichuan":  # as the auto classes do (not yet alpaca_cot.remote.loading): save_pretrained then writes
        # the modelling code next to the weights
        type(merged).register_for_auto_class("AutoModelForCausalLM")
    merged.save_pretrained(tmp_path / "merged")
    reloaded = loaded_model(tmp_path / "merged", name)
    with torch.no_grad():
        reload_diff = _max_diff_on_real_tokens(merged_logits, reloaded(input_ids=ids, attention_mask=mask).logits,
                                               mask)
    print(f"{name}: merged vs adapter {merge_diff:.3g}, reloaded vs merged {reload_diff:.3g}")
    assert merge_diff <= 1e-4 and reload_diff <= 1e-4
    assert type(reloaded).__name__ == type(model).__name__


def test_trainer_keeps_dividing_the_loss_by_accumulation(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(own_code_model(checkpoints["baichuan"], "baichuan"),
                           LoraConfig(r=2, target_modules=["W_pack"]))
    arguments = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                  gradient_accumulation_steps=32)
    assert Trainer(model=model, args=arguments).model_accepts_loss_kwargs is False


def test_baichuan_gradient_checkpointing_gives_the_same_gradients(checkpoints: dict[str, Path]) -> None:
    from peft import LoraConfig, get_peft_model

    ids, mask = _padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    gradients = []
    for checkpointing in (False, True):
        model = own_code_model(checkpoints["baichuan"], "baichuan")
        if checkpointing:  # as alpaca_cot.train.recipe does
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        torch.manual_seed(0)
        peft_model = get_peft_model(model, LoraConfig(r=2, lora_dropout=0.0, target_modules=["W_pack"],
                                                      init_lora_weights=False))
        peft_model.train()
        peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        gradients.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad})
        assert model.model.gradient_checkpointing is checkpointing
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) == 4
    assert all(torch.allclose(gradients[0][n], gradients[1][n], atol=1e-6) for n in gradients[0])
