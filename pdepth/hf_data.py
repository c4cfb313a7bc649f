"""Hugging Face ``datasets`` folders as ``pdepth score`` data (``--dataset hf:DIR``): a folder
written by ``DatasetDict.save_to_disk`` with a ``train`` and a ``test`` split, each holding an
image column and an integer label column (``--image-column`` / ``--label-column``, default
``image`` / ``label``). Read with ``datasets.load_from_disk``: nothing is downloaded."""

from __future__ import annotations

import os

import numpy as np
import torch

from .data import subset_index

__all__ = ["HF_DATA_PREFIX", "load_hf_split"]

HF_DATA_PREFIX = "hf:"


def load_hf_split(folder: str, split: str, *, image_column: str = "image",
                  label_column: str = "label", subset: int | None = None, seed: int = 0):
    """``(images uint8 [n, H, W] or [n, H, W, 3], labels int64 [n], index int64 [n],
    classes)`` of one split: a seeded random ``subset`` (sorted indices; None: every row),
    its images decoded (PIL images, grey or RGB, others converted to RGB; or arrays), all of
    one size. ``classes`` are the label column's ``ClassLabel`` names, else ``"0"``, ``"1"``...

    Raises FileNotFoundError (no such folder), ValueError (not a saved DatasetDict, no such
    split, a missing column, naming the columns it has; labels that are not class ids;
    images of several sizes)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--dataset hf:{folder}: no such folder")
    import datasets

    try:
        data = datasets.load_from_disk(folder)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"--dataset hf:{folder} is not a folder written by save_to_disk "
                         f"({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(data, datasets.DatasetDict) or split not in data:
        have = list(data) if isinstance(data, datasets.DatasetDict) else "one unnamed split"
        raise ValueError(f"--dataset hf:{folder} has no {split!r} split (it has {have}); "
                         "pdepth score needs a DatasetDict with train and test splits")
    ds = data[split]
    for flag, column in (("--image-column", image_column), ("--label-column", label_column)):
        if column not in ds.column_names:
            raise ValueError(f"--dataset hf:{folder}: its {split} split has no column "
                             f"{column!r} ({flag}); its columns: {', '.join(ds.column_names)}")
    index = subset_index(len(ds), subset, seed)
    rows = ds.select(index.tolist())
    labels = torch.as_tensor(np.asarray(rows[label_column]))
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
        raise ValueError(f"--label-column {label_column}: labels must be integer class ids, "
                         f"got {labels.dtype} of shape {list(labels.shape)}")
    images = _decode([row[image_column] for row in rows], folder, image_column)
    feature = ds.features[label_column]
    names = getattr(feature, "names", None)
    count = int(labels.max()) + 1 if labels.numel() else 0
    classes = tuple(names) if names else tuple(str(i) for i in range(count))
    return images, labels.to(torch.int64), index, classes


def _decode(items, folder: str, column: str) -> torch.Tensor:
    """uint8 ``[n, H, W]`` (all grey) or ``[n, H, W, 3]`` of PIL images or arrays."""
    arrays = []
    rgb = any(getattr(im, "mode", "L") != "L" or np.asarray(im).ndim == 3 for im in items)
    for im in items:
        if hasattr(im, "convert"):
            a = np.asarray(im.convert("RGB" if rgb else "L"))
        else:
            a = np.asarray(im)
            if rgb and a.ndim == 2:
                a = np.repeat(a[..., None], 3, axis=2)
        arrays.append(a.astype(np.uint8) if a.dtype != np.uint8 else a)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"--dataset hf:{folder}: the images of --image-column {column} have "
                         f"several sizes {sorted(shapes)[:3]}; pdepth score needs one size")
    if not arrays:
        return torch.zeros((0, 1, 1), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays))
