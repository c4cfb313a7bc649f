"""Tiny datasets written in each dataset's real on-disk format, for the loaders' tests (no
network): IDX (MNIST, Fashion-MNIST), CIFAR-10/100's pickled batches, SVHN's .mat and an
ImageFolder tree of PNGs. Each writer returns what it wrote: ``{split: (images uint8
[n, H, W] or [n, H, W, C], labels int64 [n])}``."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np

from pdepth import data

SIZES = {"train": 24, "test": 8}  # images per split


def write_idx(path, array: np.ndarray, code: int = 0x08) -> None:
    """An IDX file (gzip when the name ends in .gz) holding ``array``."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape
    )
    payload = header + array.astype(np.dtype(data._IDX_DTYPES[code])).tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(payload)


def _images(split: str, shape: tuple[int, ...], num_classes: int, seed: int):
    rng = np.random.default_rng(seed + (split == "test"))
    n = SIZES[split]
    return (rng.integers(0, 256, (n, *shape), dtype=np.uint8),
            (np.arange(n) * 7 % num_classes).astype(np.int64))


def write_mnist(root: Path) -> dict:
    """``root/MNIST/raw/*-ubyte`` as torchvision's MNIST reads them (uncompressed IDX)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = out[split] = _images(split, (28, 28), 10, 1)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return out


def write_cifar(root: Path, num_classes: int) -> dict:
    """CIFAR-10's ``cifar-10-batches-py`` (five training batches, ``test_batch``,
    ``batches.meta``) or CIFAR-100's ``cifar-100-python`` (``train``, ``test``, ``meta``):
    pickled dicts with ``data`` uint8 ``[n, 3072]`` (the red plane, then green, then blue)."""
    ten = num_classes == 10
    folder = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    folder.mkdir(parents=True)
    label_key = "labels" if ten else "fine_labels"
    out = {}
    for split in SIZES:
        images, labels = out[split] = _images(split, (32, 32, 3), num_classes, 2)
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        names = ([f"data_batch_{i}" for i in range(1, 6)] if ten else ["train"]) \
            if split == "train" else (["test_batch"] if ten else ["test"])
        for part, name in zip(np.array_split(np.arange(len(images)), len(names)), names,
                              strict=True):
            with open(folder / name, "wb") as f:
                pickle.dump({"data": rows[part], label_key: labels[part].tolist()}, f)
    meta = ({"label_names": list(data.DATASETS["cifar10"].classes)} if ten else
            {"fine_label_names": list(data.DATASETS["cifar100"].classes)})
    with open(folder / ("batches.meta" if ten else "meta"), "wb") as f:
        pickle.dump(meta, f)
    return out


def write_svhn(root: Path) -> dict:
    """``train_32x32.mat`` / ``test_32x32.mat``: ``X`` uint8 ``[32, 32, 3, n]``, ``y``
    ``[n, 1]`` with the digit 0 stored as 10."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in SIZES:
        images, labels = out[split] = _images(split, (32, 32, 3), 10, 3)
        savemat(root / f"{split}_32x32.mat",
                {"X": images.transpose(1, 2, 3, 0),
                 "y": np.where(labels == 0, 10, labels).reshape(-1, 1).astype(np.uint8)})
    return out


def write_image_folder(root: Path, classes=("cat", "dog", "emu"), size: int = 20) -> dict:
    """``root/train/<class>/<i>.png`` and ``root/test/<class>/<i>.png`` (RGB PNGs of
    ``size`` x ``size``; the test images grey, which the loader converts to RGB), returned in
    ImageFolder's order (by class folder, then file name)."""
    from PIL import Image

    out = {}
    for split in SIZES:
        images, labels = _images(split, (size, size, 3), len(classes), 4)
        for i, (im, y) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / classes[y]
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(im if split == "train" else im[..., 0]).save(folder / f"{i:03d}.png")
        order = np.argsort(labels, kind="stable")
        out[split] = images[order], labels[order]
    return out
