"""Models a node trains, a registry to build them by name, and the flat view peers exchange.

Registry names: ``mlp``, ``cnn``, ``frozen-cnn`` and ``head``; or ``package.module:factory`` for a user's own
model, where ``factory(input_shape=..., num_classes=...)`` returns an ``nn.Module``.

What peers share is a model's *trainable* parameters, in ``named_parameters()`` order
(:class:`ParameterLayout`). For ``frozen-cnn`` that is only the bias-free output layer, as Bristle
needs (``learning.bristle``); its frozen extractor is built from a fixed seed (or loaded from a
safetensors file), so every node holds the same one.
"""

from __future__ import annotations

import importlib
import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

Factory = Callable[..., nn.Module]


class ModelError(ValueError):
    """A model cannot be built or loaded; the message says why."""


class MLP(nn.Module):
    """Flatten, then fully connected layers with ReLU: fast enough for 1,000 simulated nodes."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (64, 32)):
        super().__init__()
        sizes = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def conv_features(
    channels: int, height: int, width: int, widths: tuple[int, int] = (16, 32)
) -> nn.Sequential:
    """Two 3x3 conv + ReLU blocks, each halving the image while it is at least 4 pixels wide."""
    layers: list[nn.Module] = []
    c, h, w = channels, height, width
    for out in widths:
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
        if min(h, w) >= 4:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)


def _image_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ModelError(f"{model} needs image inputs of shape (channels, height, width), got {input_shape}")
    return input_shape  # type: ignore[return-value]


def feature_size(features: nn.Module, input_shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *input_shape)).shape[1])


class SmallCNN(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.features = conv_features(*_image_shape(input_shape, "cnn"))
        self.head = nn.Linear(feature_size(self.features, input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FrozenFeaturesHead(nn.Module):
    """A frozen feature extractor and a bias-free linear head, the only part that trains."""

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.features = features.requires_grad_(False).eval()
        self.head = nn.Linear(feature_dim, num_classes, bias=False)
        nn.init.xavier_uniform_(self.head.weight)

    def train(self, mode: bool = True) -> FrozenFeaturesHead:
        super().train(mode)
        self.features.eval()  # frozen means frozen: no dropout/batch-norm updates either
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.features(x)
        return self.head(z)


def frozen_cnn(
    input_shape: tuple[int, ...], num_classes: int, features_file: str | None = None, features_seed: int = 0
) -> FrozenFeaturesHead:
    """Conv extractor (random from ``features_seed``, or pre-trained from a safetensors file) + head."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(features_seed)
        features = conv_features(*_image_shape(input_shape, "frozen-cnn"))
    if features_file is not None:
        from safetensors.torch import load_file

        try:
            features.load_state_dict(load_file(features_file))
        except (OSError, RuntimeError) as exc:
            raise ModelError(f"cannot load frozen features from {features_file}: {exc}") from None
    return FrozenFeaturesHead(features, feature_size(features, input_shape), num_classes)


def linear_head(input_shape: tuple[int, ...], num_classes: int) -> FrozenFeaturesHead:
    """Just the bias-free head, for inputs that already are frozen features (computed once, not per step)."""
    return FrozenFeaturesHead(nn.Flatten(), math.prod(input_shape), num_classes)


MODELS: dict[str, Factory] = {"mlp": MLP, "cnn": SmallCNN, "frozen-cnn": frozen_cnn, "head": linear_head}


def resolve_factory(spec: str) -> Factory:
    if spec in MODELS:
        return MODELS[spec]
    return import_callable(spec, "model", f"use one of {', '.join(MODELS)} or 'package.module:factory'")


def import_callable(spec: str, what: str, usage: str = "use 'package.module:function'") -> Callable:
    """The callable ``spec`` names as ``package.module:attribute``; a ModelError naming ``what`` and
    ``spec`` in one line when it cannot be imported or called."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"unknown {what} {spec!r}: {usage}")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise ModelError(f"{what} {spec!r}: cannot import {module_name!r} ({exc})") from None
    except AttributeError:
        raise ModelError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(found):
        raise ModelError(f"{what} {spec!r}: {attr!r} is not callable")
    return found


def build_model(
    spec: str, input_shape: tuple[int, ...], num_classes: int, *, seed: int = 0, **options: object
) -> nn.Module:
    """Build a model from the registry or a user factory, initialised from ``seed`` alone."""
    factory = resolve_factory(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = factory(input_shape=tuple(input_shape), num_classes=num_classes, **options)
        except TypeError as exc:
            raise ModelError(f"model {spec!r}: factory rejected its arguments ({exc})") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {spec!r}: factory returned {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f"model {spec!r} has no trainable parameters to share")
    return model


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and dtypes of a model's shared (trainable) parameters, in a stable order.

    Two nodes can average models only when their layouts are equal; the flat vector of a model is the
    concatenation of these tensors in this order.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParameterLayout:
        shared = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return cls(
            tuple(n for n, _ in shared),
            tuple(tuple(p.shape) for _, p in shared),
            tuple(p.dtype for _, p in shared),
        )

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Detached copies of the shared parameters, by name."""
        params = dict(model.named_parameters())
        return {n: params[n].detach().clone() for n in self.names}

    def load(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Copy named tensors into the model's shared parameters, after checking they fit."""
        self.check(state)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(state[n])

    def check(self, state: Mapping[str, torch.Tensor]) -> None:
        if tuple(state) != self.names:
            raise ModelError(
                f"parameter names {list(state)[:4]}... do not match the model's {list(self.names)[:4]}..."
            )
        for n, shape in zip(self.names, self.shapes):
            if tuple(state[n].shape) != shape:
                raise ModelError(
                    f"parameter {n!r} has shape {tuple(state[n].shape)}, the model needs {shape}"
                )

    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[n].reshape(-1).to(torch.float32) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        if flat.shape != (self.numel,):
            raise ModelError(
                f"flat parameters have shape {tuple(flat.shape)}, the model needs ({self.numel},)"
            )
        parts = torch.split(flat, self.sizes)
        return {n: p.reshape(s).to(d) for n, p, s, d in zip(self.names, parts, self.shapes, self.dtypes)}
