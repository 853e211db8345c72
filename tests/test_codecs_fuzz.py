"""Fuzzed, near-valid and mutated wire tensors: every codec decodes them into a finite model shaped like
the template or refuses them with a CodecError, and nothing else."""

import math
import zlib

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.learning.codecs import (
    BLOCK,
    MAX_SCALE,
    STATELESS,
    CodecError,
    compress,
    decompress,
    densify,
    sparsify,
)
from shoal.overlay.wire import DTYPES
from tests.codec_tensors import assert_shaped_like, pack

FUZZ = {
    "w": torch.randn(3, 4, generator=torch.Generator().manual_seed(6)),
    "big": torch.randn(BLOCK + 52, generator=torch.Generator().manual_seed(7)),
    "h": torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=torch.float16),
    "b": torch.tensor([1.0, -1.0], dtype=torch.bfloat16),
    "d": torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64),
    "e": torch.zeros(0),
    "n": torch.tensor([4, 5], dtype=torch.int64),
}
SMALL_FUZZ = {k: v for k, v in FUZZ.items() if k != "big"}
NAMES = [
    *(
        f"{n}{suffix}"
        for n in SMALL_FUZZ
        for suffix in ("", "#q", "#s", "#i", "#m", "#v", "#v2", "#v4", "#g")
    ),
    *("", "junk", "w#", "#q", "w#q#s"),
]
SHAPES = [(3, 4), (12,), (1,), (2,), (3,), (4,), (5,), (0,), (), (6,), (13,), (2, 2)]
FLOAT_SPECIALS = [0.0, -0.0, 1.0, -1.0, 0.5, 127.0, 65504.0, 65520.0, 1e38, 3.4e38, 1e-45]
FLOAT_SPECIALS += [float("nan"), float("inf"), float("-inf"), MAX_SCALE, MAX_SCALE * 1.01]
INT_SPECIALS = [0, 1, 2, -1, -127, -128, 127, 255, 11, 12, 13, 2**31 - 1, -(2**31)]


def special(dtype):
    if dtype.is_floating_point:
        return st.sampled_from(FLOAT_SPECIALS)
    info = torch.iinfo(dtype)
    return st.sampled_from([v for v in INT_SPECIALS if info.min <= v <= info.max])


@st.composite
def tensors(draw, dtype=None, shape=None):
    dtype = dtype or draw(st.sampled_from(list(DTYPES.values())))
    shape = (
        shape
        if shape is not None
        else draw(st.sampled_from(SHAPES) | st.lists(st.integers(0, 4), max_size=3))
    )
    n = math.prod(shape)
    if draw(st.booleans()):
        raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
        flat = (
            torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype)
            if raw
            else torch.empty(0, dtype=dtype)
        )
    else:
        flat = torch.tensor(draw(st.lists(special(dtype), min_size=n, max_size=n)), dtype=torch.float64)
        flat = flat.to(dtype) if dtype.is_floating_point else flat.long().to(dtype)
    t = flat.reshape(shape)
    if t.dim() and draw(st.booleans()):
        t = torch.stack([t, t], dim=-1)[..., 0]  # same shape, not contiguous
    return t


def outcome(decode_, template):
    """A finite model shaped like ``template``, or a CodecError: nothing else may come out."""
    try:
        out = decode_()
    except CodecError:
        return
    assert_shaped_like(out, template)


@settings(max_examples=200, deadline=None)
@given(wire=st.dictionaries(st.sampled_from(NAMES), tensors(), max_size=12))
def test_fuzzed_wire_dicts_decode_or_fail_with_codec_error(wire):
    for codec in STATELESS:
        outcome(lambda c=codec: decompress(c, wire, SMALL_FUZZ), SMALL_FUZZ)
    outcome(lambda: densify(wire, SMALL_FUZZ), SMALL_FUZZ)


TOPK = {"topk": 8, "topk1": 1, "topk2": 2, "topk4": 4, "topk-grid": 0}  # top-k by bits per value (0: grid)


def value_specs(name, k, bits):
    """The wire tensors of ``k`` top-k values of ``bits`` each: codes (int8 or packed) and scales; on a
    grid (``bits`` 0), a stream of a plausible size (mostly not one zlib inflates) and one step."""
    if not bits:
        return [(f"{name}#g", torch.uint8, (k // 4 + 8,)), (f"{name}#s", torch.float32, (1,))]
    codes = (
        (f"{name}#q", torch.int8, (k,))
        if bits == 8
        else (f"{name}#v{bits}", torch.uint8, (-(-k * bits // 8),))
    )
    return [codes, (f"{name}#s", torch.float32, (-(-k // BLOCK),))]


def topk(codec, fraction):
    bits = TOPK[codec]
    return sparsify(FUZZ, fraction, bits) if bits else sparsify(FUZZ, fraction, grid=2.4)


@st.composite
def near_valid_wire(draw, codec, template):
    """What ``codec`` makes of ``template``, names mostly right, tensors mostly of the right dtype and shape
    but with arbitrary values (sorted index sets half the time), some missing, replaced or extra."""
    wire = {}
    for name, ref in template.items():
        n = ref.numel()
        if not ref.is_floating_point():
            specs = [(name, ref.dtype, tuple(ref.shape))]
        elif codec == "int8":
            specs = [(f"{name}#q", torch.int8, (n,)), (f"{name}#s", torch.float32, (math.ceil(n / BLOCK),))]
        elif codec in TOPK and not draw(st.integers(0, 3)):  # every value kept: an empty bitmap
            wire[f"{name}#m"] = torch.zeros(0, dtype=torch.uint8)
            specs = value_specs(name, max(n + draw(st.sampled_from([0, 0, 0, -1, 1])), 0), TOPK[codec])
        elif codec in TOPK and draw(st.booleans()):  # positions as a bitmap
            mask = draw(st.lists(st.booleans(), min_size=-(-n // 8) * 8, max_size=-(-n // 8) * 8))
            if draw(st.integers(0, 3)):  # mostly no padding bits set
                mask[n:] = [False] * (len(mask) - n)
            k = sum(mask) + draw(st.sampled_from([0, 0, 0, -1, 1]))
            wire[f"{name}#m"] = pack(mask)
            specs = value_specs(name, max(k, 0), TOPK[codec])
        elif codec in TOPK:
            k = draw(st.integers(0, n + 1))
            specs = [(f"{name}#i", torch.int32, (k,)), *value_specs(name, k, TOPK[codec])]
        else:
            specs = [(name, compress(codec, {"x": ref})["x"].dtype, tuple(ref.shape))]
        for key, dtype, shape in specs:
            choice = draw(st.integers(0, 29))
            if choice == 0:
                continue
            if choice == 1:
                wire[key] = draw(tensors())
            elif key.endswith("#g") and choice < 16:  # a stream that inflates, mostly to n codes' bytes
                size = draw(st.sampled_from([-(-n // 2)] * 3 + [-(-n // 2) + 1, n // 4]))
                codes = draw(st.binary(min_size=size, max_size=size))
                wire[key] = torch.frombuffer(bytearray(zlib.compress(codes)), dtype=torch.uint8)
            elif key.endswith("#i") and choice < 16:
                chosen = draw(st.lists(st.integers(-1, n), min_size=shape[0], max_size=shape[0], unique=True))
                wire[key] = torch.tensor(sorted(chosen), dtype=torch.int32)
            else:
                wire[key] = draw(tensors(dtype, shape))
    if draw(st.integers(0, 3)) == 0:
        wire[draw(st.sampled_from(NAMES))] = draw(tensors())
    return wire


@settings(max_examples=200, deadline=None)
@given(data=st.data(), codec=st.sampled_from([*STATELESS, *TOPK]))
def test_fuzzed_near_valid_wire_dicts_decode_or_fail_with_codec_error(data, codec):
    wire = data.draw(near_valid_wire(codec, SMALL_FUZZ))
    if codec in TOPK:
        outcome(lambda: densify(wire, SMALL_FUZZ), SMALL_FUZZ)
    else:
        outcome(lambda: decompress(codec, wire, SMALL_FUZZ), SMALL_FUZZ)


@st.composite
def mutation(draw):
    kind = draw(st.sampled_from(["drop", "add", "poke", "poke", "poke", "retype", "resize", "swap"]))
    i, j = draw(st.integers(0, 100)), draw(st.integers(0, 100))
    if kind == "add":
        return kind, draw(st.sampled_from(NAMES)), draw(tensors())
    if kind == "retype":
        return kind, i, draw(st.sampled_from(list(DTYPES.values())))
    if kind == "poke":
        return (
            kind,
            i,
            j,
            draw(st.integers(0, 2**20)),
            draw(st.sampled_from(FLOAT_SPECIALS)),
            draw(special(torch.int8)),
        )
    return kind, i, j


def mutate(wire, op):
    wire = {n: t.clone() for n, t in wire.items()}
    names = list(wire)
    kind, *args = op
    if kind == "add":
        wire[args[0]] = args[1]
        return wire
    name = names[args[0] % len(names)]
    t = wire[name]
    if kind == "drop":
        del wire[name]
    elif kind == "retype":
        wire[name] = t.to(args[1])
    elif kind == "resize":
        flat = t.reshape(-1)
        wire[name] = flat[:-1] if args[1] % 2 and flat.numel() else torch.cat([flat, flat[:1]])
    elif kind == "swap":
        other = names[args[1] % len(names)]
        wire[name], wire[other] = wire[other], t
    elif t.numel():  # poke: one element to an edge value, or an index to a neighbour's
        flat = t.view(-1)
        position = args[2] % flat.numel()
        if t.is_floating_point():
            flat[position] = args[3]
        elif t.dtype == torch.int32 and flat.numel() > 1:
            flat[position] = flat[(position + args[1]) % flat.numel()] + args[4] % 3 - 1
        else:
            flat[position] = max(torch.iinfo(t.dtype).min, min(torch.iinfo(t.dtype).max, args[4]))
    return wire


@settings(max_examples=200, deadline=None)
@given(
    codec=st.sampled_from([*STATELESS, *TOPK]),
    fraction=st.floats(0.001, 1.0),
    ops=st.lists(mutation(), max_size=3),
)
def test_mutated_encodings_decode_or_fail_with_codec_error(codec, fraction, ops):
    wire = topk(codec, fraction) if codec in TOPK else compress(codec, FUZZ)
    for op in ops:
        wire = mutate(wire, op)
    if codec in TOPK:
        outcome(lambda: densify(wire, FUZZ), FUZZ)
    else:
        outcome(lambda: decompress(codec, wire, FUZZ), FUZZ)
    if not ops:  # an untouched encoding always decodes
        out = densify(wire, FUZZ) if codec in TOPK else decompress(codec, wire, FUZZ)
        assert_shaped_like(out, FUZZ)
