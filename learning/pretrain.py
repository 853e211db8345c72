"""Transfer learning for Bristle: pre-train a conv feature extractor on a source task, freeze it.

No downloaded weights: the extractor is trained here, honestly, on source data that the target task
never sees, then saved as safetensors (loadable by ``learning.models.frozen_cnn``). Nodes then train and
share only a bias-free linear head over its features, which they compute once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from shoal.learning.models import SmallCNN, conv_features
from shoal.learning.training import evaluate, train_local


def pretrain_extractor(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, *, epochs: float = 30, seed: int = 0
) -> tuple[nn.Sequential, float]:
    """Train a SmallCNN on the source data; return its feature layers and its source training accuracy."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(tuple(x.shape[1:]), num_classes)
    train_local(model, x, y, batch_size=32, lr=0.05, epochs=epochs, momentum=0.9, seed=seed)
    return model.features.requires_grad_(False).eval(), evaluate(model, x, y, num_classes).accuracy


def extractor_bytes(features: nn.Module) -> bytes:
    """The extractor as safetensors bytes; callers write them (``overlay.atomic.write_atomic``): learning
    does no I/O."""
    return save({k: v.contiguous() for k, v in features.state_dict().items()})


def load_extractor(path: Path, input_shape: tuple[int, ...]) -> nn.Sequential:
    features = conv_features(*input_shape)
    features.load_state_dict(load_file(str(path)))
    return features.requires_grad_(False).eval()


@torch.no_grad()
def extract(features: nn.Module, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    return torch.cat([features(x[i : i + batch]) for i in range(0, len(x), batch)])
