"""Datasets that load with no network: what every node trains and evaluates on.

Built in:
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 samples, 10 classes), real data.
- ``mnist1d``: MNIST-1D (Greydanus 2020), length-40 signals generated procedurally and
  deterministically from built-in templates by the ``mnist1d`` package; any number of samples.
- ``fashion-mnist``: Fashion-MNIST (60k + 10k, 28x28) from Debian's ``dataset-fashion-mnist``
  package (``apt-get install dataset-fashion-mnist``) or ``$SHOAL_FASHION_MNIST_DIR``.
- a user's ``.npz`` file with arrays ``x``, ``y`` and optionally ``x_test``, ``y_test``.

Inputs are float32 tensors, labels int64 in ``[0, num_classes)``. Where a source has no test split,
one is drawn from the seed, so the same seed always gives the same split.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
BUILTIN = ("digits", "mnist1d", "fashion-mnist")


class DatasetError(ValueError):
    """A dataset cannot be loaded; the message says what to fix."""


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_dataset(name: str, *, seed: int = 0, test_fraction: float = 0.2, samples: int = 5000) -> Dataset:
    """Load a built-in dataset by name, or a ``.npz`` file by path.

    ``samples`` is the size of generated datasets (mnist1d); ``test_fraction`` applies where the
    source has no test split of its own.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    if name == "digits":
        pixels, labels = _digits()
        return _split(name, (pixels / 16.0).reshape(-1, 1, 8, 8), labels, seed, test_fraction)
    if name == "mnist1d":
        return _mnist1d(seed, samples, test_fraction)
    if name == "fashion-mnist":
        return _fashion_mnist()
    if name.endswith(".npz") or os.path.exists(name):
        return load_npz(name, seed=seed, test_fraction=test_fraction)
    raise DatasetError(f"unknown dataset {name!r}: use one of {', '.join(BUILTIN)} or a path to a .npz file")


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (what ``sklearn.datasets.load_digits`` returns), read from its file:
    importing sklearn and scipy for it cost 0.8 s of CPU per daemon, 19 CPU-seconds when 24 start at
    once on 2 cores."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the digits dataset comes with scikit-learn, which is not installed")
    data = np.loadtxt(
        Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz"), delimiter=","
    )
    return data[:, :-1], data[:, -1].astype(np.int64)


def load_npz(path: str | os.PathLike, *, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Load user data from ``.npz``: ``x`` (N, ...) numbers, ``y`` (N,) integer labels, optional test pair."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (OSError, EOFError, ValueError) as exc:
        # numpy reads a file that is no archive as a pickle, which allow_pickle=False refuses
        raise DatasetError(f"{path}: not a readable .npz archive of plain arrays ({exc})") from None
    missing = {"x", "y"} - arrays.keys()
    if missing:
        raise DatasetError(f"{path}: missing array(s) {sorted(missing)}; found {sorted(arrays)}")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DatasetError(f"{path}: give both x_test and y_test, or neither")
    pairs = [("x", "y")] + ([("x_test", "y_test")] if "x_test" in arrays else [])
    for xk, yk in pairs:
        _check_pair(path, xk, arrays[xk], yk, arrays[yk])
    if len(pairs) == 1:
        return _split(path.stem, arrays["x"], arrays["y"], seed, test_fraction)
    if arrays["x"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DatasetError(
            f"{path}: x has samples of shape {arrays['x'].shape[1:]} but x_test {arrays['x_test'].shape[1:]}"
        )
    return _make(path.stem, arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"])


def _check_pair(path: Path, xk: str, x: np.ndarray, yk: str, y: np.ndarray) -> None:
    if x.dtype.kind not in "fiub":
        raise DatasetError(f"{path}: {xk} must hold numbers, not dtype {x.dtype}")
    if x.ndim < 2 or len(x) == 0:
        raise DatasetError(f"{path}: {xk} must have shape (samples, features...), got {x.shape}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DatasetError(f"{path}: {xk} contains NaN or infinite values")
    if y.dtype.kind not in "iu":
        raise DatasetError(f"{path}: {yk} must hold integer class labels, not dtype {y.dtype}")
    if y.shape != (len(x),):
        raise DatasetError(f"{path}: {yk} must have shape ({len(x)},) to match {xk}, got {y.shape}")
    if y.min() < 0:
        raise DatasetError(f"{path}: {yk} has negative labels (min {y.min()}); labels are 0..classes-1")


def _split(name: str, x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float) -> Dataset:
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = max(1, round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return _make(name, x[train], y[train], x[test], y[test])


def _make(name: str, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> Dataset:
    num_classes = int(max(y.max(), y_test.max())) + 1
    return Dataset(
        name=name,
        x_train=torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32),
        y_train=torch.as_tensor(y, dtype=torch.int64),
        x_test=torch.as_tensor(np.ascontiguousarray(x_test), dtype=torch.float32),
        y_test=torch.as_tensor(y_test, dtype=torch.int64),
        num_classes=num_classes,
    )


def _mnist1d(seed: int, samples: int, test_fraction: float) -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    if samples < 10:
        raise DatasetError(f"mnist1d needs at least 10 samples, got {samples}")
    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = samples, seed, 1.0 - test_fraction
    state = np.random.get_state()  # make_dataset seeds numpy's global generator; leave it as we found it
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)
    return _make("mnist1d", data["x"], data["y"], data["x_test"], data["y_test"])


def _fashion_mnist() -> Dataset:
    root = Path(os.environ.get("SHOAL_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    names = {
        "x": "train-images-idx3-ubyte.gz",
        "y": "train-labels-idx1-ubyte.gz",
        "x_test": "t10k-images-idx3-ubyte.gz",
        "y_test": "t10k-labels-idx1-ubyte.gz",
    }
    if not all((root / f).exists() for f in names.values()):
        raise DatasetError(
            f"Fashion-MNIST not found in {root}: install Debian's package "
            "(apt-get install dataset-fashion-mnist) or set SHOAL_FASHION_MNIST_DIR to a folder "
            "with its IDX .gz files"
        )
    arrays = {key: read_idx(root / f) for key, f in names.items()}
    return _make(
        "fashion-mnist",
        (arrays["x"] / 255.0)[:, None],
        arrays["y"],
        (arrays["x_test"] / 255.0)[:, None],
        arrays["y_test"],
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), gzipped or not, as unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: header says shape {shape} but holds {body.size} values")
    return body.reshape(shape).copy()  # writable: torch warns on read-only buffers
