"""How the top-k codec's value codings trade bytes for error, on the differences it sends.

    python -m benchmarks.value_codes [--seed 1]

For each coding: bits per value on the wire (positions, codes, scales; fp32 is 32) and the squared
error of the decoded difference relative to its own, on three differences: Gaussian values; two
Gaussian tensors, one twenty times smaller than the other; and a DiLoCo round of the language model
(the byte-level transformer trained 200 AdamW steps, then the difference of its next 10). One thread,
a few seconds.
"""

from __future__ import annotations

import argparse

import torch

from shoal.learning.codecs import densify, sparsify, wire_bytes
from shoal.learning.language import make_task

CODINGS = {
    "1 bit, top half (bitmap)": {"fraction": 0.5, "bits": 1},
    "2 bits, all": {"fraction": 1.0, "bits": 2},
    "4 bits, all": {"fraction": 1.0, "bits": 4},
    **{f"grid {g}, all": {"fraction": 1.0, "grid": g} for g in (2.0, 2.4, 2.8)},
}


def language_round(seed: int) -> dict[str, torch.Tensor]:
    """A DiLoCo round's difference: 10 AdamW steps of the language model after 200."""
    task = make_task(0, 16, steps=10, seed=seed)
    model = task.module()
    for r in range(20):
        task.train(model, r)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    task.train(model, 20)
    return {k: v - start[k] for k, v in model.state_dict().items() if v.is_floating_point()}


def measure(delta: dict[str, torch.Tensor], fraction: float, **values: float) -> tuple[float, float]:
    wire = sparsify(delta, fraction, **values)
    out = densify(wire, delta)
    error = sum((out[k] - d).double().square().sum() for k, d in delta.items())
    energy = sum(d.double().square().sum() for d in delta.values())
    return wire_bytes(wire) * 8 / sum(d.numel() for d in delta.values()), float(error / energy)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1)
    seed = p.parse_args().seed
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    cases = {
        "Gaussian": {"x": torch.randn(400_000, generator=g)},
        "two scales": {
            "big": torch.randn(200_000, generator=g),
            "small": torch.randn(200_000, generator=g) / 20,
        },
        "DiLoCo round": language_round(seed),
    }
    print(f"{'coding':<26}" + "".join(f"{name:>26}" for name in cases))
    print(f"{'':<26}" + "".join(f"{'bits/value':>12}{'sq. error':>14}" for _ in cases))
    for label, coding in CODINGS.items():
        cells = (measure(delta, **coding) for delta in cases.values())
        print(f"{label:<26}" + "".join(f"{bits:>12.3f}{error:>14.3f}" for bits, error in cells))


if __name__ == "__main__":
    main()
