"""The dataset loaders: IDX files (gzipped or not), MNIST-1D generation and caching,
scikit-learn's digits, and the errors for missing or damaged data."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from bnkit.errors import ConfigError, DatasetError
from bnkit.lab import datasets
from bnkit.lab.datasets import (
    DatasetNotFoundError,
    IDXFormatError,
    find_idx_files,
    load_dataset,
    mnist1d_arrays,
    read_idx,
    write_idx,
)
from tests.lab.conftest import run_cli, write_tiny_idx

ARRAYS = [
    np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    np.array([-3, 0, 7], dtype=np.int8),
    np.array([[1, -2], [300, -400]], dtype=np.int16),
    np.array([2**31 - 1, -(2**31)], dtype=np.int32),
    np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
    np.array([np.pi, -np.e]),
]


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: str(a.dtype))
def test_idx_round_trip(tmp_path: Path, array: np.ndarray, compress: bool) -> None:
    path = tmp_path / "data-idx"
    write_idx(path, array, compress=compress)
    loaded = read_idx(path)
    assert loaded.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(loaded, array)


def test_idx_header_is_the_mnist_layout(tmp_path: Path) -> None:
    # Written by hand: magic 0x00000803 (uint8, 3 dims), dims 2, 1, 2 big-endian, then data.
    raw = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2, 10, 20, 30, 40])
    (tmp_path / "plain").write_bytes(raw)
    (tmp_path / "packed.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "gzip-without-suffix").write_bytes(gzip.compress(raw))
    for name in ("plain", "packed.gz", "gzip-without-suffix"):
        np.testing.assert_array_equal(read_idx(tmp_path / name), [[[10, 20]], [[30, 40]]])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "not an IDX file"),
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX element type 0x07"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x02", "announces 2 dimensions"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x05\x06", "needs 3 bytes of data, the file has 2"),
        (b"\x00\x00\x0c\x01\x00\x00\x00\x01\x05\x06\x07", "needs 4 bytes"),
        # Sizes whose product overflows 64 bits, or far exceeds the file.
        (bytes([0, 0, 8, 4]) + b"\x00\x01\x00\x00" * 4, "needs 18446744073709551616 bytes"),
        (bytes([0, 0, 8, 2]) + b"\xff" * 8 + b"\x05", "needs 18446744065119617025 bytes"),
    ],
)
def test_damaged_idx_files_are_rejected(tmp_path: Path, raw: bytes, message: str) -> None:
    path = tmp_path / "bad-idx"
    path.write_bytes(raw)
    with pytest.raises(IDXFormatError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_is_an_idx_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.gz"
    write_idx(path, np.zeros((50, 50), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(IDXFormatError, match="cannot read"):
        read_idx(path)


def test_write_idx_refuses_types_idx_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(IDXFormatError, match="IDX cannot hold int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


@pytest.mark.parametrize(("gzipped", "subdir"), [(True, ""), (False, "FashionMNIST/raw")])
def test_fashion_mnist_from_data_dir(tmp_path: Path, gzipped: bool, subdir: str) -> None:
    write_tiny_idx(tmp_path / subdir if subdir else tmp_path, gzipped=gzipped, train=50, test=20)
    data = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert data.x_train.shape == (50, 8, 8)
    assert data.x_test.shape == (20, 8, 8)
    assert data.x_train.dtype == torch.float32
    assert data.y_train.dtype == torch.int64
    assert data.num_classes == 10
    assert data.num_features == 64
    # Standardized with the training statistics, applied to the test set as well.
    assert abs(float(data.x_train.double().mean())) < 1e-5
    assert abs(float(data.x_train.double().std(unbiased=False)) - 1) < 1e-5
    raw_test = read_idx(find_idx_files("fashion-mnist", tmp_path)["test_images"])
    expected = (raw_test.astype(np.float64) - data.mean) / data.std
    np.testing.assert_allclose(data.x_test.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert str(tmp_path) in data.source


def test_missing_dataset_says_where_it_looked_and_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets, "SYSTEM_DATA_DIRS", (tmp_path / "system",))
    monkeypatch.setenv("BNKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BNKIT_DATA_DIR", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir=empty)
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message
    for looked in (empty, empty / "FashionMNIST/raw", tmp_path / "system" / "fashion-mnist"):
        assert str(looked) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message
    with pytest.raises(DatasetNotFoundError, match="MNIST database"):
        load_dataset("mnist", data_dir=empty)


def test_incomplete_directory_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "SYSTEM_DATA_DIRS", ())
    monkeypatch.setenv("BNKIT_CACHE_DIR", str(tmp_path / "cache"))
    write_tiny_idx(tmp_path / "mnist", gzipped=False, train=20, test=10)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"only one file here")
    # The data directory itself lacks three files; its mnist/ subdirectory has all four.
    found = find_idx_files("mnist", tmp_path)
    assert found["test_labels"] == tmp_path / "mnist" / "t10k-labels-idx1-ubyte"


def test_truncated_plain_file_is_an_idx_error(tmp_path: Path) -> None:
    write_tiny_idx(tmp_path, gzipped=False, train=20, test=10)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="needs 1280 bytes of data, the file has 1180") as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(path) in str(info.value)


def nan_images() -> np.ndarray:
    images = np.ones((20, 8, 8), dtype=np.float32)
    images[3, 4, 5] = np.nan
    return images


# (file, its new content, what the error says): each makes the tiny dataset unusable.
DAMAGES = [
    ("train-labels-idx1-ubyte", np.zeros(19, np.uint8), "expected labels of shape (20,)"),
    ("train-labels-idx1-ubyte", np.full(20, 2_000_000_000, np.int32), "from 2000000000"),
    (
        "t10k-labels-idx1-ubyte",
        np.full(10, -1, np.int8),
        "expected labels 0..9, got values from -1",
    ),
    (
        "t10k-labels-idx1-ubyte",
        np.arange(10, dtype=np.uint8) + 1,
        "labels 0..9, got values from 1 to 10",
    ),
    ("train-labels-idx1-ubyte", np.zeros(20, np.float32), "expected integer labels, got float32"),
    ("train-images-idx3-ubyte", np.zeros((0, 8, 8), np.uint8), "at least one sample, got none"),
    ("t10k-images-idx3-ubyte", np.zeros((0, 8, 8), np.uint8), "at least one sample, got none"),
    ("train-images-idx3-ubyte", nan_images(), "expected finite values, got NaN or Inf"),
    ("t10k-images-idx3-ubyte", np.full((10, 8, 8), np.inf), "expected finite values"),
    ("t10k-images-idx3-ubyte", np.zeros((10, 28, 28), np.uint8), "shape (8, 8)"),
    ("train-images-idx3-ubyte", np.zeros((20, 1, 8, 8), np.uint8), "(N, L) or (N, H, W)"),
    ("train-images-idx3-ubyte", np.full((20, 8, 8), 1e308), "mean and standard deviation"),
]


@pytest.mark.parametrize(("file", "content", "problem"), DAMAGES)
def test_damaged_dataset_names_the_file_and_the_problem(
    tmp_path: Path, file: str, content: np.ndarray, problem: str
) -> None:
    write_tiny_idx(tmp_path, gzipped=False, train=20, test=10)
    write_idx(tmp_path / file, content)
    if file.startswith("train-labels"):
        labels = np.zeros(10, dtype=content.dtype)  # the same type of labels in both splits
        write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(info.value)
    assert message.startswith(f"mnist: {tmp_path / file}: expected ")
    assert problem in message


def test_damaged_dataset_stops_bnkit_lab_in_one_line(tmp_path: Path) -> None:
    write_tiny_idx(tmp_path, gzipped=False, train=20, test=10)
    write_idx(tmp_path / "train-images-idx3-ubyte", nan_images())
    argv = ["lab", "ics", "--dataset", "mnist", "--data-dir", str(tmp_path)]
    status, stdout, stderr = run_cli([*argv, "--out", str(tmp_path / "out"), "--no-progress"])
    assert (status, stdout) == (1, "")
    assert stderr == (
        f"bnkit lab: mnist: {tmp_path / 'train-images-idx3-ubyte'}: expected finite values, "
        "got NaN or Inf\n"
    )


def test_unknown_dataset_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="'mnist1d', 'digits', 'fashion-mnist', 'mnist'"):
        load_dataset("cifar10")


def test_digits_split_is_fixed() -> None:
    first, second = load_dataset("digits"), load_dataset("digits")
    assert first.x_train.shape == (1438, 8, 8)
    assert first.x_test.shape == (359, 8, 8)
    assert torch.equal(first.y_test, second.y_test)
    assert torch.equal(first.x_train, second.x_train)
    assert abs(float(first.x_train.double().mean())) < 1e-5


@pytest.mark.slow
def test_mnist1d_is_generated_offline_cached_and_leaves_global_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # make_dataset seeds NumPy's legacy global generator; the loader must restore it.
    np.random.seed(7)  # noqa: NPY002 - the legacy global state is what is tested
    arrays = mnist1d_arrays(tmp_path)
    assert arrays["x"].shape == (4000, 40)
    assert arrays["x_test"].shape == (1000, 40)
    assert arrays["y"].shape == (4000,)
    assert sorted(np.unique(arrays["y"])) == list(range(10))
    expected = np.random.RandomState(7).random_sample()
    assert np.random.random_sample() == expected  # noqa: NPY002 - as if never touched
    cached = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(cached) == 1
    assert not list(tmp_path.glob("*.tmp*"))

    # A second call reads the cache: generating again would fail here.
    def no_generation(args: object) -> None:
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(datasets, "_generate_mnist1d", no_generation)
    again = mnist1d_arrays(tmp_path)
    np.testing.assert_array_equal(again["x"], arrays["x"])

    # A damaged cache file is regenerated (and rewritten) instead of failing.
    monkeypatch.undo()
    cached[0].write_bytes(b"not a zip file")
    repaired = mnist1d_arrays(tmp_path)
    np.testing.assert_array_equal(repaired["x_test"], arrays["x_test"])
    assert np.load(cached[0])["x"].shape == (4000, 40)

    # So is one that reads well but holds values the lab cannot train on.
    for key, value in (("x", np.nan), ("y", 2_000_000_000), ("y_test", -1)):
        damaged = {**arrays, key: arrays[key].astype(np.float64 if key == "x" else np.int64)}
        damaged[key][0] = value
        np.savez(cached[0], **damaged)
        repaired = mnist1d_arrays(tmp_path)
        np.testing.assert_array_equal(repaired[key], arrays[key])


@pytest.mark.slow
def test_mnist1d_dataset(tmp_path: Path) -> None:
    data = load_dataset("mnist1d", cache_dir=tmp_path)
    assert data.x_train.shape == (4000, 40)
    assert data.x_test.shape == (1000, 40)
    assert data.describe()["sample_shape"] == [40]
    assert abs(float(data.x_train.double().mean())) < 1e-5


@pytest.mark.slow
def test_unwritable_cache_still_gives_the_data(tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("a file where the cache directory should be")
    arrays = mnist1d_arrays(blocker / "cache")
    assert arrays["x"].shape == (4000, 40)
