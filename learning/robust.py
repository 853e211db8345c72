"""Byzantine-robust baselines behind the Integrator interface: median, trimmed mean, (multi-)Krum.

Each treats the node's own model and the received ones alike, flattened to vectors:
- coordinate-wise median (Yin et al. 2018);
- trimmed mean: drop the ``b`` largest and ``b`` smallest values per coordinate (Bridge, Yang & Bajwa
  2019); with fewer than 2b+1 models it trims as many as it can and keeps at least one;
- Krum / multi-Krum (Blanchard et al. 2017): score each model by the summed squared distances to its
  n−f−2 nearest others, keep the ``m`` best-scored and average them (m=1 is Krum).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from shoal.learning.averaging import check_models
from shoal.learning.protocol import State

if TYPE_CHECKING:  # learning.integrators names these rules, so it imports this module
    from shoal.learning.integrators import Contribution


def _stack(models: Sequence[State]) -> torch.Tensor:
    check_models(models)
    return torch.stack([torch.cat([t.reshape(-1).double() for t in m.values()]) for m in models])


def _unstack(flat: torch.Tensor, like: State) -> State:
    out, start = {}, 0
    for name, t in like.items():
        out[name] = flat[start : start + t.numel()].reshape(t.shape).to(t.dtype)
        start += t.numel()
    return out


class Median:
    def integrate(self, own: Contribution, received: Sequence[Contribution]) -> State:
        models = [own.state, *(c.state for c in received)]
        return _unstack(_stack(models).median(dim=0).values, own.state)


class TrimmedMean:
    def __init__(self, b: int = 4):
        if b < 0:
            raise ValueError(f"trimmed mean needs b >= 0, got {b}")
        self.b = b

    def integrate(self, own: Contribution, received: Sequence[Contribution]) -> State:
        flat = _stack([own.state, *(c.state for c in received)])
        b = min(self.b, (len(flat) - 1) // 2)
        kept = flat.sort(dim=0).values[b : len(flat) - b]
        return _unstack(kept.mean(dim=0), own.state)


class Krum:
    def __init__(self, f: int = 4, m: int = 1):
        if f < 0 or m < 1:
            raise ValueError(f"Krum needs f >= 0 and m >= 1, got f={f}, m={m}")
        self.f, self.m = f, m

    def integrate(self, own: Contribution, received: Sequence[Contribution]) -> State:
        flat = _stack([own.state, *(c.state for c in received)])
        n = len(flat)
        neighbours = max(1, n - self.f - 2)
        if n == 1:
            return own.state
        distances = torch.cdist(flat, flat).pow(2)
        nearest = distances.sort(dim=1).values[:, 1 : neighbours + 1]  # column 0 is the model itself
        best = nearest.sum(dim=1).argsort()[: self.m]
        return _unstack(flat[best].mean(dim=0), own.state)
