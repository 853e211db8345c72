"""The messages of the learning protocols as typed values with bounds (../shared/DESIGN.md principle 7).

Each message kind has one frozen dataclass: ``parse(body)`` returns the message or a string saying why it
was refused, ``body()`` is what a sender puts on the wire. Protocols read a peer's message only through
these classes and :func:`model_fault`, so every bound that does not depend on the node's state is here
(the round window does, and lives in each protocol):

- rounds, advertisement indices and selection ids are ints (not bools) in [0, ``MAX_ROUND``], with
  ``MAX_ROUND`` = 2**53 - 1. The daemon writes rounds into the pycrdt metadata document, which panics
  past 2**63, and into JSON status, whose readers parse numbers as doubles, exact only up to 2**53;
  simulations average rounds as floats. A swarm at one round per millisecond needs 285,000 years to
  get there, so no honest value is refused;
- sample counts are at most ``MAX_SAMPLES`` (weights of a weighted average: bounded, they cannot
  overflow it, though a peer may still overstate its count within the bound);
- label sets hold at most ``MAX_LABELS`` class numbers below ``MAX_LABELS``; views at most ``MAX_VIEW``
  peers with ids of at most ``MAX_PEER_ID`` characters;
- a model must have our model's names, shapes and dtypes, and no layer much larger (L2) than ours
  (:func:`model_fault`): finite but huge values (1e30) pass any finiteness check, then overflow local
  training or dominate every average, whatever the integrator. The same bound refuses NaN and Inf (they
  make a layer's norm NaN or Inf) without a pass of its own: on libp2p the wire refused them already
  (``overlay.wire``), and the simulated overlay, which hands tensors over without encoding them, relies
  on this bound.

Reasons quote at most a few dozen characters of what they refuse: a peer cannot grow our log lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch

from shoal.learning.averaging import incompatibility

MAX_ROUND = 2**53 - 1
MAX_SAMPLES = 10**9
MAX_LABELS = 10_000
# Peers in a MoDeST view, sent and kept: half the wire's 10,000 entries per map, so that an honest
# node's view always fits in a message (a larger one would be refused as malformed and get it banned).
MAX_VIEW = 5_000
MAX_PEER_ID = 256
# Per-element RMS below which a layer of ours counts as this large when bounding a received layer: a
# zero-initialised layer (biases, LoRA-style adapters) would otherwise refuse every trained peer's.
NORM_FLOOR = 0.1

T = TypeVar("T")


def is_count(x: object, limit: int = MAX_ROUND) -> bool:
    """An int (not a bool) in [0, limit]: what rounds, indices and counts must be on the wire."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= limit


def quote(x: object) -> str:
    """repr(x), cut to 40 characters: what a reason may quote of a peer's input."""
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def _count(body: Mapping, key: str, limit: int = MAX_ROUND) -> int:
    x = body.get(key)
    if not is_count(x, limit):
        raise ValueError(f"{key} must be an integer in [0, {limit}], got {quote(x)}")
    return x


def _flag(body: Mapping, key: str) -> bool:
    x = body.get(key)
    if not isinstance(x, bool):
        raise ValueError(f"{key} must be true or false, got {quote(x)}")
    return x


def _parse(kind: str, body: object, build: Callable[[Mapping], T]) -> T | str:
    if not isinstance(body, Mapping):
        return f"{kind} message body must be a map, got {type(body).__name__}"
    try:
        return build(body)
    except ValueError as exc:
        return f"{kind} message: {exc}"


# --- gossip ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GossipModel:
    """``model``: a peer's model after ``round`` rounds, trained on ``samples`` samples; ``reply`` if it
    answers our ``fetch``; ``labels``: the classes the sender holds, if it says (for Bristle)."""

    round: int
    samples: int
    reply: bool = False
    labels: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, body: object) -> GossipModel | str:
        def build(b: Mapping) -> GossipModel:
            labels = b.get("labels")
            if labels is not None and not (
                isinstance(labels, list | tuple)
                and len(labels) <= MAX_LABELS
                and all(is_count(c, MAX_LABELS - 1) for c in labels)
            ):
                raise ValueError(f"labels must be a list of at most {MAX_LABELS} class numbers")
            reply = b.get("reply", False)
            if not isinstance(reply, bool):
                raise ValueError(f"reply must be true or false, got {quote(reply)}")
            return cls(
                _count(b, "round"),
                _count(b, "samples", MAX_SAMPLES),
                reply,
                None if labels is None else tuple(labels),
            )

        return _parse("model", body, build)

    def body(self) -> dict:
        out: dict = {"round": self.round, "samples": self.samples}
        if self.reply:
            out["reply"] = True
        if self.labels is not None:
            out["labels"] = list(self.labels)
        return out


# --- MoDeST ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """What a MoDeST view says about one peer."""

    last_active: int = 0
    index: int = 0  # advertisement counter of the peer; only grows
    joined: bool = True


def parse_view(data: object) -> dict[str, Entry]:
    """A view as it rides along with a model: ``{peer: [last_active, index, joined]}``."""
    if not isinstance(data, Mapping) or len(data) > MAX_VIEW:
        raise ValueError(f"view must be a map of at most {MAX_VIEW} peers")
    out = {}
    for peer, value in data.items():
        if not (isinstance(peer, str) and 0 < len(peer) <= MAX_PEER_ID):
            raise ValueError(f"view key {quote(peer)} is not a peer id")
        if not (isinstance(value, list | tuple) and len(value) == 3):
            raise ValueError(f"view entry {quote(peer)} is not [last_active, index, joined]")
        last, index, joined = value
        if not (is_count(last) and is_count(index) and isinstance(joined, bool)):
            raise ValueError(f"view entry {quote(peer)} has bad values {quote(value)}")
        out[peer] = Entry(last, index, joined)
    return out


def view_body(entries: Mapping[str, Entry]) -> dict[str, list]:
    return {p: [e.last_active, e.index, e.joined] for p, e in entries.items()}


@dataclass(frozen=True)
class Ping:
    """``ping``: is the receiver available for selection ``sel`` of ``round``?"""

    KIND: ClassVar[str] = "ping"
    sel: int
    round: int  # the round being selected for

    @classmethod
    def parse(cls, body: object) -> Ping | str:
        return _parse(cls.KIND, body, lambda b: cls(_count(b, "sel"), _count(b, "round")))

    def body(self) -> dict:
        return {"sel": self.sel, "round": self.round}


@dataclass(frozen=True)
class Pong(Ping):
    """``pong``: the answer to a ping, with the responder's round estimate."""

    KIND: ClassVar[str] = "pong"


@dataclass(frozen=True)
class Advert:
    """``advert``: the sender joins (or leaves), at its ``index``-th advertisement and round estimate."""

    round: int
    index: int
    joined: bool

    @classmethod
    def parse(cls, body: object) -> Advert | str:
        return _parse(
            "advert", body, lambda b: cls(_count(b, "round"), _count(b, "index"), _flag(b, "joined"))
        )

    def body(self) -> dict:
        return {"round": self.round, "index": self.index, "joined": self.joined}


@dataclass(frozen=True)
class ModestModel:
    """``aggregated`` (the model of ``round``) or ``trained`` (a trainer's model, tagged ``round``), with
    the sender's view."""

    round: int
    samples: int
    view: Mapping[str, Entry]

    @classmethod
    def parse(cls, body: object, kind: str) -> ModestModel | str:
        return _parse(
            kind,
            body,
            lambda b: cls(
                _count(b, "round"), _count(b, "samples", MAX_SAMPLES), parse_view(b.get("view", {}))
            ),
        )

    def body(self) -> dict:
        return {"round": self.round, "samples": self.samples, "view": view_body(self.view)}


# --- models ---------------------------------------------------------------------------------


def model_fault(
    reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], max_norm_ratio: float
) -> str | None:
    """Why a received ``model`` is refused next to ours (``reference``), or None.

    Besides names, shapes and dtypes, every floating-point layer's L2 norm must be at most
    ``max_norm_ratio`` times ours (ours counted as at least ``NORM_FLOOR`` per element), which a NaN or
    Inf anywhere in it fails. Only the upper side is bounded: a layer far smaller than ours is a bad
    model like any other, which an average dilutes, while a far larger one overflows training or
    outweighs everyone else's.
    """
    reason = incompatibility(reference, model, finite=False)  # the norm bound below refuses NaN and Inf
    if reason:
        return f"model does not fit: {reason}"
    for name, ours in reference.items():
        if not ours.is_floating_point():
            continue
        own = torch.linalg.vector_norm(ours, dtype=torch.float64).item()
        bound = max_norm_ratio * max(own, NORM_FLOOR * math.sqrt(ours.numel()))
        theirs = torch.linalg.vector_norm(model[name], dtype=torch.float64).item()
        if not theirs <= bound:  # NaN included
            ratio = f"{max_norm_ratio:g}x"
            return f"model is implausible: {name!r} has L2 norm {theirs:.3g}, not within {ratio} ours"
    return None
