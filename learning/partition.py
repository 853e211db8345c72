"""Split a training set over N nodes, deterministically from a seed.

Every scheme assigns every training sample to exactly one node. Schemes, named as on the CLI:
- ``iid``: a random permutation cut into N near-equal parts.
- ``dirichlet:ALPHA``: label skew; each class is split over the nodes in proportions drawn from
  Dirichlet(ALPHA) (Hsu et al. 2019). Small ALPHA gives few classes per node; some nodes may get none.
- ``shards:K``: exactly K distinct classes per node. Classes are shuffled and dealt round-robin so that
  node i holds K consecutive classes of that order; each class's samples are split evenly over the nodes
  that hold it. Needs N*K >= classes, or some samples would have no node.
"""

from __future__ import annotations

import numpy as np


def partition(labels: np.ndarray, num_nodes: int, scheme: str, seed: int) -> list[np.ndarray]:
    """Indices of each node's samples, for a scheme named as in the module docstring."""
    labels = np.asarray(labels)
    if num_nodes < 1:
        raise ValueError(f"need at least one node, got {num_nodes}")
    kind, _, arg = scheme.partition(":")
    rng = np.random.default_rng(seed)
    if kind == "iid" and not arg:
        return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), num_nodes)]
    if kind == "dirichlet":
        return _dirichlet(labels, num_nodes, _number(scheme, arg, float), rng)
    if kind == "shards":
        return _shards(labels, num_nodes, _number(scheme, arg, int), rng)
    raise ValueError(f"unknown partition scheme {scheme!r}: use iid, dirichlet:ALPHA or shards:K")


def _number(scheme: str, arg: str, kind: type) -> float | int:
    try:
        value = kind(arg)
    except ValueError:
        raise ValueError(f"partition scheme {scheme!r} needs a {kind.__name__} after ':'") from None
    if value <= 0:
        raise ValueError(f"partition scheme {scheme!r} needs a positive number")
    return value


def _dirichlet(
    labels: np.ndarray, num_nodes: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(num_nodes)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(num_nodes, alpha)))[:-1] * len(idx)).astype(int)
        for node, chunk in enumerate(np.split(idx, cuts)):
            parts[node].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def _shards(labels: np.ndarray, num_nodes: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = rng.permutation(np.unique(labels))
    if k > len(classes):
        raise ValueError(f"shards:{k} asks for more classes per node than the {len(classes)} there are")
    if num_nodes * k < len(classes):
        raise ValueError(
            f"shards:{k} over {num_nodes} nodes covers only {num_nodes * k} of {len(classes)} classes; "
            "use more nodes or more classes per node"
        )
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for node in range(num_nodes):
        for j in range(k):
            holders[int(classes[(node * k + j) % len(classes)])].append(node)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_nodes)]
    for c, nodes in holders.items():
        for node, chunk in zip(
            nodes, np.array_split(rng.permutation(np.flatnonzero(labels == c)), len(nodes))
        ):
            parts[node].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]


def class_histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(nodes, classes) matrix of sample counts: how skewed a partition is."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
