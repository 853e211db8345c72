"""Bristle and the robust baselines: the properties the issue names, plus behaviour under outliers."""

import random

import numpy as np
import pytest
import torch

from shoal.learning.averaging import AveragingError
from shoal.learning.bristle import Bristle, BristleConfig, f1_per_class, linear_scorer, prioritize
from shoal.learning.integrators import Contribution
from shoal.learning.robust import Krum, Median, TrimmedMean


def head(value, classes=4, dim=3, seed=None):
    if seed is None:
        return {"head.weight": torch.full((classes, dim), float(value))}
    return {"head.weight": torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed))}


def contributions(states):
    return [Contribution(s, 10, f"p{i}") for i, s in enumerate(states)]


def test_prioritizer_keeps_the_nearest_and_some_random():
    own = head(0.0)
    received = contributions([head(d) for d in [5, 1, 9, 3, 7, 2, 8, 4, 6, 10]])
    picks = [prioritize(own, received, nearest=3, explore=2, rng=random.Random(s)) for s in range(20)]
    for chosen in picks:
        assert [c.state["head.weight"][0, 0].item() for c in chosen[:3]] == [1, 2, 3]
        assert len(chosen) == 5 and all(c.state["head.weight"][0, 0].item() > 3 for c in chosen[3:])
    assert len({tuple(c.peer for c in chosen[3:]) for chosen in picks}) > 3  # exploration varies
    assert len(prioritize(own, received[:2], nearest=3, explore=2, rng=random.Random(0))) == 2


def test_a_peer_worse_on_every_familiar_class_gets_weight_zero():
    bristle = Bristle(lambda s: np.zeros(4), familiar=[0, 1, 2], rng=random.Random(0))
    omega, big_omega = bristle.weights(np.array([0.9, 0.8, 0.95, 0.0]), np.array([0.1, 0.2, 0.3, 0.9]))
    assert omega.tolist() == [0.0, 0.0, 0.0] and big_omega == 0.0
    # equally good gives weight 1 x certainty; better gives more
    same, _ = bristle.weights(np.array([0.8, 0.8, 0.8, 0]), np.array([0.8, 0.8, 0.8, 0]))
    better, _ = bristle.weights(np.array([0.5, 0.5, 0.5, 0]), np.array([0.9, 0.9, 0.9, 0]))
    assert same == pytest.approx([0.8] * 3) and (better > same).all()


def scorer_for(features, y):
    return linear_scorer(features, y, num_classes=4)


def test_identical_peers_leave_the_model_unchanged():
    g = torch.Generator().manual_seed(1)
    features, y = torch.randn(40, 3, generator=g), torch.arange(40) % 4
    own = head(0, seed=3)
    own["head.weight"] -= own["head.weight"].mean(dim=0, keepdim=True)  # Bristle keeps layers centred
    bristle = Bristle(scorer_for(features, y), familiar=[0, 1, 2, 3], rng=random.Random(0))
    copies = contributions([{k: v.clone() for k, v in own.items()} for _ in range(5)])
    out = bristle.integrate(Contribution(own, 10), copies)
    torch.testing.assert_close(out["head.weight"], own["head.weight"])


def test_bristle_ignores_a_saboteur_and_learns_foreign_classes_from_good_peers():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 4
    y = torch.arange(80) % 4
    features = centres[y] + 0.3 * torch.randn(80, 4, generator=g)
    good = {"head.weight": centres.clone()}
    own = {"head.weight": centres.clone()}
    own["head.weight"][3] = 0.0  # we never saw class 3: it is foreign to us
    local = y < 3
    bristle = Bristle(scorer_for(features[local], y[local]), familiar=[0, 1, 2], rng=random.Random(0))
    evil = {"head.weight": -10 * centres}
    out = bristle.integrate(Contribution(own, 10), contributions([good, evil, good]))
    f1 = f1_per_class(features @ out["head.weight"].T, y, 4)
    assert f1[:3].min() > 0.9  # familiar classes kept
    assert f1[3] > 0.5  # the foreign class came from the good peers, not the saboteur


@pytest.mark.parametrize("integrator", [Median(), TrimmedMean(b=1), Krum(f=1), Krum(f=1, m=2)])
def test_robust_baselines_resist_one_outlier(integrator):
    honest = [head(v) for v in (1.0, 1.1, 0.9, 1.05)]
    out = integrator.integrate(Contribution(honest[0], 1), contributions([*honest[1:], head(1000.0)]))
    assert 0.85 < out["head.weight"].mean().item() < 1.15


def test_trimmed_mean_and_krum_arithmetic():
    vals = [head(v) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    out = TrimmedMean(b=1).integrate(Contribution(vals[0], 1), contributions(vals[1:]))
    assert out["head.weight"].mean().item() == pytest.approx(3.0)
    few = TrimmedMean(b=4).integrate(Contribution(vals[0], 1), contributions(vals[1:2]))  # trims what it can
    assert few["head.weight"].mean().item() == pytest.approx(1.5)
    picked = Krum(f=1).integrate(Contribution(vals[0], 1), contributions(vals[1:]))
    assert picked["head.weight"].mean().item() in (2.0, 3.0)


@pytest.mark.parametrize(
    "integrator",
    [Median(), TrimmedMean(), Krum(), Bristle(lambda s: np.zeros(4), familiar=[0], rng=random.Random(0))],
)
@pytest.mark.parametrize(
    "bad",
    [
        {"head.weight": torch.full((4, 3), float("nan"))},
        {"head.weight": torch.zeros(3, 3)},
        {"w": torch.zeros(4, 3)},
    ],
)
def test_integrators_reject_nan_and_wrong_shapes(integrator, bad):
    with pytest.raises(AveragingError):
        integrator.integrate(Contribution(head(1.0), 1), contributions([head(1.0), bad]))


def test_bad_settings():
    with pytest.raises(ValueError):
        TrimmedMean(b=-1)
    with pytest.raises(ValueError):
        Krum(m=0)
    with pytest.raises(ValueError, match="familiar"):
        Bristle(lambda s: np.zeros(4), familiar=[], rng=random.Random(0), config=BristleConfig())


def test_bristle_drops_scaled_up_layers_and_peers_sharing_no_class():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 4
    y = torch.arange(80) % 4
    features = centres[y] + 0.3 * torch.randn(80, 4, generator=g)
    own = {"head.weight": centres - centres.mean(dim=0, keepdim=True)}
    bristle = Bristle(scorer_for(features, y), familiar=[0, 1, 2, 3], rng=random.Random(0))
    huge = Contribution({"head.weight": 50 * own["head.weight"] + 1}, 10, "scaled")  # F1 cannot see scale
    out = bristle.integrate(Contribution(own, 10), [huge])
    torch.testing.assert_close(out["head.weight"], own["head.weight"])
    stranger = Contribution({"head.weight": torch.zeros(4, 4)}, 10, "other", labels=(7, 8))
    out = bristle.integrate(Contribution(own, 10), [stranger])
    torch.testing.assert_close(out["head.weight"], own["head.weight"])


def test_overlap_judges_a_peer_on_its_best_classes_only():
    bristle = Bristle(lambda s: np.zeros(4), familiar=[0, 1, 2, 3], rng=random.Random(0))
    own_f1, peer_f1 = np.array([0.9, 0.9, 0.9, 0.9]), np.array([0.9, 0.9, 0.0, 0.0])
    omega_all, big_omega_all = bristle.weights(own_f1, peer_f1)
    omega_two, big_omega_two = bristle.weights(own_f1, peer_f1, overlap=2)
    assert omega_two[:2].tolist() == pytest.approx([0.9, 0.9]) and omega_two[2:].tolist() == [0.0, 0.0]
    assert big_omega_two > 0 and big_omega_all == 0.0  # judged on all four, the two bad classes sink Ω
    assert omega_all.tolist() == [0.0] * 4  # and its certainty: mean - std of [0.9, 0.9, 0, 0] is 0


def test_a_node_holds_out_its_local_test_set_and_trains_only_its_own_rows():
    from shoal.learning.bristle import bristle_node, hold_out
    from shoal.learning.learner import Learner
    from shoal.learning.models import build_model
    from shoal.learning.task import classification

    y = torch.tensor([0] * 15 + [2] * 4 + [3] * 12)
    x = torch.randn(len(y), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model = build_model("frozen-cnn", (1, 8, 8), 5, seed=0)
    _, _, x_test, y_test = hold_out(x, y, per_class=10)
    assert sorted(y_test.tolist()) == [0] * 10 + [2] * 4 + [3] * 10 and len(x_test) == 24
    node = bristle_node(model, x, y, random.Random(0))
    assert sorted(node.y_train.tolist()) == [0] * 5 + [3] * 2  # class 2 went whole into the test set
    assert len(node.x_train) == 7 and len(y) == 31  # the shard given is left as it was
    assert node.integrator.familiar == [0, 2, 3] and node.labels == [0, 3]
    task = classification(model, node.x_train, node.y_train, steps=3, lr=0.5)
    learner = Learner(task, only_rows=node.only_rows)
    before = learner.initial_state()
    after, _ = learner.train(before, round=1)
    assert (after["head.weight"] != before["head.weight"]).any(dim=1).tolist() == [1, 0, 0, 1, 0]
    assert node.integrator.scorer(after).shape == (5,)

    with pytest.raises(ValueError, match="frozen-cnn or head"):
        bristle_node(build_model("mlp", (1, 8, 8), 5, seed=0), x, y, random.Random(0))
