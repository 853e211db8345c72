"""Checkpoints: the model, where the protocol stood and the outer optimizer's momentum
(``learning.outer``), in one safetensors file written atomically.

safetensors holds only tensors and string metadata, so loading a checkpoint never runs code (unlike
``torch.load`` without ``weights_only``). A daemon killed at any moment leaves the previous
checkpoint or the new one (``overlay.atomic``), and restarts from it with the same identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from shoal.learning.models import ModelError, ParameterLayout
from shoal.learning.protocol import State
from shoal.overlay.atomic import write_atomic


class CheckpointError(Exception):
    """A checkpoint file exists but cannot be used; the message says which file and why."""


MOMENTUM = "momentum#"  # the prefix of the momentum's tensors: no model's tensor has a '#' (codecs)


@dataclass(frozen=True)
class Checkpoint:
    state: State
    round: int
    task: str
    momentum: State = field(default_factory=dict)  # by the model's tensor names; empty before a step


def save(path: Path, checkpoint: Checkpoint) -> None:
    momentum = {MOMENTUM + name: m for name, m in checkpoint.momentum.items()}
    tensors = {name: t.detach().cpu().contiguous() for name, t in {**checkpoint.state, **momentum}.items()}
    metadata = {"round": str(checkpoint.round), "task": checkpoint.task}
    write_atomic(path, save_tensors(tensors, metadata=metadata))


def load(path: Path, task: str, layout: ParameterLayout | None = None) -> Checkpoint | None:
    """The checkpoint at ``path``; None if there is none; CheckpointError if damaged, another task's, or
    (given the model's ``layout``) not fitting it: with one, its tensors come in the layout's order
    (safetensors sorts names)."""
    if not path.exists():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
        round_ = int(metadata["round"])
    except (OSError, SafetensorError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({e}); move it away to start afresh"
        ) from None
    if metadata.get("task") != task:
        raise CheckpointError(
            f"checkpoint {path} belongs to task {metadata.get('task')}, not this node's task {task} "
            "(the model or dataset changed?); move it away to start afresh"
        )
    state = {n: t for n, t in tensors.items() if not n.startswith(MOMENTUM)}
    momentum = {n.removeprefix(MOMENTUM): t for n, t in tensors.items() if n.startswith(MOMENTUM)}
    if layout is None:
        return Checkpoint(state, round_, task, momentum)
    try:
        return Checkpoint(_fitted(state, layout), round_, task, _fitted(momentum, layout, partial=True))
    except (KeyError, ModelError) as e:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model ({e}); move it away to start over"
        ) from None


def _fitted(state: State, layout: ParameterLayout, *, partial: bool = False) -> State:
    """``state`` in ``layout``'s order, each tensor of the model's shape and dtype; ``partial`` (the outer
    momentum: none before its first step, nor for counters): some may be missing, all must be finite."""
    if unknown := sorted(set(state) - set(layout.names)):
        raise ModelError(f"tensors {unknown[:3]} are not the model's")
    if not partial:
        ordered = {name: state[name] for name in layout.names}
        layout.check(ordered)
        return ordered
    for name, shape, dtype in zip(layout.names, layout.shapes, layout.dtypes, strict=True):
        t = state.get(name)
        if t is not None and (tuple(t.shape) != shape or t.dtype != dtype or not t.isfinite().all()):
            raise ModelError(f"momentum {name!r} is not a finite {dtype} tensor of shape {shape}")
    return {name: state[name] for name in layout.names if name in state}
