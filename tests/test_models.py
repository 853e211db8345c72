import pytest
import torch
from torch import nn

from shoal.learning.models import MODELS, ModelError, ParameterLayout, build_model


def small_factory(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], num_classes))


def not_a_model(input_shape, num_classes):
    return "nope"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registry_models_run_on_images(name):
    model = build_model(name, (1, 8, 8), 10, seed=0)
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_same_seed_same_init_and_layout_is_stable():
    a, b, c = (build_model("mlp", (40,), 10, seed=s) for s in (1, 1, 2))
    la = ParameterLayout.of(a)
    assert la == ParameterLayout.of(b) == ParameterLayout.of(c)
    assert la.names == (
        "net.1.weight",
        "net.1.bias",
        "net.3.weight",
        "net.3.bias",
        "net.5.weight",
        "net.5.bias",
    )
    assert torch.equal(la.flatten(la.state(a)), la.flatten(la.state(b)))
    assert not torch.equal(la.flatten(la.state(a)), la.flatten(la.state(c)))


def test_flat_round_trip_and_load():
    model = build_model("cnn", (1, 8, 8), 10, seed=0)
    layout = ParameterLayout.of(model)
    flat = torch.arange(layout.numel, dtype=torch.float32)
    layout.load(model, layout.unflatten(flat))
    assert torch.equal(layout.flatten(layout.state(model)), flat)
    with pytest.raises(ModelError, match="shape"):
        layout.unflatten(flat[:-1])
    state = layout.unflatten(flat)
    state[layout.names[0]] = torch.zeros(2, 2)
    with pytest.raises(ModelError, match="shape"):
        layout.load(model, state)


def test_frozen_features_share_only_the_head():
    a = build_model("frozen-cnn", (1, 8, 8), 10, seed=1)
    b = build_model("frozen-cnn", (1, 8, 8), 10, seed=2)
    layout = ParameterLayout.of(a)
    assert layout.names == ("head.weight",) and a.head.bias is None
    # every node must hold the same extractor, whatever its own seed, and the heads differ
    assert all(torch.equal(p, q) for p, q in zip(a.features.parameters(), b.features.parameters()))
    assert not torch.equal(a.head.weight, b.head.weight)
    a.train()
    assert not a.features.training


def test_frozen_features_load_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    donor = build_model("frozen-cnn", (1, 8, 8), 10, features_seed=7)
    save_file(donor.features.state_dict(), tmp_path / "f.safetensors")
    model = build_model("frozen-cnn", (1, 8, 8), 10, features_file=str(tmp_path / "f.safetensors"))
    assert all(torch.equal(p, q) for p, q in zip(model.features.parameters(), donor.features.parameters()))
    with pytest.raises(ModelError, match="cannot load"):
        build_model("frozen-cnn", (1, 8, 8), 10, features_file=str(tmp_path / "missing.safetensors"))


def test_custom_factory_by_module_path():
    model = build_model("tests.test_models:small_factory", (5,), 3, seed=0)
    assert model(torch.zeros(2, 5)).shape == (2, 3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("resnet9000", "unknown model"),
        ("no_such_module_xyz:f", "cannot import"),
        ("tests.test_models:missing", "no attribute"),
        ("tests.test_models:not_a_model", "not a torch.nn.Module"),
    ],
)
def test_bad_model_specs(spec, message):
    with pytest.raises(ModelError, match=message):
        build_model(spec, (5,), 3)


def test_cnn_refuses_flat_inputs():
    with pytest.raises(ModelError, match="channels, height, width"):
        build_model("cnn", (40,), 10)
