"""A language-model workload: a small byte-level transformer on the Python standard library's source.

The corpus is the ``.py`` files of the running interpreter's standard library (tests, IDLE and
site-packages left out): present on every machine that runs Shoal, no download, Python Software
Foundation License. Files are read in path order while they fit in ``max_bytes``; the last tenth of
each (``HELD_OUT``) is held out for evaluation, the same on every node; the rest is training text.

A node's share of the training text (:func:`shard`):
- ``iid``: the text cut into ``BLOCK``-byte blocks, shuffled with the seed and dealt round-robin;
- ``files``: whole files, in path order, cut into ``nodes`` runs of about equal size, so each node
  holds other modules and packages (a non-IID split: its own vocabulary, style and topics).

:func:`make_task` builds node ``node``'s :class:`~learning.task.Task`: the model (:class:`ByteGPT`), an
AdamW loop of ``steps`` steps on random windows of its text per round (its optimizer state is the
node's own across rounds), evaluation as held-out **bits per byte** (8 for a uniform guess), and a
probe of next-byte predictions on its own text. For ``shoal run --task
shoal.learning.language:make_task`` and ``shoal.simulate(make_task, ...)``; a 2-core CPU trains the
default model (137k parameters) at about 60 steps a second, and ``width``/``layers``/``context``
scale it up to models only a GPU trains quickly.
"""

from __future__ import annotations

import bisect
import copy
import functools
import itertools
import math
import random
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from shoal.learning.anchor import ClassificationProbe
from shoal.learning.task import Metrics, Task

BLOCK = 1024  # bytes per block of the iid split
HELD_OUT = 10  # the last 1/HELD_OUT of every file is held out
EVAL_WINDOWS = 64  # held-out windows bits per byte is measured on
SPLITS = ("iid", "files")


@functools.cache  # every simulated node of a run reads the same files
def corpus(max_bytes: int = 2_000_000, root: Path | None = None) -> tuple[bytes, tuple[bytes, ...]]:
    """The held-out text and the training files (bytes each), in path order, at most ``max_bytes`` in all."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib"}
    held, train, total = [], [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts):
            continue
        text = path.read_bytes()
        if total + len(text) > max_bytes:
            continue  # too big for what is left: smaller files further on may fit
        total += len(text)
        cut = len(text) - len(text) // HELD_OUT
        train.append(text[:cut])
        held.append(text[cut:])
    if not train or not held:
        raise ValueError(f"no Python source under {root} to train and evaluate on")
    return b"".join(held), tuple(train)


def shard(files: Sequence[bytes], node: int, nodes: int, split: str = "iid", seed: int = 0) -> bytes:
    """Node ``node``'s share (of ``nodes``) of the training text."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not 0 <= node < nodes:
        raise ValueError(f"node must be in [0, {nodes}), got {node}")
    if split == "files":  # runs of whole files, cut where a node's equal share would end, none empty
        if len(files) < nodes:
            raise ValueError(f"{len(files)} files cannot be split among {nodes} nodes: raise max_bytes")
        starts = list(itertools.accumulate(map(len, files), initial=0))[:-1]
        cuts = [0]
        for k in range(1, nodes):
            at = bisect.bisect_left(starts, k * sum(map(len, files)) / nodes)
            cuts.append(min(max(at, cuts[-1] + 1), len(files) - (nodes - k)))
        cuts.append(len(files))
        return b"".join(files[cuts[node] : cuts[node + 1]])
    text = b"".join(files)
    blocks = [text[i : i + BLOCK] for i in range(0, len(text), BLOCK)]
    random.Random(seed).shuffle(blocks)
    return b"".join(blocks[node::nodes])


def windows(
    text: bytes, context: int, count: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random windows of ``context`` bytes and the byte after each position (inputs, targets)."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    start = torch.randint(0, len(data) - context - 1, (count,), generator=generator)
    at = start[:, None] + torch.arange(context + 1)
    chunk = data[at].long()
    return chunk[:, :-1], chunk[:, 1:]


class ByteGPT(nn.Module):
    """A decoder-only transformer over bytes: embeddings, ``layers`` pre-norm causal blocks, a head.
    Input (batch, time) byte values; output (batch, time, 256) logits of the next byte."""

    def __init__(self, context: int = 64, width: int = 64, layers: int = 2, heads: int = 2) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)
        mask = nn.Transformer.generate_square_subsequent_mask(context)
        self.register_buffer("mask", mask, persistent=False)  # not a parameter: never sent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.embed(x) + self.position[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def adamw(model: nn.Module, lr: float, moments: Mapping[str, object] | None = None) -> torch.optim.AdamW:
    """The inner optimizer; ``moments``: an AdamW ``state_dict()`` to go on from (a copy of it is taken),
    e.g. a pretraining run's, so the first steps are not a fresh Adam's (every coordinate moving by
    about ``lr``, whatever its gradient's size: on a small batch, mostly noise)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    if moments is not None:
        optimizer.load_state_dict(copy.deepcopy(moments))
    return optimizer


def step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimizer step on next-byte cross-entropy (gradients clipped to norm 1); the loss before it."""
    loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def bits_per_byte(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy of the next byte, in bits."""
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)).item() / math.log(2)


def make_task(
    node: int,
    nodes: int,
    *,
    split: str = "iid",
    context: int = 64,
    width: int = 64,
    layers: int = 2,
    heads: int = 2,
    steps: int = 20,
    batch: int = 16,
    lr: float = 3e-3,
    max_bytes: int = 2_000_000,
    seed: int = 0,
    moments: Mapping[str, object] | None = None,
) -> Task:
    """Node ``node`` of ``nodes``: its share of the corpus, a :class:`ByteGPT` (the same initial model on
    every node: seeded by ``seed``), ``steps`` AdamW steps of ``batch`` windows per round (AdamW's
    state from ``moments`` if given: :func:`adamw`)."""
    held, files = corpus(max_bytes)
    text = shard(files, node, nodes, split, seed)
    torch.manual_seed(seed)
    model = ByteGPT(context, width, layers, heads)
    optimizer = adamw(model, lr, moments)
    draw = torch.Generator().manual_seed(seed * 1_000_003 + node)
    held_x, held_y = windows(held, context, EVAL_WINDOWS, torch.Generator().manual_seed(seed))
    probe_x, probe_y = windows(text, context, 32, torch.Generator().manual_seed(seed + 1))

    def train(model: nn.Module, round: int) -> Metrics:
        model.train()
        total = sum(step(model, optimizer, *windows(text, context, batch, draw)) for _ in range(steps))
        return {"loss": total / steps, "samples": steps * batch * context}

    def evaluate(model: nn.Module) -> Metrics:
        model.eval()
        return {"bits_per_byte": bits_per_byte(model, held_x, held_y)}

    probe = ClassificationProbe(probe_x, probe_y)
    return Task(model, train=train, evaluate=evaluate, samples=len(text), probe=probe)
