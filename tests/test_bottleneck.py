"""The peft/ extension: bottleneck adapters as a PEFT method (placements, init, scaling, save/load)."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import alpaca_cot_peft  # noqa: F401 - registers PeftType.BOTTLENECK
from alpaca_cot_peft import (
    DEFAULT_TARGETS,
    INIT_SCHEMES,
    NON_LINEARITIES,
    PLACEMENTS,
    BottleneckConfig,
    BottleneckLayer,
    placement_of,
)


class TwoLayers(nn.Module):
    """A tiny model with named Linear layers, so placements can be checked by hand."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.second = nn.Linear(8, 6)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def _bottleneck(**fields):
    return BottleneckConfig(bottleneck_size=3, target_modules=["first", "second"], **fields)


def test_peft_import_is_the_real_peft():
    import peft

    assert "site-packages" in peft.__file__ or "dist-packages" in peft.__file__
    assert alpaca_cot_peft.__name__ == "alpaca_cot_peft"


@pytest.mark.parametrize("fields", [{}, {"use_parallel_adapter": True}, {"input_side_modules": ["first"]},
                                    {"scaling": "learned", "bias": "adapter_only"}])
def test_fresh_adapter_with_zero_up_projection_changes_nothing(fields):
    torch.manual_seed(0)
    base, x = TwoLayers(), torch.randn(4, 6)
    expected = base(x)
    model = get_peft_model(base, _bottleneck(**fields))
    assert torch.equal(model(x), expected)


def test_placements_follow_their_formulas():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    for fields, placement in [({"input_side_modules": ["first"]}, "input"), ({}, "output"),
                              ({"use_parallel_adapter": True}, "parallel")]:
        base = TwoLayers()
        reference = TwoLayers()
        reference.load_state_dict(base.state_dict())
        model = get_peft_model(base, _bottleneck(init_weights="bert", non_linearity="relu", scaling=0.5, **fields))
        layer = model.base_model.model.first
        assert isinstance(layer, BottleneckLayer) and layer.bottleneck_placement["default"] == placement
        down, up = layer.bottleneck_down["default"], layer.bottleneck_up["default"]

        def adapter(h, down=down, up=up):
            return 0.5 * up(torch.relu(down(h)))

        if placement == "input":
            expected_first = reference.first(x + adapter(x))
        elif placement == "output":
            y = reference.first(x)
            expected_first = y + adapter(y)
        else:
            expected_first = reference.first(x) + adapter(x)
        assert torch.allclose(layer(x), expected_first, atol=1e-6)


def test_only_adapter_parameters_train_and_save_round_trip(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(TwoLayers(), _bottleneck(scaling="learned", init_weights="bert"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("bottleneck_" in n for n in names)
    assert any("bottleneck_scale" in n for n in names)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    x = torch.randn(2, 6)
    reloaded = PeftModel.from_pretrained(TwoLayers(), tmp_path)
    reloaded.base_model.model.load_state_dict(
        {k: v for k, v in model.base_model.model.state_dict().items() if "bottleneck_" not in k}, strict=False)
    assert torch.allclose(reloaded(x), model(x), atol=1e-6)


def test_bad_config_is_reported_in_one_message():
    with pytest.raises(ValueError, match=r"bottleneck_size must be at least 1.*non_linearity 'swish'"):
        BottleneckConfig(bottleneck_size=0, non_linearity="swish", target_modules=["first"])


def test_merging_is_refused():
    model = get_peft_model(TwoLayers(), _bottleneck())
    with pytest.raises(ValueError, match="non-linear"):
        model.merge_and_unload()
    assert isinstance(model.unload(), TwoLayers)  # unloading without merging is fine


# ---------------------------------------------------------------- the tables (alpaca_cot_peft/tables.py), row by row

class LlamaNamed(nn.Module):
    """Linear layers named as in a llama block, on a model whose config says llama: the default targets apply."""

    def __init__(self):
        super().__init__()
        self.config = {"model_type": "llama"}
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 6)

    def forward(self, x):
        x = x + self.q_proj(x) + self.k_proj(x) + self.v_proj(x)
        return x + self.down_proj(torch.relu(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("placement", PLACEMENTS.values(), ids=list(PLACEMENTS))
def test_each_placement_row_selects_itself_and_places_its_default_targets(placement):
    config = BottleneckConfig(bottleneck_size=3, **placement.config_fields())
    assert placement_of(config) is placement
    torch.manual_seed(0)
    base, x = LlamaNamed(), torch.randn(2, 6)
    expected = base(x)
    model = get_peft_model(base, config)
    placed = {name.rsplit(".", 1)[-1]: layer.bottleneck_placement["default"]
              for name, layer in model.named_modules() if isinstance(layer, BottleneckLayer)}
    defaults = DEFAULT_TARGETS["llama"]
    assert set(placed) == set(defaults[placement.targets])
    inputs = set(defaults["input_side"]) if placement.input_side else set()
    side = "parallel" if placement.use_parallel_adapter else "output"
    assert placed == {name: "input" if name in inputs else side for name in placed}
    assert torch.equal(model(x), expected)  # a fresh adapter (zero up-projection) changes nothing


def test_parallel_wins_over_pfeiffer_as_in_the_layers():
    assert placement_of(BottleneckConfig(use_parallel_adapter=True, use_adapterp=True)) is PLACEMENTS["parallel"]


@pytest.mark.parametrize("non_linearity", list(NON_LINEARITIES))
@pytest.mark.parametrize("init_weights", list(INIT_SCHEMES))
def test_every_non_linearity_and_initialisation_builds_and_trains(non_linearity, init_weights):
    torch.manual_seed(0)
    model = get_peft_model(TwoLayers(), _bottleneck(non_linearity=non_linearity, init_weights=init_weights))
    layer = model.base_model.model.first
    assert type(layer.bottleneck_activation["default"]).__name__ == NON_LINEARITIES[non_linearity]
    model(torch.randn(2, 6)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_layers_implement_every_row_of_the_tables():
    from alpaca_cot_peft.layer import ACTIVATIONS, INITIALISERS

    assert list(ACTIVATIONS) == list(NON_LINEARITIES) and list(INITIALISERS) == list(INIT_SCHEMES)
    with pytest.raises(ValueError, match=r"init_weights must be 'mam_adapter' or 'bert' \(got 'xavier'\)"):
        BottleneckConfig(init_weights="xavier", target_modules=["first"])
