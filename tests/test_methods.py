"""Every --peft_type on a tiny model: loss falls on a fixed batch, the base stays bit-identical,
save -> reload in a fresh process gives identical logits."""

import json
import subprocess
import sys

import pytest
import torch

from alpaca_cot.cli import parse_finetune_args
from alpaca_cot.methods import BOTTLENECK_PLACEMENTS, METHODS, PLACEMENT_ALIASES
from alpaca_cot.models import FAMILIES, load_model
from tests.conftest import ROOT

FIXED_IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 2], [1, 50, 51, 52, 53, 54, 55, 56, 57, 2]])
PROBE_IDS = [[1, 60, 61, 62, 63, 2]]


def _method_args(peft_type: str):
    return parse_finetune_args(["--data", "demo", "--peft_type", peft_type, "--bottleneck_size", "8",
                                "--num_virtual_tokens", "4", "--prompt_encoder_hidden_size", "16",
                                "--adalora_init_r", "4", "--lora_r", "4"])


@pytest.mark.slow
@pytest.mark.parametrize("peft_type", sorted(name for name, m in METHODS.items() if m.build_config))
def test_method_trains_only_its_parameters_and_reloads_identically(peft_type, tiny_llama, tmp_path):
    from peft import get_peft_model

    import alpaca_cot_peft  # noqa: F401 - registers the bottleneck adapters

    torch.manual_seed(0)
    model = load_model(str(tiny_llama), FAMILIES["llama"], torch.float32)
    config = METHODS[peft_type].build_config(_method_args(peft_type), FAMILIES["llama"], model, total_steps=100)
    model = get_peft_model(model, config)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and frozen
    optimizer = torch.optim.AdamW(trainable, lr=3e-2)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(input_ids=FIXED_IDS, labels=FIXED_IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses  # it learns the fixed batch
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} changed"  # the base is bit-identical
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(PROBE_IDS)).logits
    model.save_pretrained(tmp_path / "adapter")
    # A fresh process, plain PEFT (plus the extension's registration for bottleneck types).
    script = (
        "import json, sys, torch, alpaca_cot_peft\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(tiny_llama)!r}), "
        f"{str(tmp_path / 'adapter')!r}).eval()\n"
        f"print(json.dumps(m(input_ids=torch.tensor({PROBE_IDS})).logits.tolist()))\n"
    )
    fresh = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    reloaded = torch.tensor(json.loads(fresh.stdout.strip().splitlines()[-1]))
    assert torch.allclose(reloaded, expected, atol=1e-5)


@pytest.mark.parametrize("peft_type", ["full", "freeze"])
def test_full_and_freeze_train_the_models_own_weights(peft_type, tiny_llama, sample_file, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import generate
    import merge
    from tests.conftest import train_tiny

    out = tmp_path / peft_type
    assert train_tiny(tiny_llama, sample_file, out, "--peft_type", peft_type, "--trainable_layers", "1",
                      "--max_steps", "3", "--learning_rate", "1e-2") == 0
    before, after = load_file(tiny_llama / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    if peft_type == "full":
        assert "model.embed_tokens.weight" in changed and any(".layers.0." in n for n in changed)
    else:  # only the last of the two decoder layers trains
        assert changed and all(n.startswith("model.layers.1.") for n in changed)
    AutoModelForCausalLM.from_pretrained(out)  # a plain checkpoint
    assert generate.main(["--lora_dir", str(out), "--instruction", "Name a colour.", "--max_new_tokens", "3"]) == 0
    assert merge.main(["--lora_dir", str(out), "--merged_dir", str(tmp_path / "m")]) == 2
    assert "already a whole fine-tuned model" in capsys.readouterr().err


def test_full_fine_tuning_refuses_a_quantized_base(tiny_llama, sample_file, tmp_path, capsys):
    from tests.conftest import train_tiny

    assert train_tiny(tiny_llama, sample_file, tmp_path / "o", "--peft_type", "full", "--quantization_bit", "4") == 2
    assert "cannot be 4/8-bit" in capsys.readouterr().err


@pytest.mark.parametrize("peft_type", sorted(name for name, m in METHODS.items() if m.build_config))
def test_adapters_on_a_bf16_base_train_in_fp32(peft_type, tiny_llama):
    """--compute_dtype bf16 loads a frozen base in bf16 (CPU too); what trains must still be fp32 for AdamW."""
    from peft import get_peft_model

    import alpaca_cot_peft  # noqa: F401 - registers the bottleneck adapters
    from alpaca_cot.train.plan import Precision, resolve_precision

    precision = resolve_precision("bf16", FAMILIES["llama"], on_cuda=False, weights_train=False)
    assert precision == Precision("bf16", "bfloat16", trainer_fp16=False, trainer_bf16=True)
    load_dtype = precision.torch_load_dtype
    assert load_dtype == torch.bfloat16
    full = resolve_precision("bf16", FAMILIES["llama"], on_cuda=False, weights_train=True)  # full / freeze
    assert full.torch_load_dtype == torch.float32
    model = load_model(str(tiny_llama), FAMILIES["llama"], load_dtype)
    config = METHODS[peft_type].build_config(_method_args(peft_type), FAMILIES["llama"], model, total_steps=100)
    model = get_peft_model(model, config)
    trainable = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, trainable
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=FIXED_IDS, labels=FIXED_IDS).loss
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_adalora_chunked_loss_includes_the_orthogonal_regulariser(tiny_llama, tmp_path):
    """The chunked (lean) loss never passes labels, so PEFT adds no regulariser there: the trainer adds it, and its
    loss and gradients equal the model's own loss with labels (cross-entropy + orth_reg_weight x regulariser)."""
    from peft import AdaLoraConfig, get_peft_model
    from transformers import TrainingArguments

    from alpaca_cot.train.loss import IGNORE_INDEX, LeanLossTrainer, adalora_orthogonal_penalty

    torch.manual_seed(0)
    model = load_model(str(tiny_llama), FAMILIES["llama"], torch.float32)
    config = AdaLoraConfig(task_type="CAUSAL_LM", init_r=4, target_r=2, total_step=100, tinit=10, tfinal=10,
                           lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, config)
    with torch.no_grad():  # E starts at zero: give the cross-entropy gradients to pass through A and B too
        for name, param in model.named_parameters():
            if "lora_E" in name:
                param.normal_()
    model.train()
    labels = FIXED_IDS.clone()
    labels[:, :4] = IGNORE_INDEX
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2)
    trainer = LeanLossTrainer(model=model, args=args, loss_chunk_size=7)
    assert trainer.loss_chunk_size == 7  # the chunked path is on for AdaLoRA
    trainable = [p for p in model.parameters() if p.requires_grad]

    chunked = trainer.compute_loss(model, {"input_ids": FIXED_IDS, "labels": labels})
    chunked_grads = torch.autograd.grad(chunked, trainable)
    own = model(input_ids=FIXED_IDS, labels=labels).loss  # PeftModel -> AdaLoraModel.forward adds the regulariser
    own_grads = torch.autograd.grad(own, trainable)

    penalty = adalora_orthogonal_penalty(model.base_model)
    assert penalty.item() > 1e-2  # large enough that leaving it out would show
    torch.testing.assert_close(chunked, own, rtol=0, atol=1e-6)
    for got, expected in zip(chunked_grads, own_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("peft_type", [*BOTTLENECK_PLACEMENTS, *PLACEMENT_ALIASES])
def test_every_placement_row_builds_its_config_from_the_family_row(peft_type, tiny_llama):
    from alpaca_cot_peft import placement_of

    placement = BOTTLENECK_PLACEMENTS[PLACEMENT_ALIASES.get(peft_type, peft_type)]
    family = FAMILIES["llama"]
    model = load_model(str(tiny_llama), family, torch.float32)
    config = METHODS[peft_type].build_config(_method_args(peft_type), family, model, total_steps=100)
    assert placement_of(config) is placement
    assert config.target_modules == set(getattr(family, f"bottleneck_{placement.targets}"))
    sides = set(family.bottleneck_input_side) & config.target_modules if placement.input_side else set()
    assert set(config.input_side_modules) == sides and (sides or not placement.input_side)
    assert METHODS[peft_type].description == placement.description or peft_type in PLACEMENT_ALIASES
