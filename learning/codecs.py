"""Tensor codecs for the models peers exchange: fewer bytes per parameter, decoded as hostile input.

A codec turns a model (named tensors) into *wire tensors* that ``overlay.wire`` can carry, and back.
Only floating-point tensors are compressed; every other tensor (step counters) rides whole under its
own name. Cost per floating-point element, against 4 B for ``fp32``:

- ``fp16`` / ``bf16``: 2 B (2x). hivemind's ``Float16Compression`` clamps to ±65504 before the cast so
  that a large finite weight does not arrive as inf; we do the same, and clamp for ``bf16`` too;
- ``int8``: 1 B plus a float32 scale per ``BLOCK`` elements, 1 + 4/2048 B (3.99x). One absmax scale per
  block, as in hivemind's ``BLOCKWISE_8BIT`` (bitsandbytes ``quantize_blockwise``; Dettmers et al.,
  "8-bit Optimizers via Block-wise Quantization", 2022), so that one outlier coarsens 2048 values, not a
  whole layer; the code is linear (q = round(x / scale)) rather than a codebook, which needs neither
  bitsandbytes nor a 256-entry table to validate;
- top-k (:func:`sparsify`, for deltas): where the kept elements are as whichever is smaller, a bitmap
  (1 bit per element; none if all are kept) or int32 indices (4 B per kept element, smaller below 1/32
  kept), and their values with a float32 scale per ``BLOCK`` of them, as int8 codes like ``int8``'s (30%
  kept: 0.125 + 0.3 B per element, 9.4x) or, as in SparseLoCo (Sarfi et al., 2025), 4- or 2-bit codes
  (2% kept, 2 bits: 0.08 + 0.005 B, 47x: the positions cost most), or 1-bit ones, a sign times the
  block's mean magnitude as in 1-bit Adam (all kept: 0.127 B, 31x). Lin et al., "Deep Gradient
  Compression" (ICLR 2018) keep what top-k drops in a local residual and add it to the next delta
  (error feedback), so nothing is lost, only delayed; quantised values are lossy the same way, and their
  error is fed back too. Against float16 values at the same share kept (docs/measurements.md): int8
  takes 14-30% fewer bytes to the target accuracy, and is no less accurate;
- top-k on a grid (``learning.grid``): every kept value rounded to one step for the whole message and
  deflated, about 1.3-1.5 bits a value where a round's difference varies in scale across tensors.

Decoding (:func:`decompress`, :func:`densify`) takes the wire tensors of an untrusted peer and a template
(our own model): names, dtypes and shapes must be exactly what our model would produce, values must be
in range, and the result must be finite. Every check is one vectorised pass, and every failure is a
:class:`CodecError` with the reason, never another exception. A decoded model uses only correctly
rounded element-wise operations (casts, one multiply), so it is bit-identical on every machine: a sender
decodes its own wire tensors to know exactly what receivers hold (for error feedback). Results never
share memory with the wire tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping

import torch

from shoal.learning.grid import deflated_codes, grid_levels, inflated_codes
from shoal.learning.messages import quote
from shoal.learning.packing import BLOCK, blocks, pack, per_block, scaled, unpack

Tensor = torch.Tensor

STATELESS = ("fp32", "fp16", "bf16", "int8")
# of the wire tensors, in the task id; 2: top-k positions as a bitmap or indices, int8 values (1-, 2- and
# 4-bit values and the grid came later, named in the task id by CodecConfig.task_name)
FORMAT = 2
# int8 carries magnitudes up to 2**127 (a model with larger values has diverged anyway). A received scale
# may be up to float32-max / 128: then 127 * scale stays finite in float32, while any honest scale,
# at most 2**127 / 127, is below it.
INT8_RANGE = 2.0**127
MAX_SCALE = torch.finfo(torch.float32).max / 128
MAX_INDEX = 2**31 - 1  # top-k indices are int32
VALUE_BITS = (1, 2, 4, 8)  # top-k: bits per kept value, 8 as int8 codes (#q), 1, 2, 4 packed (#v1, #v2, #v4)
MAX_GRID = 16.0  # top-k on a grid: the most mean magnitudes a step (codes reach 8 steps)

_CAST = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CodecError(ValueError):
    """Wire tensors that are not a valid encoding of a model shaped like ours; the message says why."""


def wire_bytes(wire: Mapping[str, Tensor]) -> int:
    """Bytes of tensor data in ``wire`` (what a codec saves; the wire header adds a few per tensor)."""
    return sum(t.nbytes for t in wire.values())


# --- encoding (our own models: a bad input is our bug, a ValueError) ------------------------------


def compress(codec: str, model: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The wire tensors of ``model`` under ``codec`` (one of :data:`STATELESS`); new tensors, not views."""
    if codec not in STATELESS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {STATELESS}")
    wire: dict[str, Tensor] = {}
    for name, t in _own(model):
        if not t.is_floating_point():
            wire[name] = _whole(t)
        elif codec == "int8":
            wire[f"{name}#q"], wire[f"{name}#s"] = _quantize(t)
        else:
            wire[name] = _cast(t, _CAST[codec])
    return wire


def sparsify(
    delta: Mapping[str, Tensor], fraction: float, bits: int = 8, grid: float = 0.0
) -> dict[str, Tensor]:
    """The wire tensors of the top ``fraction`` of each floating-point tensor of ``delta`` by magnitude.

    Keeps k = ceil(fraction * numel) elements (at least one, at most all); what is dropped is the caller's
    residual (error feedback). Where they are goes as whichever is smaller (the bitmap on a tie): a bitmap
    (``#m``, ceil(numel / 8) bytes; empty when all are kept), or sorted int32 indices (``#i``). Their
    values, in index order: for ``bits`` 8 as the int8 codec codes a tensor (``#q``, ``#s``); for 4, 2
    or 1, packed ``bits``-bit codes (``#v4``, ``#v2``, ``#v1``: :func:`_quantize_low`) and a float32
    scale per ``BLOCK`` of them (``#s``). With ``grid`` > 0, ``bits`` is unused: every value goes on one
    grid, ``grid`` times the mean kept magnitude apart (``learning.grid``: ``#g``, and the step as ``#s``).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if not isinstance(bits, int) or bits not in VALUE_BITS:
        raise ValueError(f"bits must be one of {VALUE_BITS}, got {bits!r}")
    if not (grid == 0 or 0 < grid <= MAX_GRID):
        raise ValueError(f"grid must be 0 or in (0, {MAX_GRID}], got {grid!r}")
    wire: dict[str, Tensor] = {}
    kept: dict[str, Tensor] = {}
    for name, t in _own(delta):
        if not t.is_floating_point():
            wire[name] = _whole(t)
            continue
        n = t.numel()
        flat = t.detach().reshape(-1)
        k = min(n, max(1, math.ceil(fraction * n)))
        index = torch.arange(n) if k == n else torch.topk(flat.abs(), k, sorted=False).indices.sort().values
        if k == n:  # all kept: an empty bitmap
            wire[f"{name}#m"] = torch.zeros(0, dtype=torch.uint8)
        elif -(-n // 8) <= 4 * k:
            wire[f"{name}#m"] = pack(torch.zeros(n, dtype=torch.uint8).index_fill_(0, index, 1), 1)
        elif n > MAX_INDEX:
            raise ValueError(f"{name!r} has {n} elements, more than int32 indices can address")
        else:
            wire[f"{name}#i"] = index.to(torch.int32)
        kept[name] = flat[index]
    if grid:  # one step for the whole message, from the mean kept magnitude; never past the largest, so
        # that values all of one magnitude (a sign-like difference) do not all round to 0, round after round
        count = max(1, sum(len(v) for v in kept.values()))
        mean = sum(float(v.abs().sum(dtype=torch.float64)) for v in kept.values()) / count
        largest = max((float(v.abs().max()) for v in kept.values() if len(v)), default=0.0)
        step = torch.tensor([min(grid * mean, largest)], dtype=torch.float32).clamp(max=MAX_SCALE)
    for name, values in kept.items():
        if grid:
            wire[f"{name}#g"], wire[f"{name}#s"] = deflated_codes(values, float(step)), step.clone()
        else:
            codes, wire[f"{name}#s"] = _quantize(values) if bits == 8 else _quantize_low(values, bits)
            wire[f"{name}#q" if bits == 8 else f"{name}#v{bits}"] = codes
    return wire


def _own(model: Mapping[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Our model's tensors, refusing what no codec can carry: reserved names and non-finite values."""
    for name, t in model.items():
        _check_name(name)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{name!r} contains NaN or infinite values, which receivers refuse")
        yield name, t


def _check_name(name: object) -> None:
    if not isinstance(name, str) or "#" in name:
        raise ValueError(f"tensor name {name!r} is not a string or contains '#', which codecs reserve")


def _whole(t: Tensor) -> Tensor:
    return t.detach().clone(memory_format=torch.contiguous_format)


@functools.cache
def _bound(wire: torch.dtype, source: torch.dtype) -> float | None:
    """The largest value of ``wire`` that is finite again in ``source``, if below ``source``'s maximum:
    clamped there, no finite value becomes inf either way (bfloat16 rounds 65504 up to 65536, inf in
    float16)."""
    limit = min(torch.finfo(wire).max, torch.finfo(source).max)
    top = torch.tensor(limit, dtype=torch.float64).to(wire)
    while top.item() > limit:
        top = torch.nextafter(top, torch.zeros_like(top))
    bound = top.item()
    return bound if bound < torch.finfo(source).max else None


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    t = t.detach()
    bound = _bound(dtype, t.dtype)
    if bound is not None:
        # In float32 or float64, where the bound is exact: clamping a bfloat16 tensor to 65504 gives 65536.
        work = torch.float64 if t.dtype == torch.float64 else torch.float32
        t = t.to(work).clamp(-bound, bound)
    return t.to(dtype, copy=True, memory_format=torch.contiguous_format)


def _quantize(t: Tensor) -> tuple[Tensor, Tensor]:
    flat = t.detach().reshape(-1).to(torch.float32).clamp(-INT8_RANGE, INT8_RANGE)
    head, tail = blocks(flat)
    scale = per_block(flat.abs(), lambda b: b.amax(1)) / 127
    # A zero scale (all-zero block, or an absmax so small that absmax / 127 underflows) encodes zeros.
    divisor = torch.where(scale > 0, scale, 1.0)
    q = torch.cat([(head / divisor[: len(head), None]).reshape(-1), tail / divisor[len(head) :]])
    return q.round_().clamp_(-127, 127).to(torch.int8), scale


def _quantize_low(t: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``t`` as packed ``bits``-bit codes and their block scales. Code c stands for (c - 2**(bits - 1) +
    0.5) * scale: a mid-rise grid, no zero level, as top-k keeps no values near zero worth one.

    Per block, whichever of two scales rebuilds it with the lower squared error: absmax (top level on the
    largest magnitude) or twice the mean magnitude (lowest level on the mean, the largest clamped): never
    more error than the block's energy (at most sum(x**2) - n * mean**2), where absmax can give many
    times it on heavy tails (docs/measurements.md, "2- and 4-bit top-k values").
    """
    half = 2 ** (bits - 1)
    x = t.detach().reshape(-1).to(torch.float64).clamp(-INT8_RANGE, INT8_RANGE)
    absmax = per_block(x.abs(), lambda b: b.amax(1))
    mean = per_block(x.abs(), lambda b: b.mean(1))
    scales = torch.stack([absmax / (half - 0.5), 2 * mean]).clamp(max=MAX_SCALE).to(torch.float32)
    divisors = torch.where(scales > 0, scales, 1.0).double().repeat_interleave(BLOCK, dim=1)[:, : len(x)]
    codes = ((x / divisors).floor_() + half).clamp_(0, 2 * half - 1).to(torch.uint8)
    errors = [per_block((_levels(c, s, half) - x) ** 2, lambda b: b.sum(1)) for c, s in zip(codes, scales)]
    pick = torch.stack(errors).argmin(0)  # the absmax scale on a tie
    chosen = codes.gather(0, pick.repeat_interleave(BLOCK)[None, : len(x)])[0]
    return pack(chosen, bits), scales.gather(0, pick[None])[0]


def _levels(codes: Tensor, scale: Tensor, half: int) -> Tensor:
    """The float32 values of mid-rise ``codes`` in [0, 2 * ``half``): exact but for one rounded multiply."""
    return scaled(codes.to(torch.float32) - (half - 0.5), scale)


# --- decoding (a peer's wire tensors: everything is checked, failures are CodecErrors) -------------


def decompress(codec: str, wire: Mapping[str, Tensor], template: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model that ``wire`` encodes under ``codec``, with exactly ``template``'s names, shapes, dtypes."""
    if codec not in STATELESS:
        raise CodecError(f"unknown codec {quote(codec)}; expected one of {STATELESS}")
    keys = (lambda n: (f"{n}#q", f"{n}#s")) if codec == "int8" else (lambda n: (n,))
    wire = _expect(wire, template, keys)
    out: dict[str, Tensor] = {}
    for name, ref in template.items():
        if not ref.is_floating_point():
            out[name] = _whole_from(wire, name, ref)
        elif codec == "int8":
            out[name] = _dequantize(wire, name, ref)
        else:
            t = _tensor(wire, name, _CAST[codec], ref.shape)
            x = t.to(ref.dtype, copy=True, memory_format=torch.contiguous_format)
            out[name] = _finite(x, name, t, name)
    return out


def densify(wire: Mapping[str, Tensor], template: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The dense delta that top-k ``wire`` encodes: zeros but where it keeps values, in ``template``'s
    dtypes."""
    wire = _expect(wire, template, lambda n: (_where_key(wire, n), _value_key(wire, n), f"{n}#s"))
    out: dict[str, Tensor] = {}
    for name, ref in template.items():
        if not ref.is_floating_point():
            out[name] = _whole_from(wire, name, ref)
            continue
        kept = _kept(wire, name, ref.numel())
        skey, vkey = f"{name}#s", _value_key(wire, name)
        reader = _int8_values if vkey.endswith("#q") else _grid_values if vkey.endswith("#g") else _low_values
        values = reader(wire, vkey, skey, int(kept.sum()))
        x = torch.zeros(ref.numel(), dtype=ref.dtype)
        x[kept] = values.to(ref.dtype)
        out[name] = _finite(x.reshape(ref.shape), name, wire[skey], skey)
    return out


def _where_key(wire: Mapping[str, Tensor], name: str) -> str:
    """The key of where ``name``'s kept values go: its bitmap if the wire holds one, else its indices."""
    return f"{name}#m" if f"{name}#m" in wire else f"{name}#i"


def _value_key(wire: Mapping[str, Tensor], name: str) -> str:
    """The key of ``name``'s values: its int8, 1-, 2-, 4-bit or grid codes, whichever the wire holds first."""
    return next(
        (key for s in ("#q", "#v1", "#v2", "#v4", "#g") if (key := f"{name}{s}") in wire), f"{name}#q"
    )


def _kept(wire: Mapping[str, Tensor], name: str, n: int) -> Tensor:
    """Which of ``name``'s ``n`` elements the wire keeps, as a mask, from its bitmap or its indices."""
    key = _where_key(wire, name)
    if key.endswith("#m") and _tensor(wire, key, torch.uint8).shape == (0,):  # all kept
        return torch.ones(n, dtype=torch.bool)
    if key.endswith("#m"):
        bits = unpack(_tensor(wire, key, torch.uint8, (-(-n // 8),)), 1).bool()
        if bits[n:].any():
            raise CodecError(f"{key!r} has bits set past the {n} elements of {name!r}")
        return bits[:n]
    index = _tensor(wire, key, torch.int32)
    if index.dim() != 1:
        raise CodecError(f"{key!r} has shape {_shape(index)}, expected a 1-D tensor")
    if len(index) > n:
        raise CodecError(f"{key!r} holds {len(index)} indices, more than the {n} elements of {name!r}")
    if len(index):
        low, high = index.min().item(), index.max().item()
        if low < 0 or high >= n:
            bad = low if low < 0 else high
            raise CodecError(f"{key!r} has index {bad}, outside [0, {n}) for {name!r}")
        if not (index[1:] > index[:-1]).all():
            raise CodecError(f"{key!r} is not strictly increasing (indices repeated or unsorted)")
    kept = torch.zeros(n, dtype=torch.bool)
    kept[index.long()] = True
    return kept


def _expect(
    wire: object, template: Mapping[str, Tensor], keys: Callable[[str], tuple[str, ...]]
) -> Mapping[str, Tensor]:
    """``wire`` if it holds exactly the names the codec makes of ``template``: ``keys(name)`` for each
    floating-point tensor (called once ``wire`` is known to be a map), the name itself for the others."""
    for name in template:
        _check_name(name)
    if not isinstance(wire, Mapping):
        raise CodecError(f"wire tensors must be a map of names to tensors, got {quote(type(wire).__name__)}")
    expected = [k for name, t in template.items() for k in (keys(name) if t.is_floating_point() else (name,))]
    for key in expected:
        if key not in wire:
            raise CodecError(f"missing wire tensor {key!r}")
    known = set(expected)
    extra = [k for k in wire if k not in known]
    if extra:
        raise CodecError(f"{len(extra)} unexpected wire tensor(s), such as {quote(extra[0])}")
    return wire


def _tensor(
    wire: Mapping[str, Tensor], key: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None
) -> Tensor:
    """``wire[key]`` if it is a plain CPU tensor of ``dtype`` (and ``shape``), detached."""
    t = wire[key]
    if not isinstance(t, Tensor):
        raise CodecError(f"{key!r} is not a tensor but {quote(type(t).__name__)}")
    if t.layout != torch.strided or t.is_nested or t.device.type != "cpu":
        raise CodecError(f"{key!r} is not a dense CPU tensor ({t.layout}, {t.device.type})")
    if t.dtype != dtype:
        raise CodecError(f"{key!r} has dtype {t.dtype}, expected {dtype}")
    if shape is not None and t.shape != shape:
        raise CodecError(f"{key!r} has shape {_shape(t)}, expected {tuple(shape)}")
    return t.detach()


def _shape(t: Tensor) -> str:
    return quote(tuple(t.shape))


def _whole_from(wire: Mapping[str, Tensor], name: str, ref: Tensor) -> Tensor:
    return _tensor(wire, name, ref.dtype, ref.shape).clone(memory_format=torch.contiguous_format)


def _finite(x: Tensor, name: str, source: Tensor, key: str) -> Tensor:
    """``x`` (decoded ``name``) if finite; else why, blaming ``source`` (``wire[key]``) if it was not."""
    if not torch.isfinite(x).all():
        if not torch.isfinite(source).all():
            raise CodecError(f"{key!r} contains NaN or infinite values")
        raise CodecError(f"{name!r} overflows {x.dtype} when decoded")
    return x


def _dequantize(wire: Mapping[str, Tensor], name: str, ref: Tensor) -> Tensor:
    skey = f"{name}#s"
    x = _int8_values(wire, f"{name}#q", skey, ref.numel())
    return _finite(x.reshape(ref.shape).to(ref.dtype), name, wire[skey], skey)


def _int8_values(wire: Mapping[str, Tensor], qkey: str, skey: str, n: int) -> Tensor:
    """The ``n`` float32 values of int8 codes ``wire[qkey]`` and block scales ``wire[skey]``, all finite."""
    q = _tensor(wire, qkey, torch.int8, (n,))
    scale = _scales(wire, skey, n)
    if (q == -128).any():
        raise CodecError(f"{qkey!r} contains -128, outside the symmetric code [-127, 127]")
    return scaled(q.to(torch.float32, memory_format=torch.contiguous_format), scale)


def _low_values(wire: Mapping[str, Tensor], vkey: str, skey: str, n: int) -> Tensor:
    """The ``n`` float32 values of packed codes ``wire[vkey]`` (``#v1``, ``#v2``, ``#v4``) and block scales
    ``wire[skey]``; ``n`` (at most the template's elements) bounds what is unpacked."""
    bits = int(vkey[-1])
    codes = unpack(_tensor(wire, vkey, torch.uint8, (-(-n * bits // 8),)), bits)
    if codes[n:].any():
        raise CodecError(f"{vkey!r} has padding bits set past its {n} codes")
    return _levels(codes[:n], _scales(wire, skey, n), 2 ** (bits - 1))


def _grid_values(wire: Mapping[str, Tensor], gkey: str, skey: str, n: int) -> Tensor:
    """The ``n`` float32 values of deflated grid codes ``wire[gkey]`` and their step ``wire[skey]``."""
    data = _tensor(wire, gkey, torch.uint8)
    if data.dim() != 1:
        raise CodecError(f"{gkey!r} has shape {_shape(data)}, expected a 1-D tensor")
    codes = inflated_codes(data, n, CodecError, gkey)
    return grid_levels(codes, _scales(wire, skey, 1))


def _scales(wire: Mapping[str, Tensor], skey: str, n: int) -> Tensor:
    """The block scales of ``n`` values, if each is finite, non-negative and at most :data:`MAX_SCALE`."""
    scale = _tensor(wire, skey, torch.float32, (-(-n // BLOCK),))
    if not torch.isfinite(scale).all():
        raise CodecError(f"{skey!r} contains NaN or infinite scales")
    if len(scale) and (low := scale.min().item()) < 0:
        raise CodecError(f"{skey!r} contains a negative scale {low:.3g}")
    if len(scale) and (high := scale.max().item()) > MAX_SCALE:
        raise CodecError(f"{skey!r} contains scale {high:.3g}, over {MAX_SCALE:.3g}: values would overflow")
    return scale
