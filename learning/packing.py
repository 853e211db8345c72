"""How codes sit in wire tensors, for every codec: small codes packed into bytes, and values in blocks
of :data:`BLOCK` that share one scale. Encoding and decoding both use these, so they agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor

BLOCK = 2048  # elements per scale (hivemind/bitsandbytes-style blockwise quantization)


def pack(codes: Tensor, bits: int) -> Tensor:
    """``bits``-bit ``codes`` (uint8), 8 // ``bits`` to a byte, code i of a byte in its low bits first,
    padding bits zero: a bitmap (``bits`` 1) has element i in bit i % 8 of byte i // 8."""
    per = 8 // bits
    padded = torch.cat([codes, codes.new_zeros(-len(codes) % per)])
    return (padded.view(-1, per) << torch.arange(0, 8, bits, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack(packed: Tensor, bits: int) -> Tensor:
    """Every ``bits``-bit code of ``packed`` (padding too), 8 // ``bits`` per byte: :func:`pack` undone."""
    return ((packed[:, None] >> torch.arange(0, 8, bits, dtype=torch.uint8)) & (2**bits - 1)).reshape(-1)


def blocks(flat: Tensor) -> tuple[Tensor, Tensor]:
    """A 1-D tensor as a (blocks, BLOCK) view of its full blocks and a view of the shorter last one."""
    full = flat.numel() // BLOCK * BLOCK
    return flat[:full].view(-1, BLOCK), flat[full:]


def per_block(flat: Tensor, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """``reduce`` (of a 2-D tensor's rows) of each ``BLOCK`` of ``flat``, the shorter last one too."""
    head, tail = blocks(flat)
    return torch.cat([reduce(head), reduce(tail[None])]) if tail.numel() else reduce(head)


def scaled(x: Tensor, scale: Tensor) -> Tensor:
    """``x`` (float32, 1-D, our own) times its ``BLOCK``s' scales, in place."""
    head, tail = blocks(x)
    head.mul_(scale[: len(head), None])
    tail.mul_(scale[len(head) :])
    return x
