"""Compressed model messages: what a node sends in place of a full fp32 model, and how it reads them back.

One :class:`Compression` per node sits between the protocol and the overlay (``node.driver``), so gossip
and MoDeST send and receive whole models as before, in the daemon and in the simulator alike. The codec
is part of the task (``node.daemon`` hashes it into the task id): peers with different codecs never meet.

- ``fp32``, ``fp16``, ``bf16``, ``int8``: each model on its own (``learning.codecs``), nothing kept.
- ``topk``: the difference to a *reference* both ends hold, sparsified to the top ``topk_fraction`` by
  magnitude (Deep Gradient Compression), its values in ``topk_bits`` (8, 4, 2 or 1) bits each or on one
  grid (``topk_grid``). A pair holds two references: what the receiver reconstructed from the sender's
  last message to it, and the other way round; the sender computes both (decoding is bit-identical) and
  uses the one closer to the model it sends. So what top-k drops or its values round off stays in the
  next difference (error feedback, as in CHOCO-gossip's estimates of its neighbours) instead of in a
  separate residual. Using the other direction's message matters for MoDeST: an aggregator's model is
  close to what this round's trainers just sent it, while its own last message to them may be many
  rounds old.
  A first message, one after a reference was lost, or one whose difference would rebuild the model
  worse than ``max_lag`` times an int8 copy would, is a *keyframe*: the whole model in int8. Why pairs
  and not a round's model: gossip has no shared round model, and in MoDeST the receiver of a trained
  model (next round's aggregator) need not hold the model it was trained from.

Each top-k message names the reference it needs (``ref``: the sender's last message to us or ours to it,
and ``base``, that message's sequence number; 0 for a keyframe) and its own (``seq``, unique among the
sender's messages, so two keyframes or a late message are never mistaken for each other). A receiver
that does not hold the base (it restarted, evicted it, a message was lost or overtaken) drops the
message without blame and answers ``codec-reset`` (``learning.messages.CodecReset``, at most one per
peer per ``RESET_INTERVAL``, ``node.driver``); the sender's next message to it is a keyframe. A sender
keeps its last ``SENT_KEPT`` messages to each peer: two peers that send to each other at once (gossip's
synchronous rounds do, every round) each name the other's last message, which the other has already
followed with a newer one. References are bounded: ``max_references`` peers per direction (least
recently used evicted), each ``SENT_KEPT`` copies of the model (one for what we hold of a peer's).

Streaming DiLoCo's fragments (``learning.outer``): a message may hold one of the ``fragments`` parts of
the model (``partition``), or the whole model (a fetch's reply). Each is then a stream of its own, with
its own references and keyframes, bounded per part as above, and a message names its part (``f``, the
whole model's number ``fragments``); a received one must hold exactly that part's names, shapes and
dtypes.

Hostile input: the sequence fields are bounded counts; keyframes and differences go through the codecs'
checks (indices, counts, scales). Each representation of a received model is checked for NaN and Inf
once: the wire tensors by ``overlay.wire``; what a codec makes of finite wire tensors by the codec
(``learning.codecs``: a cast to a narrower dtype or a scale times a value can overflow); a reference plus
a difference, which can overflow a float16 model, by the protocol's norm bound (``model_fault``), which
any non-finite value fails. A peer can make us hold one reference for it, which it can only make wrong
for itself; what it decodes to still meets the protocol's checks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from shoal.learning import codecs
from shoal.learning.messages import is_count, quote
from shoal.learning.outer import partition

CODECS = (*codecs.STATELESS, "topk")
KEY, MINE, YOURS = 0, 1, 2  # a top-k message's reference: none (keyframe), sender's last, receiver's last
KEYFRAME = "int8"
SENT_KEPT = 2  # our last messages to a peer that its messages may name (crossing sends: one more)

State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class CodecConfig:
    """Also the daemon's ``[protocol.codec]`` settings (``learning.settings``)."""

    name: str = field(
        default="fp32",
        metadata={
            "help": f"{' | '.join(CODECS)} (topk: differences to the last model sent to that peer, the top "
            "topk_fraction of them by magnitude, whole int8 models when a peer has none)",
            "flag": True,
        },
    )
    # the best share measured (docs/measurements.md): fewer loses MoDeST accuracy, more costs bytes
    topk_fraction: float = field(
        default=0.3, metadata={"help": "topk: share of each difference's values that is sent"}
    )
    topk_bits: int = field(
        default=8,
        metadata={
            "help": "topk: bits per kept value: 8 (int8), 4, 2 (SparseLoCo-style) or 1 (a sign times the "
            "mean magnitude); error feedback carries what they round off"
        },
    )
    # One step for the whole difference, deflated: at 2.4, on a DiLoCo round, 1.38 bits a value with the
    # error of 2-bit values (2.02 bits) and less than 1-bit values on half (1.51) (docs/measurements.md)
    topk_grid: float = field(
        default=0.0,
        metadata={
            "help": "topk: if above 0, values go on one grid this many mean magnitudes apart, deflated, "
            "in place of topk_bits (with topk_fraction 1: about 1.4 bits a value at 2.4)"
        },
    )
    # Measured (simulations.compression, 12 nodes): without it MoDeST, whose references are often many
    # rounds old, needed 56 rounds to 90% instead of 41; with 30, 42; at 30% kept with int8 values, seed 1,
    # 10 and 100 cost MoDeST 23% and 27% more bytes to 90% than 30. Rounds of many local steps (DiLoCo)
    # move every weight: 2-bit differences then lose to int8 copies by far more, and want it raised.
    max_lag: float = field(
        default=30.0,
        metadata={
            "help": "topk: a difference that rebuilds the model worse than this many times an int8 copy "
            "(squared error) goes as that whole int8 copy instead"
        },
    )
    max_references: int = 16

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"name must be one of {', '.join(CODECS)}, got {self.name!r}")
        if not 0 < self.topk_fraction <= 1:
            raise ValueError(f"topk_fraction must be in (0, 1], got {self.topk_fraction!r}")
        if not isinstance(self.topk_bits, int) or self.topk_bits not in codecs.VALUE_BITS:
            raise ValueError(f"topk_bits must be one of {codecs.VALUE_BITS}, got {self.topk_bits!r}")
        if not (self.topk_grid == 0 or 0 < self.topk_grid <= codecs.MAX_GRID):
            raise ValueError(f"topk_grid must be 0 or in (0, {codecs.MAX_GRID}], got {self.topk_grid!r}")
        if self.topk_grid and self.topk_bits != 8:
            raise ValueError("topk_grid replaces topk_bits: give one of them")
        if not self.max_lag >= 1:
            raise ValueError(f"max_lag must be at least 1, got {self.max_lag!r}")
        if self.max_references < 1:
            raise ValueError("max_references must be at least 1")

    @property
    def task_name(self) -> str:
        """The codec as part of the task id: its name, and top-k's bits unless 8 (or ``grid``), so that
        releases that refuse 2- and 4-bit values or grids (``#v``, ``#g`` wire tensors) are another swarm;
        8-bit ids are as before."""
        if self.name == "topk" and self.topk_grid:
            return f"{self.name}:grid"
        return self.name if self.name != "topk" or self.topk_bits == 8 else f"{self.name}:{self.topk_bits}bit"


class Stale(codecs.CodecError):
    """A top-k message on a reference we do not hold: nobody's fault, answered with ``CodecReset``."""


@dataclass
class _Reference:
    seq: int
    model: dict[str, torch.Tensor]


Stream = tuple[str, int]  # a peer, and a part of the model


class Compression:
    """Encodes models for one peer at a time and decodes what peers send; ``template`` is our model (names,
    shapes and dtypes every received model, or each of its ``fragments`` parts, must have)."""

    def __init__(self, config: CodecConfig, template: State, fragments: int = 1) -> None:
        self.config = config
        # shapes and dtypes only, but a copy: the protocol's model changes; fp32 needs none
        parts = [*partition(template, fragments), tuple(template)] if fragments > 1 else [tuple(template)]
        self.templates = (
            [] if config.name == "fp32" else [{k: template[k].detach().clone() for k in p} for p in parts]
        )
        self._streams = config.max_references * len(parts)  # most streams awaiting a keyframe
        self._out: OrderedDict[Stream, tuple[_Reference, ...]] = OrderedDict()  # our last, newest last
        self._seq = 0  # our last message's sequence number, to any peer
        self._fresh: set[Stream] = set()  # whose next message from us must be a keyframe
        self._in: OrderedDict[Stream, _Reference] = OrderedDict()  # what we hold of each peer's

    def encode(self, peer: str, body: Mapping[str, Any], model: State) -> tuple[Mapping[str, Any], State]:
        """Body and wire tensors of a model message to ``peer`` (for fp32, the same objects). For top-k
        the peer's reference moves on now (sends are encoded in order); :meth:`forget` it if the send
        fails."""
        name = self.config.name
        if name == "fp32" or not model:
            return body, model
        part = next((i for i, t in enumerate(self.templates) if t.keys() == model.keys()), None)
        if part is None:
            raise ValueError(f"our model's names are no part of the model: {', '.join(model)}")
        if len(self.templates) > 1:
            body = {**body, "f": part}
        if name != "topk":
            return body, codecs.compress(name, model)
        # the closer of the two models both ends hold: our last message to the peer, or its last to us
        stream, template = (peer, part), self.templates[part]
        sent = self._out.get(stream)
        refs = [(r, kind) for r, kind in ((sent and sent[-1], MINE), (self._in.get(stream), YOURS)) if r]
        key_wire = codecs.compress(KEYFRAME, model)
        key_held = codecs.decompress(KEYFRAME, key_wire, template)
        wire, held, base, kind = key_wire, key_held, 0, KEY
        if stream not in self._fresh and refs:
            ref, kind = min(refs, key=lambda rk: _distance(model, rk[0].model))
            delta = {k: v - ref.model[k] if v.is_floating_point() else v for k, v in model.items()}
            c = self.config
            wire = codecs.sparsify(delta, c.topk_fraction, bits=c.topk_bits, grid=c.topk_grid)
            dense = codecs.densify(wire, template)
            held = {k: ref.model[k] + d if d.is_floating_point() else d for k, d in dense.items()}
            base = ref.seq
            if _distance(model, held) > self.config.max_lag * _distance(model, key_held):
                wire, held, base, kind = key_wire, key_held, 0, KEY
        self._fresh.discard(stream)
        self._seq += 1
        kept = (*(sent or ()), _Reference(self._seq, held))[-SENT_KEPT:]
        self._keep(self._out, stream, kept)
        return {**body, "z": {"seq": self._seq, "base": base, "ref": kind}}, wire

    def decode(self, peer: str, body: Mapping[str, Any], wire: State) -> tuple[Mapping[str, Any], State]:
        """Body (without the codec's fields) and model of a message from ``peer`` (for fp32, the same
        objects); CodecError if refused (:class:`Stale` when only our reference is missing)."""
        name = self.config.name
        if name == "fp32" or not wire:
            return body, wire
        part = 0
        if len(self.templates) > 1:
            part = body.get("f")
            if not is_count(part, len(self.templates) - 1):
                raise codecs.CodecError(f"a fragment's message names no part 0..{len(self.templates) - 1}")
            body = {k: v for k, v in body.items() if k != "f"}
        stream, template = (peer, part), self.templates[part]
        if name != "topk":
            return body, codecs.decompress(name, wire, template)
        header = body.get("z")
        if not (isinstance(header, Mapping) and set(header) == {"seq", "base", "ref"}):
            raise codecs.CodecError(f"top-k message without its seq, base and ref fields: {quote(header)}")
        seq, base, kind = header["seq"], header["base"], header["ref"]
        if not (
            is_count(seq) and is_count(base) and kind in (KEY, MINE, YOURS) and (base == 0) == (kind == KEY)
        ):
            raise codecs.CodecError(f"top-k header {quote(header)} is not a seq, a base and its kind")
        rest = {k: v for k, v in body.items() if k != "z"}
        if kind == KEY:
            model = codecs.decompress(KEYFRAME, wire, template)
        else:
            # the sender's MINE is the last message it sent us (our _in); its YOURS one of ours to it (_out)
            if kind == MINE:
                held = (self._in[stream],) if stream in self._in else ()
            else:
                held = self._out.get(stream, ())
            ref = next((r for r in held if r.seq == base), None)
            if ref is None:  # ours stays: an overtaken message may still need it
                have = ", ".join(str(r.seq) for r in held) or "none"
                raise Stale(f"top-k message on reference {base}, we hold {have}")
            dense = codecs.densify(wire, template)
            # finite for float32 models (float16 values cannot carry a finite reference past float32's
            # max); in a float16 model it may overflow, and the protocol's norm bound refuses it
            model = {k: ref.model[k] + d if d.is_floating_point() else d for k, d in dense.items()}
        self._keep(self._in, stream, _Reference(seq, model))
        return rest, {k: v.clone() for k, v in model.items()}

    def forget(self, peer: str) -> None:
        """``peer`` may not hold our last message, or cannot decode ours (the send failed, or it asked for a
        keyframe): the next message to it, of each part, is one."""
        for part in range(max(1, len(self.templates))):
            self._out.pop((peer, part), None)
            self._fresh.add((peer, part))
        while len(self._fresh) > self._streams:  # bounded like the references themselves
            self._fresh.pop()

    def _keep(self, table: OrderedDict[Stream, Any], stream: Stream, ref: object) -> None:
        """``ref`` for ``stream``, evicting the least recently used of its part's beyond ``max_references``
        (so that whole models, a part of their own, stay as bounded as before)."""
        table[stream] = ref
        table.move_to_end(stream)
        same = [s for s in table if s[1] == stream[1]]
        for old in same[: max(0, len(same) - self.config.max_references)]:
            del table[old]


def _distance(model: State, ref: State) -> float:
    return sum(
        float(torch.linalg.vector_norm(v - ref[k])) ** 2 for k, v in model.items() if v.is_floating_point()
    )
