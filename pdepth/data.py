"""Datasets: the table :data:`DATASETS` (name -> :class:`DatasetInfo`: default folder, class
names, normalisation, loader) and Fashion-MNIST from the Debian package
``dataset-fashion-mnist`` (IDX files, gzip), its one entry.

Nothing here touches the network: the files are read from ``root`` (default
``/usr/share/datasets/fashion-mnist``, where ``apt-get install dataset-fashion-mnist`` puts
them).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "DATASETS", "DatasetInfo", "FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN", "FASHION_MNIST_ROOT",
    "FASHION_MNIST_STD", "dataset_info", "load_fashion_mnist", "load_subset",
    "normalize_images",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# IDX type codes (third byte of the magic number) -> numpy dtype (big endian).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({count * dtype.itemsize} bytes) but the "
            f"file holds {len(data) - header} bytes of data"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(
    root: str = FASHION_MNIST_ROOT, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads Fashion-MNIST from IDX gzip files.

    Args:
        root: folder holding ``train-images-idx3-ubyte.gz`` etc.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).

    Returns:
        ``(images, labels)``: ``uint8 [n, 28, 28]`` and ``int64 [n]`` tensors.

    Raises:
        FileNotFoundError: naming the Debian package when the files are missing.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    paths = [os.path.join(root, name) for name in _FILES[split]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass root= a folder "
            "holding the IDX gzip files."
        )
    images = _read_idx(paths[0])
    labels = _read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST {split}: unexpected shapes images {images.shape}, labels {labels.shape}"
        )
    return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))


# Per-pixel statistics of the Fashion-MNIST training images (scaled to [0, 1]).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset: its default folder, class names, normalisation (per-pixel mean and std of
    the training images scaled to [0, 1]) and loader ``load(root, split) -> (images uint8,
    labels int64)``."""

    name: str
    root: str
    classes: tuple[str, ...]
    mean: float
    std: float
    load: Callable[[str, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# The dataset table: everything the protocol needs to know about a dataset, by name.
DATASETS = {
    "fashion-mnist": DatasetInfo("fashion-mnist", FASHION_MNIST_ROOT, FASHION_MNIST_CLASSES,
                                 FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist),
}


def dataset_info(dataset: str) -> DatasetInfo:
    """The table entry of ``dataset``; ValueError naming the valid ones for another name."""
    try:
        return DATASETS[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: "
                         f"{', '.join(DATASETS)}") from None


def normalize_images(images: torch.Tensor, mean: float = FASHION_MNIST_MEAN,
                     std: float = FASHION_MNIST_STD) -> torch.Tensor:
    """``uint8 [n, H, W]`` (or ``[n, C, H, W]``) -> float32 ``[n, C, H, W]``, standardised."""
    x = images.to(torch.float32).div_(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return x.sub_(mean).div_(std)


def load_subset(
    dataset: str = "fashion-mnist",
    root: str | None = None,
    subset: int | None = None,
    seed: int = 0,
    split: str = "train",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random subset of a dataset's split, without replacement, in a fixed order.

    Returns ``(images uint8 [n, 28, 28], labels int64 [n], dataset_index int64 [n])``, where
    ``dataset_index`` are the examples' indices in the full split (sorted ascending). ``subset``
    None (or >= the split size) takes the whole split.
    """
    info = dataset_info(dataset)
    images, labels = info.load(root or info.root, split)
    total = labels.shape[0]
    if subset is None or subset >= total:
        index = torch.arange(total)
    else:
        if subset < 2:
            raise ValueError(f"subset must be at least 2, got {subset}")
        gen = torch.Generator().manual_seed(int(seed))
        index = torch.randperm(total, generator=gen)[:subset].sort().values
    return images[index], labels[index], index
