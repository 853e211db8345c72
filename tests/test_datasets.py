import gzip
import struct

import numpy as np
import pytest
import torch

from shoal.learning.datasets import DatasetError, _digits, load_dataset, load_npz, read_idx


def test_digits_is_real_and_split_from_seed():
    a = load_dataset("digits", seed=3)
    b = load_dataset("digits", seed=3)
    c = load_dataset("digits", seed=4)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.x_train) + len(a.x_test) == 1797
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert float(a.x_train.min()) >= 0.0 and float(a.x_train.max()) <= 1.0
    assert torch.equal(a.y_test, b.y_test) and torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.y_test, c.y_test)


def test_mnist1d_generated_offline_and_deterministic():
    state = np.random.get_state()[1].copy()
    a = load_dataset("mnist1d", seed=5, samples=500)
    assert np.array_equal(np.random.get_state()[1], state), "global numpy RNG must be left untouched"
    b = load_dataset("mnist1d", seed=5, samples=500)
    assert a.input_shape == (40,) and a.num_classes == 10
    assert len(a.x_train) == 400 and len(a.x_test) == 100
    assert torch.equal(a.x_train, b.x_train)


def save(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_with_and_without_test_split(tmp_path):
    x, y = np.random.default_rng(0).random((50, 3)), np.arange(50) % 4
    d = load_npz(save(tmp_path / "a.npz", x=x, y=y), seed=1, test_fraction=0.2)
    assert (len(d.x_train), len(d.x_test), d.num_classes, d.input_shape) == (40, 10, 4, (3,))
    d = load_npz(save(tmp_path / "b.npz", x=x, y=y, x_test=x[:5], y_test=np.full(5, 6)))
    assert (len(d.x_train), len(d.x_test), d.num_classes) == (50, 5, 7)
    assert load_dataset(str(tmp_path / "b.npz")).num_classes == 7


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 2))}, "missing array"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4)}, "integer class labels"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, 1, -1, 0])}, "negative labels"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3, dtype=int)}, "shape (4,)"),
        ({"x": np.array([[np.nan, 1.0]]), "y": np.zeros(1, dtype=int)}, "NaN"),
        ({"x": np.zeros(4), "y": np.zeros(4, dtype=int)}, "shape (samples"),
        ({"x": np.array(["a", "b"]).reshape(2, 1), "y": np.zeros(2, dtype=int)}, "must hold numbers"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4, dtype=int), "x_test": np.zeros((2, 2))}, "both x_test"),
        (
            {
                "x": np.zeros((4, 2)),
                "y": np.zeros(4, dtype=int),
                "x_test": np.zeros((2, 3)),
                "y_test": np.zeros(2, int),
            },
            "x_test (3,)",
        ),
    ],
)
def test_bad_npz_files_say_what_is_wrong(tmp_path, arrays, message):
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_npz(save(tmp_path / "bad.npz", **arrays))


def test_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_npz(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(DatasetError, match="not a readable"):
        load_npz(tmp_path / "junk.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, int))
    with pytest.raises(DatasetError, match="not a readable"):
        load_npz(tmp_path / "obj.npz")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("cifar-100")


def write_idx(path, array):
    header = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_debian_idx_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (6, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 9, 4, 5]))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (2, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([3, 3]))
    monkeypatch.setenv("SHOAL_FASHION_MNIST_DIR", str(tmp_path))
    d = load_dataset("fashion-mnist")
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10 and len(d.x_test) == 2
    assert float(d.x_train.max()) <= 1.0
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_truncated_idx_is_rejected(tmp_path):
    path = tmp_path / "t.idx"
    path.write_bytes(b"\0\0\x08\x01" + struct.pack(">I", 10) + b"abc")
    with pytest.raises(DatasetError, match="holds 3 values"):
        read_idx(path)


def test_digits_read_from_the_file_are_what_sklearn_loads():
    from sklearn.datasets import load_digits

    pixels, labels = _digits()
    bunch = load_digits()
    assert np.array_equal(pixels, bunch.data) and np.array_equal(labels, bunch.target)
