"""The messages of the learning protocols as typed values with bounds (every peer is a possible adversary).

Each message kind has one frozen dataclass, and :data:`MESSAGES` maps each kind on the wire to its class:
the only place a kind is spelled. :func:`decode` turns what the codec decoded (``node.driver``) into a
message, or a string saying why it was refused; ``body()`` and ``tensors`` are what a sender puts on the
wire. Protocols receive and emit these values only and ``match`` on their classes, so every bound that
does not depend on the node's state is here (the round window does, and lives in each protocol; so does
:func:`model_fault`, which needs the node's own model):

- rounds, advertisement indices and selection ids are ints (not bools) in [0, ``MAX_ROUND``], with
  ``MAX_ROUND`` = 2**53 - 1. The daemon writes rounds into the pycrdt metadata document, which panics
  past 2**63, and into JSON status, whose readers parse numbers as doubles, exact only up to 2**53;
  simulations average rounds as floats. A swarm at one round per millisecond needs 285,000 years to
  get there, so no honest value is refused;
- sample counts are at most ``MAX_SAMPLES`` (weights of a weighted average: bounded, they cannot
  overflow it, though a peer may still overstate its count within the bound);
- label sets hold at most ``MAX_LABELS`` class numbers below ``MAX_LABELS``;
- a model message carries a model and a control message none;
- a model must have our model's names, shapes and dtypes and finite values (on libp2p the wire
  refused NaN and Inf already, ``overlay.wire``; the simulated overlay hands tensors over as they are),
  and no layer much larger (L2) than ours (:func:`model_fault`, which says which of these prove the
  sender wrong).

Unknown keys in a body are ignored. Reasons quote at most a few dozen characters of what they refuse: a
peer cannot grow our log lines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, get_args

import torch

from shoal.learning.averaging import incompatibility

# The messages' schema: part of the task id (``node.daemon.task_id``), so that releases whose messages
# differ never share a task. 2: MoDeST's models carry no view and adverts are gone (members come from
# the overlay).
VERSION = 2
MAX_ROUND = 2**53 - 1
MAX_SAMPLES = 10**9
MAX_LABELS = 10_000
# Per-element RMS below which a layer of ours counts as this large when bounding a received layer: a
# zero-initialised layer (biases, LoRA-style adapters) would otherwise refuse every trained peer's.
NORM_FLOOR = 0.1

Tensors = Mapping[str, torch.Tensor]


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


class _Message:
    """What every message class has: its ``KIND`` on the wire and a bounded ``parse``; subclasses say
    which fields they read (``_fields``) and whether they carry a model (``_check_tensors``)."""

    KIND: ClassVar[str]

    @classmethod
    def parse(cls, body: object, tensors: Tensors) -> Self | str:
        """The message a peer sent, or why it is refused."""
        if not isinstance(body, Mapping):
            return f"{cls.KIND} message body must be a map, got {type(body).__name__}"
        try:
            cls._check_tensors(tensors)
            return cls(**cls._fields(body, tensors))
        except ValueError as exc:
            return f"{cls.KIND} message: {exc}"

    @classmethod
    def _check_tensors(cls, tensors: Tensors) -> None:
        if tensors:
            raise ValueError(f"takes no tensors, got {len(tensors)}")

    @classmethod
    def _fields(cls, body: Mapping, tensors: Tensors) -> dict[str, Any]:
        return {}

    @property
    def tensors(self) -> Tensors:
        return {}

    def body(self) -> dict:
        return {}


# --- models ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Model(_Message):
    """A model after ``round`` rounds, trained on ``samples`` samples (its weight in an average).
    Equality compares ``state`` too, which torch allows only for the same tensor objects: compare two
    received models by their fields and tensors, not with ``==``."""

    round: int
    samples: int
    state: dict[str, torch.Tensor] = field(repr=False)

    @classmethod
    def _check_tensors(cls, tensors: Tensors) -> None:
        if not tensors:
            raise ValueError("carries no model")

    @classmethod
    def _fields(cls, body: Mapping, tensors: Tensors) -> dict[str, Any]:
        return {
            "round": _count(body, "round"),
            "samples": _count(body, "samples", MAX_SAMPLES),
            "state": dict(tensors),
        }

    @property
    def tensors(self) -> Tensors:
        return self.state

    def body(self) -> dict:
        return {"round": self.round, "samples": self.samples}


@dataclass(frozen=True)
class GossipModel(_Model):
    """Gossip's model; ``reply`` if it answers our :class:`Fetch`; ``labels``: the classes the sender
    holds, if it says (for Bristle)."""

    KIND: ClassVar[str] = "model"
    reply: bool = False
    labels: tuple[int, ...] | None = None

    @classmethod
    def _fields(cls, body: Mapping, tensors: Tensors) -> dict[str, Any]:
        labels = body.get("labels")
        if labels is not None and not (
            isinstance(labels, list | tuple)
            and len(labels) <= MAX_LABELS
            and all(is_count(c, MAX_LABELS - 1) for c in labels)
        ):
            raise ValueError(f"labels must be a list of at most {MAX_LABELS} class numbers")
        reply = body.get("reply", False)
        if not isinstance(reply, bool):
            raise ValueError(f"reply must be true or false, got {quote(reply)}")
        labels = None if labels is None else tuple(labels)
        return {**super()._fields(body, tensors), "reply": reply, "labels": labels}

    def body(self) -> dict:
        out = super().body()
        if self.reply:
            out["reply"] = True
        if self.labels is not None:
            out["labels"] = list(self.labels)
        return out


@dataclass(frozen=True)
class AggregatedModel(_Model):
    """MoDeST: the model of ``round``, from one of its aggregators to one of its trainers."""

    KIND: ClassVar[str] = "aggregated"


@dataclass(frozen=True)
class TrainedModel(_Model):
    """MoDeST: a trainer's model, tagged ``round`` (the next), to one of that round's aggregators."""

    KIND: ClassVar[str] = "trained"


# --- control --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetch(_Message):
    """Gossip: send me your current model (a joiner's first message)."""

    KIND: ClassVar[str] = "fetch"


@dataclass(frozen=True)
class _Probe(_Message):
    """What a ping and its pong carry: a selection id and a round."""

    sel: int
    round: int

    @classmethod
    def _fields(cls, body: Mapping, tensors: Tensors) -> dict[str, Any]:
        return {"sel": _count(body, "sel"), "round": _count(body, "round")}

    def body(self) -> dict:
        return {"sel": self.sel, "round": self.round}


@dataclass(frozen=True)
class Ping(_Probe):
    """MoDeST: is the receiver available for selection ``sel`` of ``round`` (the round being selected
    for)?"""

    KIND: ClassVar[str] = "ping"


@dataclass(frozen=True)
class Pong(_Probe):
    """MoDeST: the answer to a ping, with the responder's round estimate."""

    KIND: ClassVar[str] = "pong"


@dataclass(frozen=True)
class CodecReset(_Message):
    """The codec's own: "I do not hold the reference you used; send a keyframe" (``learning.compression``).
    The driver sends and reads it; no protocol ever sees it."""

    KIND: ClassVar[str] = "codec-reset"


PeerMessage = GossipModel | AggregatedModel | TrainedModel | Fetch | Ping | Pong | CodecReset
MODELS = (GossipModel, AggregatedModel, TrainedModel)  # the messages that carry a model
MESSAGES: dict[str, type[PeerMessage]] = {cls.KIND: cls for cls in get_args(PeerMessage)}  # the registry


def decode(kind: str, body: object, tensors: Tensors) -> PeerMessage | str:
    """The message of this wire kind, or why it is refused (an unknown kind included)."""
    cls = MESSAGES.get(kind)
    if cls is None:
        return f"unknown message kind {quote(kind)}"
    return cls.parse(body, tensors)


# --- a model next to ours ------------------------------------------------------------------


def model_fault(
    reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], max_norm_ratio: float
) -> tuple[str, bool] | None:
    """Why a received ``model`` is refused next to ours (``reference``), and whether that proves its
    sender wrong (the ``blame`` of :class:`~learning.protocol.Rejected`); None when it is taken.

    Wrong, and blamed: other names, shapes or dtypes than ours, or NaN/Inf: no honest peer of the task
    sends such a model. Implausible, and only dropped: a floating-point layer whose L2 norm exceeds
    ``max_norm_ratio`` times ours (ours counted as at least ``NORM_FLOOR`` per element). Finite but huge
    values (1e30) pass any finiteness check, then overflow training or outweigh everyone else, so they
    are refused; but the bound is relative to our own model, and when an attacker has moved ours (or an
    honest peer's), honest models look implausible to each other: blaming them turned one poisoner
    into a swarm of honest nodes banning each other. Only the upper side is bounded: a layer far
    smaller than ours is a bad model like any other, which robust integration handles.
    """
    reason = incompatibility(reference, model, finite=False)
    if reason:
        return f"model does not fit: {reason}", True
    layers = [name for name, ours in reference.items() if ours.is_floating_point()]
    norms = {name: torch.linalg.vector_norm(model[name], dtype=torch.float64).item() for name in layers}
    for name in layers:  # a norm is finite when the values are (one pass over them, not two)
        if not math.isfinite(norms[name]) and not torch.isfinite(model[name]).all():
            return f"model does not fit: {name!r} contains NaN or infinite values", True
    for name in layers:
        ours = reference[name]
        own = torch.linalg.vector_norm(ours, dtype=torch.float64).item()
        bound = max_norm_ratio * max(own, NORM_FLOOR * math.sqrt(ours.numel()))
        theirs = norms[name]
        if theirs > bound:
            ratio = f"{max_norm_ratio:g}x"
            return f"model is implausible: {name!r} has L2 norm {theirs:.3g}, not within {ratio} ours", False
    return None
