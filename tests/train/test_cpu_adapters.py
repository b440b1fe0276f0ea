"""BitsDropout: the same mask distribution as torch's dropout, reproducible, and only on adapters;
adapter input casts switched off and back on."""

import pytest
import torch

from alpaca_cot.train.cpu_adapters import BitsDropout, adapter_input_casts_off, use_bits_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_rate_and_scale_match_dropout_in_every_lane(p):
    torch.manual_seed(0)
    x = torch.ones(1001, 799)  # not a multiple of 4 elements: the last draw is cut
    dropout = BitsDropout(p).train()
    assert abs(dropout.p - p) <= 1 / 65536  # the probability is rounded to 16 bits
    out = dropout(x)
    dropped = out == 0
    assert out.unique().tolist() == [0.0, pytest.approx(1 / (1 - dropout.p))]
    n = dropped.numel()
    tolerance = 5 * (p * (1 - p) / (n / 4)) ** 0.5  # five standard errors of one lane's rate
    for lane in range(4):  # each 16-bit lane of the 64-bit draws is its own uniform number
        assert abs(dropped.flatten()[lane::4].float().mean().item() - p) < tolerance


def test_same_seed_same_mask_and_gradients_flow_through_kept_elements_only():
    x = torch.randn(64, 33, requires_grad=True)
    dropout = BitsDropout(0.3).train()
    torch.manual_seed(7)
    first = dropout(x)
    torch.manual_seed(7)
    second = dropout(x)
    assert torch.equal(first, second)
    first.sum().backward()
    kept = first != 0
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 1 / (1 - dropout.p)))
    assert (x.grad[~kept] == 0).all()
    assert dropout.eval()(x) is x


def test_bits_dropout_works_in_bf16():
    x = torch.ones(4096, dtype=torch.bfloat16)
    out = BitsDropout(0.25).train()(x)
    assert out.dtype == torch.bfloat16 and 0.15 < (out == 0).float().mean().item() < 0.35


def test_only_the_adapters_dropouts_are_replaced(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.model.layers[0].mlp.extra = torch.nn.Dropout(0.2)  # a base-model dropout stays as it is
    model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    replaced = use_bits_dropout(model)
    assert replaced == 2 * model.config.num_hidden_layers
    lora_dropouts = [m for name, m in model.named_modules() if ".lora_dropout." in name]
    assert lora_dropouts and all(isinstance(m, BitsDropout) and m.p == pytest.approx(0.1, abs=1e-5)
                                 for m in lora_dropouts)
    assert type(model.base_model.model.model.layers[0].mlp.extra) is torch.nn.Dropout
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_input_casts_are_switched_off_for_layers_that_have_the_switch_and_restored(tiny_llama):
    """IA3 layers have no switch (peft's own helper raises on them); LoRA layers get theirs back after the block."""
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for config in (LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
                   IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                             task_type="CAUSAL_LM")):
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
        model = get_peft_model(base, config)
        switches = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
        with adapter_input_casts_off(model):
            assert not any(m.cast_input_dtype_enabled for m in switches)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(input_ids=torch.tensor([[1, 5, 9]])).logits.float().sum().backward()
        assert all(m.cast_input_dtype_enabled for m in switches)
        with torch.no_grad():  # outside autocast the cast is back: fp32 adapters on a bf16 base still run
            model(input_ids=torch.tensor([[1, 5, 9]]))
