import math

import numpy as np
import pytest
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
    wire_bytes,
)
from shoal.overlay.wire import DTYPES, Message, decode, encode


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


def pack(mask):
    """A bitmap as the codec must make it (numpy's, little bit order): element i, bit i % 8 of byte i // 8."""
    return torch.from_numpy(np.packbits(np.asarray(mask, dtype=bool), bitorder="little"))


def kept_positions(wire, name, n):
    """Where ``wire`` keeps ``name``'s values: from its bitmap or its indices, whichever it holds."""
    if f"{name}#m" in wire:
        bits = np.unpackbits(wire[f"{name}#m"].numpy(), bitorder="little")
        return torch.from_numpy(np.flatnonzero(bits[:n]))
    return wire[f"{name}#i"].long()


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


# --- malformed wire tensors -----------------------------------------------------------------

TEMPLATE = {
    "w": torch.randn(3, 700, generator=torch.Generator().manual_seed(4)),
    "steps": torch.tensor([1, 2]),
}
HALF = {"x": torch.ones(3, dtype=torch.float16)}


def changed(wire, **changes):
    wire = {n: t.clone() for n, t in wire.items()}
    for name, value in changes.items():
        if value is None:
            del wire[name]
        elif callable(value):
            value(wire[name])
        else:
            wire[name] = value
    return wire


def poke(position, value):
    def set_(t):
        t.view(-1)[position] = value

    return set_


INT8 = compress("int8", TEMPLATE)
FP16 = compress("fp16", TEMPLATE)


@pytest.mark.parametrize(
    ("codec", "wire", "template", "reason"),
    [
        ("zstd", INT8, TEMPLATE, "unknown codec 'zstd'"),
        ("int8", changed(INT8, **{"w#s": None}), TEMPLATE, "missing wire tensor 'w#s'"),
        ("int8", changed(INT8, steps=None), TEMPLATE, "missing wire tensor 'steps'"),
        ("int8", changed(INT8, junk=torch.zeros(1)), TEMPLATE, "1 unexpected wire tensor.*'junk'"),
        ("int8", changed(INT8, **{"w": TEMPLATE["w"]}), TEMPLATE, "unexpected wire tensor.*'w'"),
        ("fp16", INT8, TEMPLATE, "missing wire tensor 'w'"),
        (
            "int8",
            changed(INT8, **{"w#q": INT8["w#q"].to(torch.uint8)}),
            TEMPLATE,
            "'w#q' has dtype torch.uint8",
        ),
        (
            "int8",
            changed(INT8, **{"w#q": INT8["w#q"].reshape(3, 700)}),
            TEMPLATE,
            "'w#q' has shape \\(3, 700\\)",
        ),
        ("int8", changed(INT8, **{"w#q": [1, 2]}), TEMPLATE, "'w#q' is not a tensor but 'list'"),
        ("int8", changed(INT8, **{"w#q": poke(5, -128)}), TEMPLATE, "-128"),
        ("int8", changed(INT8, **{"w#s": poke(1, float("nan"))}), TEMPLATE, "NaN or infinite scales"),
        ("int8", changed(INT8, **{"w#s": poke(0, float("inf"))}), TEMPLATE, "NaN or infinite scales"),
        ("int8", changed(INT8, **{"w#s": poke(1, -0.5)}), TEMPLATE, "negative scale -0.5"),
        ("int8", changed(INT8, **{"w#s": poke(0, 1e37)}), TEMPLATE, "scale 1e\\+37, over"),
        (
            "int8",
            changed(INT8, **{"w#s": INT8["w#s"][:1]}),
            TEMPLATE,
            "'w#s' has shape \\(1,\\), expected \\(2,\\)",
        ),
        ("int8", changed(INT8, **{"w#s": INT8["w#s"].double()}), TEMPLATE, "'w#s' has dtype torch.float64"),
        ("int8", changed(INT8, steps=torch.tensor([1, 2], dtype=torch.int32)), TEMPLATE, "'steps' has dtype"),
        ("int8", changed(INT8, steps=torch.tensor([1, 2, 3])), TEMPLATE, "'steps' has shape"),
        (
            "int8",
            changed(INT8, steps=torch.tensor([1, 2], device="meta")),
            TEMPLATE,
            "not a dense CPU tensor",
        ),
        (
            "int8",
            {"x#q": torch.tensor([127, 1, 0], dtype=torch.int8), "x#s": torch.tensor([1e3])},
            HALF,
            "overflows",
        ),
        ("fp16", changed(FP16, w=poke(7, float("inf"))), TEMPLATE, "'w' contains NaN or infinite"),
        ("fp16", changed(FP16, w=poke(7, float("nan"))), TEMPLATE, "'w' contains NaN or infinite"),
        (
            "fp16",
            changed(FP16, w=TEMPLATE["w"]),
            TEMPLATE,
            "'w' has dtype torch.float32, expected torch.float16",
        ),
        ("bf16", FP16, TEMPLATE, "'w' has dtype torch.float16, expected torch.bfloat16"),
        ("fp32", {"x": torch.tensor([1.0, 1e5, 2.0])}, HALF, "'x' overflows torch.float16"),
        ("fp32", [("x", torch.ones(3))], HALF, "must be a map"),
    ],
)
def test_malformed_wire_tensors_are_refused_with_a_reason(codec, wire, template, reason):
    with pytest.raises(CodecError, match=reason):
        decompress(codec, wire, template)


def test_reasons_quote_little_of_what_a_peer_sent():
    with pytest.raises(CodecError) as info:
        decompress("fp32", {**compress("fp32", TEMPLATE), "x" * 10_000: torch.zeros(1)}, TEMPLATE)
    assert len(str(info.value)) < 100
    with pytest.raises(CodecError) as info:
        decompress("x" * 10_000, {}, TEMPLATE)
    assert len(str(info.value)) < 120
    wire = changed(INT8, **{"w#s": torch.zeros([1] * 8)})
    with pytest.raises(CodecError, match="has shape") as info:
        decompress("int8", wire, TEMPLATE)
    assert len(str(info.value)) < 100


SMALL = {"w": torch.randn(4, 5, generator=torch.Generator().manual_seed(5)), "steps": torch.tensor([9])}
TOPK = sparsify(SMALL, 0.3)  # 6 of 20: a 3-byte bitmap beats 24 bytes of indices
assert set(TOPK) == {"w#m", "w#q", "w#s", "steps"}
TOPK_I = {**{k: v for k, v in TOPK.items() if k != "w#m"}, "w#i": kept_positions(TOPK, "w", 20).int()}


def indices(*values):
    return torch.tensor(values, dtype=torch.int32)


def codes(n, fill=1):
    return torch.full((n,), fill, dtype=torch.int8)


def bitmap(*set_bits, n=20):
    mask = np.zeros(-(-n // 8) * 8, dtype=bool)
    mask[list(set_bits)] = True
    return pack(mask)


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        # positions as int32 indices
        (changed(TOPK_I, **{"w#i": indices(1, 1, 2, 3, 4, 5)}), "not strictly increasing"),
        (changed(TOPK_I, **{"w#i": indices(1, 3, 2, 4, 5, 6)}), "not strictly increasing"),
        (changed(TOPK_I, **{"w#i": indices(-1, 0, 2, 3, 4, 5)}), "index -1, outside \\[0, 20\\)"),
        (changed(TOPK_I, **{"w#i": indices(0, 1, 2, 3, 4, 20)}), "index 20, outside \\[0, 20\\)"),
        (changed(TOPK_I, **{"w#i": indices(*range(21)), "w#q": codes(21)}), "21 indices, more than the 20"),
        (
            changed(TOPK_I, **{"w#i": TOPK_I["w#i"].long()}),
            "'w#i' has dtype torch.int64, expected torch.int32",
        ),
        (
            changed(TOPK_I, **{"w#i": TOPK_I["w#i"].reshape(2, 3)}),
            "'w#i' has shape \\(2, 3\\), expected a 1-D",
        ),
        (changed(TOPK_I, **{"w#i": indices(3).reshape(())}), "'w#i' has shape \\(\\), expected a 1-D"),
        (changed(TOPK_I, **{"w#q": codes(5)}), "'w#q' has shape \\(5,\\), expected \\(6,\\)"),
        (changed(TOPK_I, **{"w#m": TOPK["w#m"]}), "unexpected wire tensor.*'w#i'"),  # both forms
        # positions as a bitmap: exactly ceil(20 / 8) bytes, no bit past element 19, one bit per value
        (
            changed(TOPK, **{"w#m": TOPK["w#m"].to(torch.int8)}),
            "'w#m' has dtype torch.int8, expected torch.uint8",
        ),
        (changed(TOPK, **{"w#m": TOPK["w#m"][:2]}), "'w#m' has shape \\(2,\\), expected \\(3,\\)"),
        (
            changed(TOPK, **{"w#m": bitmap(0, 1, 2, 3, 4, 5, n=32)}),
            "'w#m' has shape \\(4,\\), expected \\(3,\\)",
        ),
        (
            changed(TOPK, **{"w#m": TOPK["w#m"].reshape(3, 1)}),
            "'w#m' has shape \\(3, 1\\), expected \\(3,\\)",
        ),
        (changed(TOPK, **{"w#m": bitmap(0, 1, 2, 3, 4, 20)}), "'w#m' has bits set past the 20 elements"),
        (changed(TOPK, **{"w#m": bitmap(0, 1, 2, 3, 4, 23)}), "'w#m' has bits set past the 20 elements"),
        (
            changed(TOPK, **{"w#m": bitmap(0, 1, 2, 3, 4, 5, 6)}),
            "'w#q' has shape \\(6,\\), expected \\(7,\\)",
        ),
        (changed(TOPK, **{"w#m": bitmap(0, 1, 2, 3, 4)}), "'w#q' has shape \\(6,\\), expected \\(5,\\)"),
        (changed(TOPK, **{"w#m": None}), "missing wire tensor 'w#i'"),
        # values: int8 codes and their scales, as the int8 codec's
        (changed(TOPK, **{"w#q": poke(2, -128)}), "-128, outside the symmetric code"),
        (changed(TOPK, **{"w#q": TOPK["w#q"].half()}), "'w#q' has dtype torch.float16, expected torch.int8"),
        (changed(TOPK, **{"w#s": poke(0, float("nan"))}), "'w#s' contains NaN or infinite scales"),
        (changed(TOPK, **{"w#s": poke(0, float("-inf"))}), "'w#s' contains NaN or infinite scales"),
        (changed(TOPK, **{"w#s": poke(0, -1.0)}), "negative scale -1"),
        (changed(TOPK, **{"w#s": poke(0, MAX_SCALE * 1.01)}), "over .*: values would overflow"),
        (changed(TOPK, **{"w#s": torch.ones(2)}), "'w#s' has shape \\(2,\\), expected \\(1,\\)"),
        (changed(TOPK, **{"w#s": TOPK["w#s"].double()}), "'w#s' has dtype torch.float64"),
        (changed(TOPK, **{"w#q": None}), "missing wire tensor 'w#q'"),
        (changed(TOPK, **{"w#s": None}), "missing wire tensor 'w#s'"),
        (changed(TOPK, **{"w#v": torch.ones(6, dtype=torch.float16)}), "unexpected wire tensor.*'w#v'"),
        (changed(TOPK, extra=torch.zeros(1)), "unexpected wire tensor.*'extra'"),
        (changed(TOPK, steps=torch.tensor([9.0])), "'steps' has dtype torch.float32"),
        (compress("fp32", SMALL), "missing wire tensor 'w#i'"),
        (compress("int8", SMALL), "missing wire tensor 'w#i'"),
    ],
)
def test_malformed_sparse_wire_tensors_are_refused_with_a_reason(wire, reason):
    with pytest.raises(CodecError, match=reason):
        densify(wire, SMALL)


def test_sparse_values_that_overflow_a_narrow_model_are_refused():
    wire = {"x#m": bitmap(0, n=3), "x#q": codes(1, 127), "x#s": torch.tensor([1e3])}
    with pytest.raises(CodecError, match="'x' overflows"):
        densify(wire, HALF)


def test_densify_accepts_any_valid_position_set_in_either_form():
    ends = {"w#q": torch.tensor([-1, 1], dtype=torch.int8), "w#s": torch.tensor([2.0])}
    for where in ({"w#i": indices(0, 19)}, {"w#m": bitmap(0, 19)}):  # indices where a bitmap is smaller, too
        out = densify(changed(TOPK_I if "w#i" in where else TOPK, **where, **ends), SMALL)["w"].reshape(-1)
        assert out[0] == -2.0 and out[19] == 2.0 and not out[1:19].any()
    none = {"w#q": codes(0), "w#s": torch.zeros(0)}
    assert not densify(changed(TOPK_I, **{"w#i": indices()}, **none), SMALL)["w"].any()
    assert not densify(changed(TOPK, **{"w#m": bitmap()}, **none), SMALL)["w"].any()
    every = densify(
        changed(TOPK, **{"w#m": bitmap(*range(20)), "w#q": codes(20, -3), "w#s": ends["w#s"]}), SMALL
    )
    assert torch.equal(every["w"], torch.full((4, 5), -6.0))


# --- fuzzing --------------------------------------------------------------------------------

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
    *(f"{n}{suffix}" for n in SMALL_FUZZ for suffix in ("", "#q", "#s", "#i", "#m", "#v")),
    *("", "junk", "w#", "#q", "w#q#s"),
]
SHAPES = [(3, 4), (12,), (1,), (2,), (3,), (5,), (0,), (), (6,), (13,), (2, 2)]
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
        elif codec == "topk" and draw(st.booleans()):  # positions as a bitmap
            mask = draw(st.lists(st.booleans(), min_size=-(-n // 8) * 8, max_size=-(-n // 8) * 8))
            if draw(st.integers(0, 3)):  # mostly no padding bits set
                mask[n:] = [False] * (len(mask) - n)
            k = sum(mask) + draw(st.sampled_from([0, 0, 0, -1, 1]))
            wire[f"{name}#m"] = pack(mask)
            specs = [(f"{name}#q", torch.int8, (max(k, 0),)), (f"{name}#s", torch.float32, (-(-k // BLOCK),))]
        elif codec == "topk":
            k = draw(st.integers(0, n + 1))
            specs = [
                (f"{name}#i", torch.int32, (k,)),
                (f"{name}#q", torch.int8, (k,)),
                (f"{name}#s", torch.float32, (-(-k // BLOCK),)),
            ]
        else:
            specs = [(name, compress(codec, {"x": ref})["x"].dtype, tuple(ref.shape))]
        for key, dtype, shape in specs:
            choice = draw(st.integers(0, 29))
            if choice == 0:
                continue
            if choice == 1:
                wire[key] = draw(tensors())
            elif key.endswith("#i") and choice < 16:
                chosen = draw(st.lists(st.integers(-1, n), min_size=shape[0], max_size=shape[0], unique=True))
                wire[key] = torch.tensor(sorted(chosen), dtype=torch.int32)
            else:
                wire[key] = draw(tensors(dtype, shape))
    if draw(st.integers(0, 3)) == 0:
        wire[draw(st.sampled_from(NAMES))] = draw(tensors())
    return wire


@settings(max_examples=200, deadline=None)
@given(data=st.data(), codec=st.sampled_from([*STATELESS, "topk"]))
def test_fuzzed_near_valid_wire_dicts_decode_or_fail_with_codec_error(data, codec):
    wire = data.draw(near_valid_wire(codec, SMALL_FUZZ))
    if codec == "topk":
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
    codec=st.sampled_from([*STATELESS, "topk"]),
    fraction=st.floats(0.001, 1.0),
    ops=st.lists(mutation(), max_size=3),
)
def test_mutated_encodings_decode_or_fail_with_codec_error(codec, fraction, ops):
    wire = sparsify(FUZZ, fraction) if codec == "topk" else compress(codec, FUZZ)
    for op in ops:
        wire = mutate(wire, op)
    if codec == "topk":
        outcome(lambda: densify(wire, FUZZ), FUZZ)
    else:
        outcome(lambda: decompress(codec, wire, FUZZ), FUZZ)
    if not ops:  # an untouched encoding always decodes
        out = densify(wire, FUZZ) if codec == "topk" else decompress(codec, wire, FUZZ)
        assert_shaped_like(out, FUZZ)
