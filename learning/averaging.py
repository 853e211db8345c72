"""Averaging of models given as named tensors: plain mean, weighted mean, and VCA.

Variance-corrected averaging (VCA) is from Tian, Al-Ars, Kitsak and Hofstee, "Vanishing Variance Problem
in Fully Decentralized Neural-Network Systems" (arXiv 2404.04616); the exact steps follow the authors'
code. Averaging N uncorrelated models divides each layer's
weight variance by about N; VCA rescales each layer of the average around its mean so that its variance
equals a target: the mean of the inputs' variances ("others"), or a reference model's ("self").
The correction is applied on every averaging: when the inputs are already correlated the factor is ~1.

Every function checks its inputs (same names, shapes and dtypes; finite values, checked through the
result) and raises :class:`AveragingError` rather than produce a model from bad data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

Model = Mapping[str, torch.Tensor]

# Tensors VCA leaves as plain averages: batch-norm statistics (the authors' step 5).
UNCORRECTED_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
# Guards the division only. The authors' torch port uses 1e-4, which is of the order of a small layer's
# variance after averaging (e.g. 3e-4 for a 64-unit layer averaged over 16 nodes) and so undoes part of
# the correction; their C++ code uses 0.
VCA_EPSILON = 1e-8


class AveragingError(ValueError):
    """Models cannot be averaged together; the message says which tensor is wrong."""


def incompatibility(reference: Model, model: Model, *, finite: bool = True) -> str | None:
    """Why ``model`` cannot be averaged with ``reference`` (names, shapes, dtypes, finiteness), or None."""
    if list(model) != list(reference):
        return f"tensor names {list(model)[:3]}... do not match {list(reference)[:3]}..."
    for name, ref in reference.items():
        t = model[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            return f"{name!r} is {t.dtype} {tuple(t.shape)}, expected {ref.dtype} {tuple(ref.shape)}"
        if finite and t.is_floating_point() and not torch.isfinite(t).all():
            return f"{name!r} contains NaN or infinite values"
    return None


def check_models(models: Sequence[Model], *, finite: bool = True) -> None:
    """Raise unless all models have the same names, shapes, dtypes (and, with ``finite``, finite values)."""
    if not models:
        raise AveragingError("nothing to average")
    for i, m in enumerate(models):
        reason = incompatibility(models[0], m, finite=finite)
        if reason:
            raise AveragingError(f"model {i}: {reason}")


def mean(models: Sequence[Model]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the models."""
    return weighted_mean(models, [1.0] * len(models))


def weighted_mean(models: Sequence[Model], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_j w_j θ_j / sum_j w_j, e.g. weighted by each model's number of training samples.

    NaN or Inf in any input makes the average non-finite (even at weight 0, as 0·Inf is NaN), so the
    inputs' values are checked through the result: one check per tensor instead of one per input.
    """
    check_models(models, finite=False)
    if len(weights) != len(models):
        raise AveragingError(f"{len(weights)} weights for {len(models)} models")
    if not all(math.isfinite(v) and v >= 0 for v in weights) or sum(weights) <= 0:
        raise AveragingError(f"weights must be finite, non-negative and not all zero, got {list(weights)}")
    w = torch.as_tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    # every tensor at once: a node-round's averaging is a few calls, not a few per tensor (the simulator
    # spends its time here at 10,000 nodes); the arithmetic per value is the same
    flat = torch.stack([torch.cat([t.reshape(-1) for t in m.values()]) for m in models]).to(torch.float64)
    avg = torch.tensordot(w, flat, dims=1)
    if not torch.isfinite(avg).all():
        check_models(models)  # names the input at fault
        raise AveragingError("the average overflowed to infinite values")
    out = {}
    for (name, ref), part in zip(models[0].items(), avg.split([t.numel() for t in models[0].values()])):
        part = part.reshape(ref.shape)
        out[name] = part.to(ref.dtype, copy=True) if ref.is_floating_point() else part.round().to(ref.dtype)
    return out


def variance_corrected(
    models: Sequence[Model],
    weights: Sequence[float] | None = None,
    *,
    reference: Model | None = None,
) -> dict[str, torch.Tensor]:
    """VCA: the (weighted) mean of ``models``, each layer rescaled to a target variance.

    The target is the mean of the inputs' per-layer variances (the paper's "others" mode, when the node's
    own model is not among ``models``), or the variance of ``reference`` when given ("self" mode).
    """
    weights = [1.0] * len(models) if weights is None else weights
    avg = weighted_mean(models, weights)
    if reference is not None:
        check_models([models[0], reference])
    for name, value in avg.items():
        if value.numel() <= 1 or not value.is_floating_point() or name.endswith(UNCORRECTED_SUFFIXES):
            continue
        if reference is not None:
            target = reference[name].double().var(unbiased=False)
        else:
            target = torch.stack([m[name].double().var(unbiased=False) for m in models]).mean()
        v = value.double()
        mu = v.mean()
        scale = torch.sqrt((target + VCA_EPSILON) / (v.var(unbiased=False) + VCA_EPSILON))
        avg[name] = (mu + (v - mu) * scale).to(value.dtype)
    return avg
