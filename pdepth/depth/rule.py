"""The prediction-depth rule (docs/design.md section 1) and the reference modes."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["REFERENCE_MODES", "depth_from_predictions"]

#: The named references of ``prediction_depth(reference=...)`` (a tensor is accepted too).
REFERENCE_MODES = ("network", "labels", "last_probe")


def depth_from_predictions(layer_pred, reference):
    """The prediction-depth rule alone (docs/design.md section 1), vectorised.

    Args:
        layer_pred: ``[L, M]`` integer predictions of the L probes (input to output) for M
            examples (torch tensor or numpy array).
        reference: ``[M]`` integer reference labels (the network's prediction, labels, ...).

    Returns:
        ``[M]`` int64: for each example the smallest ``l`` in ``0..L`` such that
        ``layer_pred[j] == reference`` for every ``j >= l``. 0 means every probe agrees; L
        means the last probe disagrees. A numpy array when ``layer_pred`` is one, else a
        tensor on ``layer_pred``'s device.

    Raises:
        ValueError: ``layer_pred`` not 2-D, ``reference`` not 1-D, or their lengths differ.
    """
    as_numpy = isinstance(layer_pred, np.ndarray)
    lp = torch.as_tensor(layer_pred)
    ref = torch.as_tensor(reference, device=lp.device)
    if lp.dim() != 2:
        raise ValueError(f"layer_pred must be 2-D [L, M], got shape {tuple(lp.shape)}")
    if ref.dim() != 1:
        raise ValueError(f"reference must be 1-D [M], got shape {tuple(ref.shape)}")
    if lp.shape[1] != ref.shape[0]:
        raise ValueError(
            f"reference has {ref.shape[0]} entries but layer_pred has M={lp.shape[1]} "
            f"columns (shape {tuple(lp.shape)})"
        )
    num_layers = lp.shape[0]
    agree = (lp == ref.unsqueeze(0)).to(torch.int64)
    # Number of trailing probes (from the output backwards) that agree with the reference.
    trailing = agree.flip(0).cumprod(0).sum(0) if num_layers else torch.zeros_like(ref, dtype=torch.int64)
    depth = (num_layers - trailing).to(torch.int64)
    return depth.cpu().numpy() if as_numpy else depth
