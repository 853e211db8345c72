"""Values on a uniform grid, entropy-coded: the top-k codec's densest way to send a difference.

A value x goes as the integer code round(x / step), clamped to [-8, 7] (what is rounded or clamped off
is the caller's error feedback), packed two 4-bit codes to a byte (``learning.packing``) and deflated.
One step serves a whole message (``learning.codecs.sparsify``): for the least squared error at a given
size, every value gets the same grid, however large its tensor's values are (reverse water-filling; a
step per block, as the fixed-width codes have, spends bits on blocks whose error hardly counts). With a
zero level most codes are the few around zero, which deflate's Huffman codes take to about 1.4 bits a
value at 2.4 mean magnitudes a step on a DiLoCo round (docs/measurements.md, "Values on a grid").

Inflating is hostile input: a stream no longer than deflate's bound for the codes, inflated at most one
byte past them, must end exactly at their count; any other stream is a
:class:`~learning.codecs.CodecError` (raised by the caller's type, given here).
"""

from __future__ import annotations

import math
import zlib

import torch

from shoal.learning.packing import pack, unpack

Tensor = torch.Tensor

LOW, HIGH = -8, 7  # a 4-bit code holds LOW..HIGH as 0..15
LEVEL = 6  # zlib's default; Huffman codes only: string matches cost more than they save on codes


def deflated_codes(values: Tensor, step: float) -> Tensor:
    """``values`` (1-D) as deflated codes on a grid ``step`` apart (no grid when ``step`` is 0: all 0),
    none beyond what ``values``' dtype holds (a float16 value must not come back as inf)."""
    codes = values.detach().to(torch.float64, copy=True)
    if step > 0:
        limit = torch.finfo(values.dtype).max / step
        top = HIGH if limit >= HIGH else math.floor(limit)
        codes.div_(step).round_().clamp_(max(LOW, -top), top)
    else:
        codes.zero_()
    packed = pack(codes.sub_(LOW).to(torch.uint8), 4)
    deflater = zlib.compressobj(LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    data = deflater.compress(packed.numpy().tobytes()) + deflater.flush()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def grid_levels(codes: Tensor, step: Tensor) -> Tensor:
    """The float32 values of ``codes`` (LOW..HIGH) on a grid ``step`` (a 1-element float32 tensor) apart:
    one correctly rounded multiply, so sender and receivers hold the same values."""
    return codes.to(torch.float32) * step


def inflated_codes(data: Tensor, n: int, error: type[Exception], key: str) -> Tensor:
    """The ``n`` codes (LOW..HIGH, int8) that ``data`` deflates; ``error`` naming ``key`` if it does not
    inflate to exactly ``n`` codes with zero padding."""
    size = -(-n // 2)
    if len(data) > size + (size + 7) // 8 + (size + 63) // 64 + 11:  # zlib's deflateBound, any settings
        raise error(f"{key!r} holds {len(data)} bytes, more than any deflate stream of {size} bytes")
    inflater = zlib.decompressobj()
    try:  # at most one byte too many (a max_length of 0 would inflate without bound)
        raw = inflater.decompress(data.numpy().tobytes(), size + 1)
    except zlib.error as e:
        raise error(f"{key!r} does not inflate: {e}") from None
    if len(raw) != size or not inflater.eof or inflater.unused_data:
        raise error(f"{key!r} does not inflate to exactly the {size} bytes of {n} codes")
    packed = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
    codes = unpack(packed, 4)
    if codes[n:].any():
        raise error(f"{key!r} has padding set past its {n} codes")
    return codes[:n].to(torch.int8) + LOW
