"""The model codecs (learning/codecs.py): round trips within their error bounds, determinism and memory
of their own, and which values and positions top-k keeps."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.learning.codecs import (
    BLOCK,
    STATELESS,
    CodecError,
    compress,
    decompress,
    densify,
    sparsify,
    wire_bytes,
)
from shoal.overlay.wire import Message, decode, encode
from tests.codec_tensors import assert_shaped_like, kept_positions, model, pack, same_bits

# --- round trips ----------------------------------------------------------------------------


def test_fp32_round_trip_is_exact():
    m = model()
    wire = compress("fp32", m)
    assert {n: t.dtype for n, t in wire.items() if m[n].is_floating_point()} == dict.fromkeys(
        ["w", "b", "h", "bf", "d", "empty"], torch.float32
    )
    out = decompress("fp32", wire, m)
    assert_shaped_like(out, m)
    for name in ("w", "b", "h", "bf"):
        assert torch.equal(out[name], m[name])
    assert torch.allclose(out["d"], m["d"], rtol=2**-24, atol=0)


@pytest.mark.parametrize(
    ("codec", "dtype", "rel"), [("fp16", torch.float16, 2**-11), ("bf16", torch.bfloat16, 2**-8)]
)
def test_half_precision_round_trip_has_bounded_relative_error(codec, dtype, rel):
    m = model()
    wire = compress(codec, m)
    assert all(wire[n].dtype == dtype for n in ("w", "b", "h", "bf", "d", "empty"))
    out = decompress(codec, wire, m)
    assert_shaped_like(out, m)
    for name in ("w", "b", "d"):
        x, y = m[name].double(), out[name].double()
        assert ((y - x).abs() <= rel * x.abs() + 2**-24).all(), name


def test_half_precision_clamps_instead_of_overflowing():
    big = {"x": torch.tensor([1e6, -1e30, 65504.0, 1.0])}
    assert decompress("fp16", compress("fp16", big), big)["x"].tolist() == [65504.0, -65504.0, 65504.0, 1.0]
    huge = {"x": torch.tensor([3.4e38, -3.4e38])}
    assert torch.isfinite(decompress("bf16", compress("bf16", huge), huge)["x"]).all()
    # bfloat16 has no 65504: it would round to 65536, inf back in a float16 model.
    half = {"x": torch.tensor([65504.0, -65504.0, 2.0], dtype=torch.float16)}
    assert decompress("bf16", compress("bf16", half), half)["x"].tolist() == [65280.0, -65280.0, 2.0]
    wide = {"x": torch.tensor([1e300, -5.0], dtype=torch.float64)}
    assert decompress("fp32", compress("fp32", wide), wide)["x"][0] == torch.finfo(torch.float32).max


def int8_error_ok(x, wire, out):
    """Every element within half its block's scale of the original (up to float32 rounding)."""
    q, s = wire["x#q"], wire["x#s"]
    n = x.numel()
    assert q.dtype == torch.int8 and q.shape == (n,) and s.dtype == torch.float32
    assert s.shape == (math.ceil(n / BLOCK),)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    absmax = torch.nn.functional.pad(x.abs(), (0, -n % BLOCK)).view(-1, BLOCK).amax(1)
    assert torch.equal(s, absmax / 127)
    per_element = s.repeat_interleave(BLOCK)[:n].double()
    err = (out["x"].double() - x.double()).abs()
    assert (err <= per_element * (0.5 + 2e-5)).all()


def test_int8_error_is_within_half_a_scale_per_block():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3 * BLOCK + 17, generator=g)
    x[:BLOCK] *= 1000  # a loud block must not coarsen the others
    x[BLOCK : 2 * BLOCK] = 0  # an all-zero block: scale 0, codes 0
    m = {"x": x}
    wire = compress("int8", m)
    out = decompress("int8", wire, m)
    int8_error_ok(x, wire, out)
    assert wire["x#s"][1] == 0 and not wire["x#q"][BLOCK : 2 * BLOCK].any()
    assert (out["x"][2 * BLOCK :] - x[2 * BLOCK :]).abs().max() < 0.05  # not 1000/127 / 2
    assert int(wire["x#q"].abs().max()) == 127


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 3 * BLOCK + 5),
    exponents=st.lists(st.integers(-30, 30), min_size=4, max_size=4),
)
def test_int8_error_bound_holds_at_any_magnitude(seed, n, exponents):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x *= torch.tensor([10.0**e for e in exponents], dtype=torch.float64).repeat_interleave(BLOCK)[:n]
    x = x.float()
    wire = compress("int8", {"x": x})
    int8_error_ok(x, wire, decompress("int8", wire, {"x": x}))


def test_int8_decodes_into_narrower_models_without_overflow():
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        info = torch.finfo(dtype)
        top = min(info.max, 2.0**127)
        m = {"x": torch.tensor([top, -top, 1.0, 0.0], dtype=dtype)}
        out = decompress("int8", compress("int8", m), m)["x"]
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert math.isclose(out[0].item(), top, rel_tol=2**-7)


@pytest.mark.parametrize("codec", [*STATELESS, "topk"])
def test_non_floating_tensors_are_carried_whole(codec):
    m = model()
    wire = sparsify(m, 0.1) if codec == "topk" else compress(codec, m)
    out = densify(wire, m) if codec == "topk" else decompress(codec, wire, m)
    for name in ("steps", "mask"):
        assert same_bits(wire[name], m[name]) and same_bits(out[name], m[name])


def test_compression_ratios_on_a_million_parameters():
    g = torch.Generator().manual_seed(2)
    m = {"w": torch.randn(1000, 999, generator=g), "b": torch.randn(1000, generator=g)}
    m["steps"] = torch.tensor(12, dtype=torch.int64)
    assert sum(t.numel() for t in m.values() if t.is_floating_point()) == 1_000_000
    full = wire_bytes(compress("fp32", m))
    assert full == 4_000_000 + 8
    assert full / wire_bytes(compress("fp16", m)) == pytest.approx(2.0, rel=1e-5)
    assert full / wire_bytes(compress("bf16", m)) == pytest.approx(2.0, rel=1e-5)
    assert full / wire_bytes(compress("int8", m)) > 3.98
    # 1%: int32 indices (smaller than a bitmap below 1/32), int8 values and a scale per 2048 of them
    sparse = wire_bytes(sparsify(m, 0.01))
    assert sparse == 5 * (9990 + 10) + 4 * (5 + 1) + 8
    assert full / sparse == pytest.approx(80, rel=1e-3)  # 0.05 B per element against 4
    # 30%: a bitmap, 1/8 B per element, and the values
    dense = wire_bytes(sparsify(m, 0.3))
    assert dense == (999_000 + 1000) // 8 + (299_700 + 300) + 4 * (147 + 1) + 8
    assert full / dense == pytest.approx(9.4, rel=1e-2)


# --- determinism and ownership --------------------------------------------------------------


def decoders():
    for codec in STATELESS:
        yield (
            codec,
            (lambda c: lambda m: compress(c, m))(codec),
            (lambda c: lambda w, t: decompress(c, w, t))(codec),
        )
    yield "topk-bitmap", lambda m: sparsify(m, 0.3), densify
    yield "topk-indices", lambda m: sparsify(m, 0.01), densify


CODEC_IDS = [*STATELESS, "topk-bitmap", "topk-indices"]


@pytest.mark.parametrize(("codec", "encoder", "decoder"), list(decoders()), ids=CODEC_IDS)
def test_decoding_is_deterministic_and_identical_at_the_receiver(codec, encoder, decoder):
    m = model()
    wire = encoder(m)
    ours = decoder(wire, m)
    again = decoder(wire, m)
    theirs = decoder(decode(encode(Message("model", {}, wire))).tensors, m)  # the receiver's copy
    for name in m:
        assert same_bits(ours[name], again[name]) and same_bits(ours[name], theirs[name]), name


@pytest.mark.parametrize(("codec", "encoder", "decoder"), list(decoders()), ids=CODEC_IDS)
def test_outputs_share_no_memory(codec, encoder, decoder):
    m = model()
    originals = {n: t.clone() for n, t in m.items()}
    wire = encoder(m)
    wire_storages = {t.untyped_storage().data_ptr() for t in wire.values() if t.numel()}
    assert not wire_storages & {t.untyped_storage().data_ptr() for t in m.values() if t.numel()}
    out = decoder(wire, m)
    kept = {n: t.clone() for n, t in out.items()}
    assert not wire_storages & {t.untyped_storage().data_ptr() for t in out.values() if t.numel()}
    for t in wire.values():
        t.zero_()
    for name in m:
        assert same_bits(out[name], kept[name]) and same_bits(m[name], originals[name]), name


# --- top-k ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("fraction", "form"), [(0.1, "#m"), (0.01, "#i")])
def test_sparsify_keeps_the_largest_magnitudes_in_index_order(fraction, form):
    g = torch.Generator().manual_seed(3)
    d = {"w": torch.randn(50, 40, generator=g), "steps": torch.tensor([5])}
    wire = sparsify(d, fraction)
    k = round(fraction * 2000)
    assert set(wire) == {f"w{form}", "w#q", "w#s", "steps"}
    index = kept_positions(wire, "w", 2000)
    assert len(index) == k and (index[1:] > index[:-1]).all()
    flat = d["w"].reshape(-1)
    assert set(index.tolist()) == set(flat.abs().topk(k).indices.tolist())
    # the kept values in index order, coded as the int8 codec codes a tensor
    codes = compress("int8", {"x": flat[index]})
    assert torch.equal(wire["w#q"], codes["x#q"]) and torch.equal(wire["w#s"], codes["x#s"])
    got = densify(wire, d)["w"].reshape(-1)
    kept = torch.zeros(2000, dtype=torch.bool)
    kept[index] = True
    assert torch.equal(got[kept], wire["w#q"].float() * wire["w#s"])
    assert not got[~kept].any()
    assert flat[~kept].abs().max() <= flat[kept].abs().min()


def test_positions_go_as_whichever_is_smaller_the_bitmap_on_a_tie():
    d = {"x": torch.arange(64.0)}  # bitmap 8 B; int32 indices 4 B each
    assert set(sparsify(d, 1 / 64)) == {"x#i", "x#q", "x#s"}  # one index, 4 B
    assert set(sparsify(d, 2 / 64)) == {"x#m", "x#q", "x#s"}  # two, 8 B: a tie
    assert sparsify(d, 2 / 64)["x#m"].tolist() == [0] * 7 + [0b1100_0000]  # 62 and 63: bits 6, 7 of byte 7
    assert set(sparsify({"x": torch.zeros(2**20)}, 0.001)) == {"x#i", "x#q", "x#s"}


def test_the_bitmap_is_little_endian_in_each_byte():
    x = torch.zeros(20)
    x[[0, 3, 9, 19]] = torch.tensor([1.0, -2.0, 3.0, -4.0])
    wire = sparsify({"x": x}, 0.2)
    assert wire["x#m"].dtype == torch.uint8
    assert wire["x#m"].tolist() == [0b0000_1001, 0b0000_0010, 0b0000_1000]  # 0 and 3, 9 = 8 + 1, 19 = 16 + 3
    assert torch.equal(wire["x#m"], pack(x != 0))
    out = densify(wire, {"x": x})["x"]
    assert torch.equal(out != 0, x != 0) and torch.allclose(out, x, atol=2 / 127)


def test_sparsify_keeps_at_least_one_and_at_most_all():
    d = {"a": torch.tensor([0.5, -3.0, 1.0]), "e": torch.zeros(0), "big": torch.tensor([1e30, 1.0])}
    wire = sparsify(d, 1e-9)
    assert wire["a#m"].tolist() == [0b010] and wire["a#q"].tolist() == [-127]
    assert wire["e#m"].numel() == 0 and wire["e#q"].numel() == 0 and wire["e#s"].numel() == 0
    out = densify(wire, d)
    assert out["a"].tolist() == pytest.approx([0.0, -3.0, 0.0])
    assert out["big"].tolist() == pytest.approx([1e30, 0.0])  # int8 values carry magnitudes up to 2**127
    everything = sparsify(d, 1.0)
    assert everything["a#m"].tolist() == [0b111]
    values = {"x#q": everything["a#q"], "x#s": everything["a#s"]}
    int8_error_ok(d["a"], values, {"x": densify(everything, d)["a"]})
    for fraction in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            sparsify(d, fraction)


def test_our_own_bad_models_are_value_errors():
    for bad in (
        {"a#b": torch.zeros(2)},
        {"x": torch.tensor([float("nan")])},
        {"x": torch.tensor([float("inf")])},
    ):
        for encode_ in (lambda m: compress("int8", m), lambda m: sparsify(m, 0.5)):
            with pytest.raises(ValueError) as info:
                encode_(bad)
            assert not isinstance(info.value, CodecError)
    with pytest.raises(ValueError, match="unknown codec"):
        compress("zstd", {"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="reserve"):
        decompress("fp32", {}, {"a#q": torch.zeros(1)})
