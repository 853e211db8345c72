"""The Yjs update parser (``overlay.yupdate``) that runs before yrs: nesting beyond the bound, truncated,
padded and absurd updates, state vectors, nested shared types, and every honest write passing."""

import contextlib
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text, merge_updates

from shoal.overlay.metadata import MetadataError, MetadataPending
from shoal.overlay.yupdate import MAX_DEPTH, UpdateError, check_state_vector, check_update
from tests.metadata_replicas import holder, replicas, state, valid_update


def nested_update(levels: int) -> bytes:
    """An update setting ``peers["x"] = {"r": [[...]]}`` with ``levels`` + 1 nested arrays (lib0 Any).

    yrs decodes Any recursively: at 40,000 levels applying it segfaults, and at 20,000 reading the value
    back does; built by splicing, since pycrdt itself would recurse as deep to encode it."""
    doc = Doc()
    value: list = []
    for _ in range(8):
        value = [value]
    doc.get("peers", type=Map)["x"] = {"r": value}
    update = doc.get_update()
    pattern = b"\x75\x01" * 8  # Any array (117) of one element
    at = update.index(pattern)
    return update[:at] + b"\x75\x01" * levels + update[at + len(pattern) :]


def test_any_nested_beyond_the_bound_is_rejected_before_yrs_sees_it():
    node = holder()
    before = state(node)
    node.max_update = 4 * 2**20  # let the 2 MB one reach the parser
    for levels in (40_000, 1_000_000):
        with pytest.raises(MetadataError, match=f"nested over {MAX_DEPTH} deep") as caught:
            node.apply(nested_update(levels))
        assert caught.value.hostile is True and state(node) == before
    check_update(
        nested_update(MAX_DEPTH - 2)
    )  # the map, MAX_DEPTH - 2 arrays and the empty one: at the bound
    with pytest.raises(UpdateError, match="nested over"):
        check_update(nested_update(MAX_DEPTH - 1))


def test_applying_the_deep_update_no_longer_kills_the_process():
    """The segfault cannot be caught, so the probe runs in a subprocess: it must exit normally."""
    probe = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "from test_yupdate import holder, nested_update\n"
        "from shoal.overlay.metadata import MetadataError\n"
        "node = holder(); node.max_update = 4 * 2**20\n"
        "try:\n"
        "    node.apply(nested_update(40_000))\n"
        "except MetadataError as e:\n"
        "    print('rejected:', e)\n"
        "print(sorted(node.snapshot()['peers']))\n"
    )
    here = __file__.rsplit("/", 1)[0]
    done = subprocess.run(
        [sys.executable, "-c", probe, here, here + "/.."], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "rejected: malformed update: Any values nested over" in done.stdout
    assert "'x'" not in done.stdout


def test_truncated_padded_and_absurd_updates_are_rejected_with_a_reason():
    update = valid_update()
    check_update(update)
    for n in range(len(update)):
        with pytest.raises(UpdateError, match=r"truncated|exceeds|out of range|invalid"):
            check_update(update[:n])
    with pytest.raises(UpdateError, match="trailing bytes"):
        check_update(update + b"\x00")
    item = b"\x01\x01\x01\x00\x28\x01\x01p\x01k"  # one Any item at peers["k"]; its content follows
    absurd = {
        b"\x01\xff\xff\xff\x0f\x01\x00": "struct count",  # 2**32 - 1 structs in 2 bytes
        item + b"\xff\xff\x03\x7e": "Any content count",
        item + b"\x01\x75\xff\xff\x03": "Any container count",
        item + b"\x01\x76\xff\xff\x03": "Any container count",
        item + b"\x01\x77\xff\xff\x03ab\x00": "truncated",  # string length
        b"\x01\x01\x01\x00\x28\x01\xff\xff\xff\x7fp": "truncated",  # root name length
        item + b"\x01\x7d" + b"\xff" * 11 + b"\x00": "varint over 10",
        item + b"\x01\x77\x01\xff\x00": "invalid UTF-8",
        b"\x01\x01\x01\xfe\xff\xff\xff\x0f\x00\x02\x00": "clock overflows",  # GC of 2 at clock 2**32 - 2
        b"\x01\x01\x01\x80\x80\x80\x80\x10\x00": "out of range",  # clock 2**32
        item + b"\x01\x63\x00": "unknown Any tag",
        b"\x01\x01\x01\x00\x22\x01\x01p\x01k\x01\x00\x00": "legacy JSON",
        b"\x01\x01\x01\x00\x2b\x01\x01p\x01k\x00": "content ref 11",
        b"\x01\x01\x01\x00\x38\x01\x01p\x01k\x01\x7e\x00": "struct info",
        b"\x01\x01\x01\x00\x28\x02\x01p\x01k\x01\x7e\x00": "parent info",
        b"\x01\x01\x01\x00\x27\x00\x05\x00\x01k\x01\x00": "nested shared type",
        b"\x00\xff\xff\xff\x0f": "delete set client count",
        b"\x00\x01\x05\xff\xff\xff\x0f": "delete range count",
        b"\x00\x01\x05\x01\xff\xff\xff\xff\x0f\x01": "delete range overflows",
    }
    for data, reason in absurd.items():
        with pytest.raises(UpdateError, match=reason):
            check_update(data)
    node = holder()
    before = state(node)
    for data in absurd:
        with pytest.raises(MetadataError, match=r"claims|malformed update") as caught:
            node.apply(data)
        assert caught.value.hostile is True
    assert state(node) == before


def test_state_vectors_are_validated_fully():
    node = holder()
    check_state_vector(node.state_vector())
    check_state_vector(b"\x00")
    for data, reason in {
        b"\x01\x05\x80": "truncated",
        b"\x01\x05\x80\x80\x80\x80\x10": "out of range",
        b"\x01\x05\x05\x00": "trailing",
        b"\x7f" + b"\x01" * 200: "client count",
        b"\x01" + b"\xff" * 11 + b"\x00": "varint over 10",
    }.items():
        with pytest.raises(UpdateError, match=reason):
            check_state_vector(data)
        with pytest.raises(MetadataError, match="state vector"):
            node.diff(data)


def test_a_shared_type_nested_in_another_is_rejected_but_one_under_a_root_is_not():
    doc = Doc()
    peers = doc.get("peers", type=Map)
    peers["a"] = Map({"k": 1.0})  # like the hostile container entry above: readers skip it
    check_update(doc.get_update())
    sv = doc.get_state()
    peers["a"]["inner"] = Map({"k": 2.0})  # a chain of these is what yrs deletes recursively
    with pytest.raises(UpdateError, match="nested shared type"):
        check_update(doc.get_update(sv))
    peers["a"] = Array([1.0])  # overwrites carry an origin: the parent is not named in the bytes
    with pytest.raises(UpdateError, match="nested shared type"):
        check_update(doc.get_update())


def test_generic_pycrdt_content_parses():
    doc = Doc()
    text = doc.get("t", type=Text)
    text += "héllo 😀 wörld"
    text.insert(2, "x", {"bold": True})
    text.format(0, 3, {"italic": True})
    del text[4:6]
    doc.get("a", type=Array).extend(
        [b"\x00\xff", 1.0, -7, 2**40, 2.5, None, True, "s", {"q": [1, {"z": []}]}]
    )
    peers = doc.get("peers", type=Map)
    peers["m"] = Map({"a": 1})
    del peers["m"]
    check_update(doc.get_update())
    check_state_vector(doc.get_state())


printable = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
operation = st.one_of(
    st.tuples(st.just("heartbeat"), st.integers(0, 4), st.lists(printable, max_size=3), printable),
    st.tuples(st.just("model"), st.integers(0, 4), st.integers(0, 2**53 - 1), printable),
    st.tuples(
        st.just("scores"), st.integers(0, 4), st.dictionaries(printable, st.floats(-1e9, 1e9), max_size=4)
    ),
    st.tuples(st.just("expire"), st.integers(0, 4), st.floats(0, 200)),
    st.tuples(st.just("sync"), st.integers(0, 4), st.integers(0, 4)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(operation, max_size=40), st.randoms(use_true_random=False))
def test_every_update_and_state_vector_from_honest_writes_passes_the_parser(ops, rng):
    nodes = replicas(5, max_entry_bytes=100_000)
    now = 0.0
    updates: list[bytes] = []
    vectors: list[bytes] = []
    for op, i, *args in ops:
        node, now = nodes[i], now + 1.0
        with contextlib.suppress(ValueError):  # writes the node itself refuses never reach the doc
            if op == "heartbeat":
                node.heartbeat(now, args[0], args[1] or "training")
            elif op == "model":
                node.record_model(args[0] % 50, args[1] or "d", args[0])
            elif op == "scores":
                node.set_reputation(args[0])
            elif op == "expire":
                node.expire(args[0])
            else:
                other = nodes[args[0]]
                vectors.append(node.state_vector())
                updates.append(other.diff(vectors[-1]))
                node.apply(updates[-1])
        if (update := node.take_outgoing()) is not None:
            updates.append(update)
            for other in rng.sample(nodes, 2):
                with contextlib.suppress(MetadataPending):  # gossip out of order: never blamed
                    other.apply(update)  # also checked by apply itself
    for node in nodes:
        vectors.append(node.state_vector())
        updates += [node.diff(b"\x00"), node.diff(nodes[0].state_vector())]
    if updates:
        updates.append(merge_updates(*rng.sample(updates, min(len(updates), 6))))
    for update in updates:
        check_update(update)
    for vector in vectors:
        check_state_vector(vector)
