"""The messages of the learning protocols as typed values with bounds (every peer is a possible adversary).

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
- label sets hold at most ``MAX_LABELS`` class numbers below ``MAX_LABELS``;
- a model must have our model's names, shapes and dtypes and finite values (on libp2p the wire
  refused NaN and Inf already, ``overlay.wire``; the simulated overlay hands tensors over as they are),
  and no layer much larger (L2) than ours (:func:`model_fault`, which says which of these prove the
  sender wrong).

Reasons quote at most a few dozen characters of what they refuse: a peer cannot grow our log lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, TypeVar

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
class ModestModel:
    """``aggregated`` (the model of ``round``) or ``trained`` (a trainer's model, tagged ``round``)."""

    round: int
    samples: int

    @classmethod
    def parse(cls, body: object, kind: str) -> ModestModel | str:
        return _parse(kind, body, lambda b: cls(_count(b, "round"), _count(b, "samples", MAX_SAMPLES)))

    def body(self) -> dict:
        return {"round": self.round, "samples": self.samples}


# --- models ---------------------------------------------------------------------------------


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
    reason = incompatibility(reference, model)
    if reason:
        return f"model does not fit: {reason}", True
    for name, ours in reference.items():
        if not ours.is_floating_point():
            continue
        own = torch.linalg.vector_norm(ours, dtype=torch.float64).item()
        bound = max_norm_ratio * max(own, NORM_FLOOR * math.sqrt(ours.numel()))
        theirs = torch.linalg.vector_norm(model[name], dtype=torch.float64).item()
        if theirs > bound:
            ratio = f"{max_norm_ratio:g}x"
            return f"model is implausible: {name!r} has L2 norm {theirs:.3g}, not within {ratio} ours", False
    return None
