import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.learning.averaging import AveragingError, mean, variance_corrected, weighted_mean
from shoal.learning.models import ParameterLayout, build_model


def independent_models(k, shape=(256, 256)):
    """k independently initialised models, as k nodes that never shared a starting point."""
    models = [build_model("mlp", (64,), 10, seed=s) for s in range(k)]
    layout = ParameterLayout.of(models[0])
    states = [layout.state(m) for m in models]
    big = [
        {"w": torch.nn.init.xavier_uniform_(torch.empty(shape), generator=torch.Generator().manual_seed(s))}
        for s in range(k)
    ]
    return states, big


def var(t):
    return t.double().var(unbiased=False).item()


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_plain_mean_shrinks_variance_by_k_and_vca_does_not(k):
    states, big = independent_models(k)
    for models in (states, big):
        for name in (n for n, t in models[0].items() if t.numel() >= 2048):
            inputs = sum(var(m[name]) for m in models) / k
            plain, corrected = var(mean(models)[name]), var(variance_corrected(models)[name])
            # the 1/k law, with sampling noise that shrinks with the layer's size (2k to 65k elements)
            assert plain * k == pytest.approx(inputs, rel=0.05 if models is big else 0.15)
            assert corrected == pytest.approx(inputs, rel=1e-4)


def test_vca_self_mode_targets_the_reference():
    _, big = independent_models(4)
    reference = {"w": big[0]["w"] * 3}
    assert var(variance_corrected(big[1:], reference=reference)["w"]) == pytest.approx(
        var(reference["w"]), rel=1e-4
    )


def test_vca_keeps_the_layer_mean_and_skips_scalars_and_bn_stats():
    _, big = independent_models(3)
    models = [
        {"w": m["w"] + 1.0, "s": torch.tensor([float(i)]), "bn.running_var": m["w"][0].abs()}
        for i, m in enumerate(big)
    ]
    plain, corrected = mean(models), variance_corrected(models)
    assert corrected["w"].mean().item() == pytest.approx(plain["w"].mean().item(), abs=1e-6)
    assert torch.equal(corrected["s"], plain["s"])
    assert torch.equal(corrected["bn.running_var"], plain["bn.running_var"])


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 6), seed=st.integers(0, 1000))
def test_averaging_identical_models_is_the_identity(k, seed):
    model = {"a": torch.randn(7, 5, generator=torch.Generator().manual_seed(seed)), "b": torch.randn(3)}
    copies = [{n: t.clone() for n, t in model.items()} for _ in range(k)]
    for averaged in (mean(copies), variance_corrected(copies), weighted_mean(copies, range(1, k + 1))):
        for name in model:
            torch.testing.assert_close(averaged[name], model[name], rtol=1e-5, atol=1e-6)


def test_weighted_mean_arithmetic():
    a, b, c = ({"x": torch.tensor([v, 2 * v])} for v in (1.0, 4.0, 10.0))
    out = weighted_mean([a, b, c], [1, 2, 0])  # e.g. sample counts; a node with no data weighs nothing
    torch.testing.assert_close(out["x"], torch.tensor([3.0, 6.0]))
    torch.testing.assert_close(mean([a, b, c])["x"], torch.tensor([5.0, 10.0]))
    assert out["x"].dtype == torch.float32


@pytest.mark.parametrize(
    ("models", "weights", "message"),
    [
        ([], [], "nothing"),
        ([{"x": torch.zeros(2)}, {"y": torch.zeros(2)}], [1, 1], "names"),
        ([{"x": torch.zeros(2)}, {"x": torch.zeros(3)}], [1, 1], "expected"),
        ([{"x": torch.zeros(2)}, {"x": torch.zeros(2, dtype=torch.float64)}], [1, 1], "expected"),
        ([{"x": torch.zeros(2)}, {"x": torch.tensor([0.0, float("nan")])}], [1, 1], "NaN"),
        ([{"x": torch.zeros(2)}, {"x": torch.tensor([float("inf"), 0.0])}], [1, 1], "NaN"),
        ([{"x": torch.zeros(2)}], [1, 1], "weights for"),
        ([{"x": torch.zeros(2)}, {"x": torch.zeros(2)}], [0, 0], "not all zero"),
        ([{"x": torch.zeros(2)}, {"x": torch.zeros(2)}], [-1, 2], "non-negative"),
    ],
)
def test_bad_inputs_are_rejected(models, weights, message):
    with pytest.raises(AveragingError, match=message):
        weighted_mean(models, weights)
