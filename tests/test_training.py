import math
import subprocess
import sys

import pytest
import torch

from shoal.learning.datasets import load_dataset
from shoal.learning.models import ParameterLayout, build_model
from shoal.learning.training import evaluate, pick_device, train_local


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def test_training_beats_chance_on_digits(digits):
    model = build_model("mlp", digits.input_shape, digits.num_classes, seed=0)
    before = evaluate(model, digits.x_test, digits.y_test, digits.num_classes)
    stats = train_local(model, digits.x_train, digits.y_train, batch_size=32, lr=0.1, epochs=3, momentum=0.9)
    after = evaluate(model, digits.x_test, digits.y_test, digits.num_classes)
    assert stats.steps == math.ceil(3 * len(digits.x_train) / 32)
    assert before.accuracy < 0.3
    assert after.accuracy > 0.85 and after.loss < before.loss
    assert len(after.per_class_accuracy) == 10 and min(after.per_class_accuracy) > 0.5
    assert after.samples == len(digits.x_test)


def test_training_is_reproducible_on_cpu(digits):
    def trained(seed):
        model = build_model("cnn", digits.input_shape, digits.num_classes, seed=1)
        train_local(model, digits.x_train, digits.y_train, batch_size=16, lr=0.05, steps=30, seed=seed)
        layout = ParameterLayout.of(model)
        return layout.flatten(layout.state(model))

    assert torch.equal(trained(5), trained(5))
    assert not torch.equal(trained(5), trained(6))


@pytest.mark.parametrize("momentum, decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-3)])
def test_steps_are_torch_sgds(digits, momentum, decay):
    """The written-out step is torch.optim.SGD's, so models trained before it are still comparable."""
    model = build_model("cnn", digits.input_shape, digits.num_classes, seed=1)
    reference = build_model("cnn", digits.input_shape, digits.num_classes, seed=1)
    train_local(
        model,
        digits.x_train,
        digits.y_train,
        batch_size=16,
        lr=0.05,
        steps=12,
        momentum=momentum,
        weight_decay=decay,
        seed=3,
    )
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=momentum, weight_decay=decay)
    order = torch.randperm(len(digits.x_train), generator=torch.Generator().manual_seed(3))
    for step in range(12):
        idx = order[step * 16 : (step + 1) * 16]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(reference(digits.x_train[idx]), digits.y_train[idx]).backward()
        optimizer.step()
    assert all(
        torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(model.parameters(), reference.parameters())
    )


def test_training_does_not_import_the_compiler():
    """torch.optim imports torch._dynamo and sympy (1.45 s, 72 MB per daemon): training must not."""
    probe = (
        "import sys, torch; from shoal.learning.training import train_local; "
        "m = torch.nn.Linear(4, 2); train_local(m, torch.randn(8, 4), torch.zeros(8, dtype=torch.long), "
        "batch_size=4, lr=0.1, steps=2, momentum=0.9); print(sorted(k for k in ('torch._dynamo', 'sympy') "
        "if k in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_frozen_features_train_only_the_head(digits):
    model = build_model("frozen-cnn", digits.input_shape, digits.num_classes, seed=0)
    features = [p.clone() for p in model.features.parameters()]
    head = model.head.weight.clone()
    train_local(model, digits.x_train, digits.y_train, batch_size=32, lr=0.1, steps=20)
    assert all(torch.equal(a, b) for a, b in zip(features, model.features.parameters()))
    assert not torch.equal(head, model.head.weight)


def test_per_class_accuracy_marks_absent_classes(digits):
    model = build_model("mlp", digits.input_shape, digits.num_classes, seed=0)
    only_threes = digits.y_test == 3
    ev = evaluate(model, digits.x_test[only_threes], digits.y_test[only_threes], digits.num_classes)
    assert not math.isnan(ev.per_class_accuracy[3])
    assert all(math.isnan(a) for c, a in enumerate(ev.per_class_accuracy) if c != 3)


def test_bad_arguments_and_empty_shard(digits):
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    with pytest.raises(ValueError, match="exactly one"):
        train_local(model, digits.x_train, digits.y_train, batch_size=8, lr=0.1)
    with pytest.raises(ValueError, match="labels"):
        train_local(model, digits.x_train, digits.y_train[:5], batch_size=8, lr=0.1, steps=1)
    assert (
        train_local(model, digits.x_train[:0], digits.y_train[:0], batch_size=8, lr=0.1, steps=3).steps == 0
    )
    assert pick_device().type in {"cpu", "cuda"}


def test_learner_can_keep_training_to_some_output_rows(digits):
    from shoal.learning.learner import Learner
    from shoal.learning.task import classification

    def learner(only_rows: tuple[str, list[int]]) -> Learner:
        model = build_model("frozen-cnn", digits.input_shape, digits.num_classes, seed=0)
        task = classification(model, digits.x_train, digits.y_train, steps=5, lr=0.5)
        return Learner(task, only_rows=only_rows)

    rows = learner(("head.weight", [1, 3]))
    before = rows.initial_state()
    after, _ = rows.train(before, round=1)
    changed = (after["head.weight"] != before["head.weight"]).any(dim=1)
    assert changed.tolist() == [i in (1, 3) for i in range(10)]
    with pytest.raises(ValueError, match="no shared tensor"):
        learner(("features.0.weight", [0]))
