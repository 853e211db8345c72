import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.learning.partition import class_histograms, partition

labels_strategy = st.lists(st.integers(0, 9), min_size=20, max_size=400).map(np.array)


def assert_exact_cover(parts, n):
    everything = np.concatenate(parts)
    assert len(everything) == n and np.array_equal(np.sort(everything), np.arange(n))


@settings(max_examples=60, deadline=None)
@given(labels=labels_strategy, nodes=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_iid_and_dirichlet_cover_every_sample_once(labels, nodes, seed):
    for scheme in ("iid", "dirichlet:0.3", "dirichlet:100"):
        parts = partition(labels, nodes, scheme, seed)
        assert len(parts) == nodes
        assert_exact_cover(parts, len(labels))
        assert all(np.array_equal(a, b) for a, b in zip(parts, partition(labels, nodes, scheme, seed)))


@settings(max_examples=60, deadline=None)
@given(labels=labels_strategy, nodes=st.integers(1, 12), k=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_shards_give_exactly_k_classes(labels, nodes, k, seed):
    classes = len(np.unique(labels))
    if nodes * k < classes or k > classes:
        with pytest.raises(ValueError):
            partition(labels, nodes, f"shards:{k}", seed)
        return
    parts = partition(labels, nodes, f"shards:{k}", seed)
    assert_exact_cover(parts, len(labels))
    hist = class_histograms(labels, parts, 10)
    # a node holds at most k classes; fewer only when a class has fewer samples than holders
    assert ((hist > 0).sum(axis=1) <= k).all()


def test_iid_is_balanced_and_dirichlet_is_skewed():
    labels = np.repeat(np.arange(10), 200)
    iid = class_histograms(labels, partition(labels, 10, "iid", 0), 10)
    skew = class_histograms(labels, partition(labels, 10, "dirichlet:0.1", 0), 10)
    assert iid.sum(axis=1).min() == 200
    assert iid.min() > 5  # every node sees every class
    # label skew: each node's largest class dominates, unlike IID where it is ~10%
    assert (skew.max(axis=1) / skew.sum(axis=1)).mean() > 0.4
    assert (iid.max(axis=1) / iid.sum(axis=1)).max() < 0.2
    assert iid.sum() == skew.sum() == 2000


def test_seed_changes_the_split_and_bad_schemes_fail():
    labels = np.repeat(np.arange(10), 20)
    assert not np.array_equal(partition(labels, 4, "iid", 1)[0], partition(labels, 4, "iid", 2)[0])
    for scheme in ("zipf", "dirichlet", "dirichlet:x", "shards:0", "iid:3"):
        with pytest.raises(ValueError, match="partition scheme"):
            partition(labels, 4, scheme, 0)
