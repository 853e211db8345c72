"""Models and wire tensors for the codec tests: a model of every dtype the wire carries, bit-level
comparison, top-k's position forms, and a reference for its 2- and 4-bit values."""

import numpy as np
import torch

from shoal.learning.packing import BLOCK


def model(seed=0):
    """Floats of every width the wire carries, a multi-block tensor, an empty one, and non-floats."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 1500, generator=g),  # 4500 elements: two full blocks and a short one
        "b": torch.randn(7, generator=g),
        "h": torch.randn(5, generator=g).to(torch.float16),
        "bf": torch.randn(4, generator=g).to(torch.bfloat16),
        "d": torch.randn(6, generator=g, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "steps": torch.tensor([3, -1], dtype=torch.int64),
        "mask": torch.tensor([[0, 255], [7, 1]], dtype=torch.uint8),
    }


def bits(t):
    return t.reshape(-1).view(torch.uint8)


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def assert_shaped_like(out, template):
    assert list(out) == list(template)
    for name, ref in template.items():
        assert out[name].dtype == ref.dtype and out[name].shape == ref.shape, name
        if ref.is_floating_point():
            assert torch.isfinite(out[name]).all(), name


def pack(mask):
    """A bitmap as the codec must make it (numpy's, little bit order): element i, bit i % 8 of byte i // 8."""
    return torch.from_numpy(np.packbits(np.asarray(mask, dtype=bool), bitorder="little"))


def kept_positions(wire, name, n):
    """Where ``wire`` keeps ``name``'s values: from its bitmap or its indices, whichever it holds."""
    if f"{name}#m" in wire and not wire[f"{name}#m"].numel():  # every value kept
        return torch.arange(n)
    if f"{name}#m" in wire:
        bits = np.unpackbits(wire[f"{name}#m"].numpy(), bitorder="little")
        return torch.from_numpy(np.flatnonzero(bits[:n]))
    return wire[f"{name}#i"].long()


def unpack_codes(packed, bits):
    """Every ``bits``-bit code of ``packed``, padding too: code i of a byte in its low bits first."""
    flat = np.unpackbits(packed.numpy(), bitorder="little").reshape(-1, bits)
    return torch.from_numpy(flat @ (1 << np.arange(bits)))


def levels(codes, scales, bits):
    """What mid-rise ``bits``-bit codes stand for, in float32: (code - 2**(bits - 1) + 0.5) * scale."""
    half = 2 ** (bits - 1)
    scale = np.repeat(scales.numpy(), BLOCK)[: len(codes)]
    return torch.from_numpy((np.asarray(codes, dtype=np.float32) - np.float32(half - 0.5)) * scale)


def low_bit_reference(values, bits):
    """Codes and scales as the codec documents them, block by block: the absmax scale or twice the mean
    magnitude, whichever rebuilds the block with the lower squared error (absmax on a tie)."""
    half = 2 ** (bits - 1)
    x = values.double().numpy()
    codes, scales = [], []
    for start in range(0, len(x), BLOCK):
        block = x[start : start + BLOCK]
        best = None
        for scale in (np.abs(block).max() / (half - 0.5), 2 * np.abs(block).mean()):
            scale = np.float32(scale)
            c = np.clip(np.floor(block / (scale if scale > 0 else 1)) + half, 0, 2 * half - 1)
            error = ((levels(c, torch.tensor([scale]), bits).double().numpy() - block) ** 2).sum()
            if best is None or error < best[0]:
                best = error, c, scale
        codes.append(best[1])
        scales.append(best[2])
    return torch.from_numpy(np.concatenate(codes or [[]])).to(torch.uint8), torch.tensor(scales)
