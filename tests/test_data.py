"""pdepth.data: the IDX reader, the dataset table, subsets and normalisation (on IDX files
written here, and on the Debian package's Fashion-MNIST where it is installed)."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import torch
from data_helpers import write_idx as _write_idx

from pdepth import data

HAVE_FMNIST = os.path.exists(os.path.join(data.FASHION_MNIST_ROOT, "train-labels-idx1-ubyte.gz"))


@pytest.fixture
def fake_root(tmp_path):
    """A Fashion-MNIST folder with 12 training and 5 test images of known content."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 5)):
        images_name, labels_name = data._FILES[split]
        _write_idx(tmp_path / images_name, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / labels_name, np.arange(n) % 10)
    return tmp_path


def test_read_idx_round_trips_every_dtype(tmp_path):
    for code in data._IDX_DTYPES:
        array = np.arange(24).reshape(2, 3, 4) - (0 if code == 0x08 else 5)
        path = tmp_path / f"x{code}.idx"
        _write_idx(path, array, code)
        got = data._read_idx(str(path))
        assert got.shape == (2, 3, 4) and np.array_equal(got, array.astype(got.dtype))


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        data._read_idx(str(bad))
    short = tmp_path / "short.idx.gz"
    _write_idx(short, np.zeros((4, 3)))
    with gzip.open(short, "rb") as f:
        payload = f.read()
    with gzip.open(short, "wb") as f:
        f.write(payload[:-2])
    with pytest.raises(ValueError, match="holds 10 bytes"):
        data._read_idx(str(short))


def test_load_fashion_mnist_from_a_folder(fake_root):
    images, labels = data.load_fashion_mnist(str(fake_root), "test")
    assert images.dtype == torch.uint8 and images.shape == (5, 28, 28)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="split must be"):
        data.load_fashion_mnist(str(fake_root), "validation")


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.load_fashion_mnist(str(tmp_path))


def test_dataset_table_and_unknown_names():
    info = data.dataset_info("fashion-mnist")
    assert info.num_classes == len(info.classes) == 10
    assert info.root == data.FASHION_MNIST_ROOT
    with pytest.raises(ValueError, match="valid datasets: fashion-mnist"):
        data.dataset_info("cifar-11")


def test_load_subset_is_seeded_sorted_and_without_replacement(fake_root):
    x, y, index = data.load_subset(root=str(fake_root), subset=6, seed=3)
    x2, _, index2 = data.load_subset(root=str(fake_root), subset=6, seed=3)
    assert torch.equal(index, index2) and torch.equal(x, x2)
    assert index.tolist() == sorted(set(index.tolist())) and len(index) == 6
    full_x, full_y = data.load_fashion_mnist(str(fake_root))
    assert torch.equal(x, full_x[index]) and torch.equal(y, full_y[index])
    _, _, everything = data.load_subset(root=str(fake_root), subset=100)
    assert everything.tolist() == list(range(12))
    with pytest.raises(ValueError, match="at least 2"):
        data.load_subset(root=str(fake_root), subset=1)


def test_normalize_images_shape_dtype_and_values():
    images = torch.tensor([[[0, 255]]], dtype=torch.uint8)  # [1, 1, 2]
    x = data.normalize_images(images, mean=0.5, std=0.5)
    assert x.dtype == torch.float32 and x.shape == (1, 1, 1, 2)
    assert x.flatten().tolist() == [-1.0, 1.0]


@pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist is not installed")
def test_the_debian_package_loads_with_its_documented_shapes():
    images, labels = data.load_fashion_mnist(split="test")
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000,)
    assert sorted(labels.unique().tolist()) == list(range(10))
