"""Malformed wire tensors, dense and sparse: each refused with a CodecError that says why, quoting
little."""

import tracemalloc
import zlib

import numpy as np
import pytest
import torch

from shoal.learning.codecs import (
    MAX_SCALE,
    CodecError,
    compress,
    decompress,
    densify,
    sparsify,
)
from tests.codec_tensors import kept_positions, pack

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


TOPK2 = sparsify(SMALL, 0.3, bits=2)  # 6 codes of 2 bits: 2 bytes, the last 4 bits padding
TOPK4 = sparsify(SMALL, 0.3, bits=4)  # 3 bytes, no padding
assert set(TOPK2) == {"w#m", "w#v2", "w#s", "steps"} and set(TOPK4) == {"w#m", "w#v4", "w#s", "steps"}
DENSE1 = sparsify(SMALL, 1.0, bits=1)  # every value kept: an empty bitmap, 20 codes of 1 bit in 3 bytes
assert DENSE1["w#m"].shape == (0,) and DENSE1["w#v1"].shape == (3,)


def packed(*values):
    return torch.tensor(values, dtype=torch.uint8)


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        # one value encoding per tensor
        (changed(TOPK2, **{"w#q": TOPK["w#q"]}), "unexpected wire tensor.*'w#v2'"),
        (changed(TOPK2, **{"w#v4": TOPK4["w#v4"]}), "unexpected wire tensor.*'w#v4'"),
        (changed(TOPK2, **{"w#v2": None}), "missing wire tensor 'w#q'"),
        (changed(TOPK2, **{"w#v2": None, "w#v8": TOPK["w#q"]}), "missing wire tensor 'w#q'"),
        (changed(TOPK2, **{"w#v2": None, "w#v3": TOPK2["w#v2"]}), "missing wire tensor 'w#q'"),
        # packed codes: uint8, exactly ceil(k * bits / 8) bytes for the k the positions keep, no padding set
        (changed(TOPK2, **{"w#v2": TOPK2["w#v2"].to(torch.int8)}), "'w#v2' has dtype torch.int8, expected"),
        (changed(TOPK4, **{"w#v4": TOPK4["w#v4"].float()}), "'w#v4' has dtype torch.float32, expected"),
        (changed(TOPK2, **{"w#v2": TOPK2["w#v2"][:1]}), "'w#v2' has shape \\(1,\\), expected \\(2,\\)"),
        (changed(TOPK4, **{"w#v4": packed(1, 2, 3, 4)}), "'w#v4' has shape \\(4,\\), expected \\(3,\\)"),
        (changed(TOPK2, **{"w#v2": packed(1, 2).reshape(1, 2)}), "'w#v2' has shape \\(1, 2\\), expected"),
        (changed(TOPK2, **{"w#v2": torch.zeros(10**7, dtype=torch.uint8)}), "has shape \\(10000000,\\)"),
        (changed(TOPK2, **{"w#v2": packed(0, 0b0001_0000)}), "'w#v2' has padding bits set past its 6 codes"),
        (changed(TOPK2, **{"w#v2": packed(0, 0b1000_0000)}), "'w#v2' has padding bits set past its 6 codes"),
        (changed(TOPK4, **{"w#m": bitmap(0, 1, 2, 3, 4)}), "'w#v4' has padding bits set past its 5 codes"),
        (changed(TOPK2, **{"w#m": bitmap(*range(9))}), "'w#v2' has shape \\(2,\\), expected \\(3,\\)"),
        (changed(TOPK4, **{"w#m": bitmap(*range(7))}), "'w#v4' has shape \\(3,\\), expected \\(4,\\)"),
        # every value kept (an empty bitmap): as many codes as the template has elements, 1 bit each
        (changed(DENSE1, **{"w#v1": packed(0, 0)}), "'w#v1' has shape \\(2,\\), expected \\(3,\\)"),
        (changed(DENSE1, **{"w#v1": packed(0, 0, 0b0001_0000)}), "'w#v1' has padding bits set past its 20"),
        (changed(DENSE1, **{"w#m": torch.zeros(0, dtype=torch.int8)}), "'w#m' has dtype torch.int8"),
        (changed(DENSE1, **{"w#v1": None, "w#v2": TOPK2["w#v2"]}), "'w#v2' has shape \\(2,\\), expected"),
        # the positions are checked before the values: a peer's count never sizes what we unpack
        (changed(TOPK2, **{"w#m": None, "w#i": indices(*range(21))}), "21 indices, more than the 20"),
        # scales, as int8 values' scales
        (changed(TOPK2, **{"w#s": poke(0, float("nan"))}), "'w#s' contains NaN or infinite scales"),
        (changed(TOPK4, **{"w#s": poke(0, float("inf"))}), "'w#s' contains NaN or infinite scales"),
        (changed(TOPK2, **{"w#s": poke(0, -1.0)}), "negative scale -1"),
        (changed(TOPK4, **{"w#s": poke(0, MAX_SCALE * 1.01)}), "over .*: values would overflow"),
        (changed(TOPK2, **{"w#s": torch.ones(2)}), "'w#s' has shape \\(2,\\), expected \\(1,\\)"),
        (changed(TOPK2, **{"w#s": torch.ones(0)}), "'w#s' has shape \\(0,\\), expected \\(1,\\)"),
        (changed(TOPK4, **{"w#s": TOPK4["w#s"].half()}), "'w#s' has dtype torch.float16"),
        (changed(TOPK2, **{"w#s": None}), "missing wire tensor 'w#s'"),
    ],
)
def test_malformed_low_bit_values_are_refused_with_a_reason(wire, reason):
    with pytest.raises(CodecError, match=reason):
        densify(wire, SMALL)


@pytest.mark.parametrize(("bits", "codes"), [(2, packed(0b00_11_11_11)), (4, packed(0xFF, 0x0F))])
def test_low_bit_values_at_the_largest_scale_stay_finite_or_are_refused(bits, codes):
    wire = {"x#m": bitmap(0, 1, 2, n=3), f"x#v{bits}": codes}  # three codes, each the largest
    out = densify({**wire, "x#s": torch.tensor([MAX_SCALE])}, {"x": torch.ones(3)})["x"]
    assert out.tolist() == pytest.approx([(2 ** (bits - 1) - 0.5) * MAX_SCALE] * 3, rel=1e-6)
    with pytest.raises(CodecError, match=r"'x' overflows torch\.float16"):
        densify({**wire, "x#s": torch.tensor([1e5])}, HALF)


def test_densify_accepts_any_valid_low_bit_codes():
    every = densify(changed(TOPK2, **{"w#v2": packed(0b11_10_01_00, 0b0000_11_10)}), SMALL)["w"].reshape(-1)
    kept = kept_positions(TOPK2, "w", 20)
    scale = float(TOPK2["w#s"])
    assert every[kept].tolist() == pytest.approx([s * scale for s in (-1.5, -0.5, 0.5, 1.5, 0.5, 1.5)])
    assert not every[~torch.isin(torch.arange(20), kept)].any()


GRID = sparsify(SMALL, 1.0, grid=2.4)  # 20 codes, 10 bytes deflated
GRID5 = sparsify(SMALL, 0.25, grid=2.4)  # 5 codes: 3 bytes, the last one's high half padding
assert set(GRID) == {"w#m", "w#g", "w#s", "steps"} and GRID["w#s"].shape == (1,)


def deflated(*values):
    return torch.frombuffer(bytearray(zlib.compress(bytes(values))), dtype=torch.uint8)


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (
            changed(GRID, **{"w#v2": TOPK2["w#v2"]}),
            "unexpected wire tensor.*'w#g'",
        ),  # the first format named wins
        (changed(GRID, **{"w#g": GRID["w#g"].to(torch.int8)}), "'w#g' has dtype torch.int8, expected"),
        (
            changed(GRID, **{"w#g": GRID["w#g"].reshape(1, -1)}),
            "'w#g' has shape \\(1, \\d+\\), expected a 1-D",
        ),
        # the stream: inflates, to exactly the codes' bytes, and ends there
        (changed(GRID, **{"w#g": packed(1, 2, 3)}), "'w#g' does not inflate"),
        (changed(GRID, **{"w#g": packed()}), "'w#g' does not inflate to exactly the 10 bytes of 20 codes"),
        (changed(GRID, **{"w#g": deflated(*[0] * 9)}), "does not inflate to exactly the 10 bytes"),
        (changed(GRID, **{"w#g": deflated(*[0] * 1000)}), "does not inflate to exactly the 10 bytes"),
        (changed(GRID, **{"w#g": deflated(*[0] * 10**6)}), "holds \\d+ bytes, more than any deflate"),
        (changed(GRID, **{"w#g": GRID["w#g"][:-1]}), "does not inflate to exactly"),
        (changed(GRID, **{"w#g": torch.cat([GRID["w#g"], packed(0)])}), "does not inflate to exactly"),
        (changed(GRID5, **{"w#g": deflated(0, 0, 0x10)}), "'w#g' has padding set past its 5 codes"),
        (
            changed(GRID5, **{"w#m": bitmap(), "w#g": deflated(0, 0)}),  # a max_length of 0 is no bound
            "exactly the 0 bytes of 0 codes",
        ),
        # the step: one float32, finite, not negative, not so large that 8 steps overflow
        (changed(GRID, **{"w#s": torch.ones(2)}), "'w#s' has shape \\(2,\\), expected \\(1,\\)"),
        (changed(GRID, **{"w#s": poke(0, float("nan"))}), "'w#s' contains NaN or infinite scales"),
        (changed(GRID, **{"w#s": poke(0, -1.0)}), "negative scale -1"),
        (changed(GRID, **{"w#s": poke(0, MAX_SCALE * 1.01)}), "over .*: values would overflow"),
        (changed(GRID, **{"w#s": None}), "missing wire tensor 'w#s'"),
    ],
)
def test_malformed_grid_values_are_refused_with_a_reason(wire, reason):
    with pytest.raises(CodecError, match=reason):
        densify(wire, SMALL)


def test_a_grid_stream_that_inflates_far_past_its_codes_is_refused_having_inflated_one_byte_more():
    n = 2_000_000  # 1 MB of codes; the stream, 97 kB, would inflate to 100 MB
    template = {"x": torch.zeros(n)}
    bomb = torch.frombuffer(bytearray(zlib.compress(bytes(10**8))), dtype=torch.uint8)
    wire = {"x#m": torch.zeros(0, dtype=torch.uint8), "x#g": bomb, "x#s": torch.ones(1)}
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="does not inflate to exactly the 1000000 bytes"):
            densify(wire, template)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20, peak


def test_any_inflating_grid_codes_decode_and_the_largest_stay_finite_or_are_refused():
    every = densify(changed(GRID5, **{"w#g": deflated(0x10, 0xF7, 0x08), "w#s": torch.tensor([2.0])}), SMALL)
    kept = kept_positions(GRID5, "w", 20)
    assert every["w"].reshape(-1)[kept].tolist() == [-16.0, -14.0, -2.0, 14.0, 0.0]
    wire = {"x#m": torch.zeros(0, dtype=torch.uint8), "x#g": deflated(0x00, 0x00)}  # three codes of -8
    out = densify({**wire, "x#s": torch.tensor([MAX_SCALE])}, {"x": torch.ones(3)})["x"]
    assert out.tolist() == pytest.approx([-8 * MAX_SCALE] * 3, rel=1e-6)
    with pytest.raises(CodecError, match=r"'x' overflows torch\.float16"):
        densify({**wire, "x#s": torch.tensor([1e4])}, HALF)
