"""Prediction depth over an ensemble: :func:`aggregate` and :class:`EnsembleDepth`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .result import DepthResult

__all__ = ["EnsembleDepth", "aggregate"]


@dataclass(eq=False)
class EnsembleDepth:
    """Effective prediction depth over an ensemble of R models and n dataset examples.

    Attributes:
        per_model: ``[R, n]`` float64 depth of example i under model r (NaN: not scored).
        in_train: ``[R, n]`` bool, example i was in model r's training split.
        held_out: ``[R, n]`` bool, example i was scored by model r while held out from it.
        train_mean, train_std: ``[n]`` float64 mean and standard deviation (``ddof``) of the
            depth over the models that trained on the example (NaN where none did, or where
            the count is ``<= ddof``).
        train_count: ``[n]`` int64 number of such models.
        held_out_mean, held_out_std, held_out_count: the same over the models that held the
            example out.
        ddof: delta degrees of freedom of the standard deviations.
    """

    per_model: torch.Tensor
    in_train: torch.Tensor
    held_out: torch.Tensor
    train_mean: torch.Tensor
    train_std: torch.Tensor
    train_count: torch.Tensor
    held_out_mean: torch.Tensor
    held_out_std: torch.Tensor
    held_out_count: torch.Tensor
    ddof: int = 0

    @property
    def num_models(self) -> int:
        return int(self.per_model.shape[0])

    def to_pandas(self, per_model: bool = False):
        """One row per example with the mean / std / count per split; with
        ``per_model=True`` also ``depth_<r>`` and ``train_<r>`` columns per model."""
        import pandas as pd

        cols = {
            "train_mean": self.train_mean.numpy(),
            "train_std": self.train_std.numpy(),
            "train_count": self.train_count.numpy(),
            "held_out_mean": self.held_out_mean.numpy(),
            "held_out_std": self.held_out_std.numpy(),
            "held_out_count": self.held_out_count.numpy(),
        }
        if per_model:
            for r in range(self.num_models):
                cols[f"depth_{r}"] = self.per_model[r].numpy()
                cols[f"train_{r}"] = self.in_train[r].numpy()
        df = pd.DataFrame(cols)
        df.index.name = "example_index"
        df.attrs["num_models"] = self.num_models
        df.attrs["ddof"] = self.ddof
        return df


def _as_index_set(x, n: int | None, what: str) -> torch.Tensor:
    """A boolean mask [n] from a mask or from integer indices."""
    t = torch.as_tensor(x)
    if t.dim() != 1:
        raise ValueError(f"{what} must be 1-D (a boolean mask or integer indices), got shape "
                         f"{tuple(t.shape)}")
    if t.dtype == torch.bool:
        if n is not None and t.shape[0] != n:
            raise ValueError(f"{what} is a mask of length {t.shape[0]}, expected n={n}")
        return t.cpu()
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"{what} must be a boolean mask or integer indices, got {t.dtype}")
    t = t.long().cpu()
    if t.numel() and (int(t.min()) < 0 or (n is not None and int(t.max()) >= n)):
        raise ValueError(f"{what} holds indices outside [0, n={n})")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[t] = True
    return mask


def _model_depths(result, n: int | None, r: int) -> torch.Tensor:
    """[n] float64 depths of one model over the dataset index space, NaN where not scored."""
    if isinstance(result, DepthResult):
        depth = result.depth.to(torch.float64)
        index = result.example_index
        if index is None:
            if n is not None and depth.shape[0] != n:
                raise ValueError(
                    f"results[{r}] is a DepthResult over {depth.shape[0]} examples without "
                    f"example_index; give example_index, or score all n={n} examples"
                )
            return depth
        out = torch.full((n,), float("nan"), dtype=torch.float64)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise ValueError(f"results[{r}].example_index holds indices outside [0, n={n})")
        out[index.long()] = depth
        return out
    t = torch.as_tensor(result)
    if t.dim() != 1:
        raise ValueError(f"results[{r}] must be a DepthResult or a 1-D [n] depth array, got "
                         f"shape {tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"results[{r}] has {t.shape[0]} entries, expected n={n}")
    t = t.to(torch.float64).cpu()
    return torch.where(t < 0, torch.full_like(t, float("nan")), t)  # -1 / NaN: not scored


def _infer_n(results, split_masks) -> int:
    for res in results:
        if isinstance(res, DepthResult) and res.example_index is None:
            return res.num_examples
        if not isinstance(res, DepthResult):
            return int(torch.as_tensor(res).shape[0])
    for split in split_masks:
        for part in (split.values() if isinstance(split, Mapping) else [split]):
            t = torch.as_tensor(part)
            if t.dtype == torch.bool:
                return int(t.shape[0])
    top = -1
    for res in results:
        if res.example_index is not None and res.example_index.numel():
            top = max(top, int(res.example_index.max()))
    for split in split_masks:
        for part in (split.values() if isinstance(split, Mapping) else [split]):
            t = torch.as_tensor(part)
            if t.numel():
                top = max(top, int(t.max()))
    return top + 1


def _stats(values: torch.Tensor, mask: torch.Tensor, ddof: int):
    count = mask.sum(0)
    v = torch.where(mask, values, torch.zeros_like(values))
    mean = v.sum(0) / count
    dev = torch.where(mask, values - mean, torch.zeros_like(values))
    var = dev.pow(2).sum(0) / (count - ddof)
    nan = torch.full_like(mean, float("nan"))
    mean = torch.where(count > 0, mean, nan)
    std = torch.where(count > ddof, var.sqrt(), nan)
    return mean, std, count.to(torch.int64)


def _split(split, n: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held_out)`` boolean ``[n]`` masks of ``split_masks[r]``."""
    if not isinstance(split, Mapping):
        train = _as_index_set(split, n, f"split_masks[{r}]")
        return train, ~train
    unknown = set(split) - {"train", "held_out"}
    if unknown or "train" not in split:
        raise ValueError(
            f"split_masks[{r}] must have a 'train' key and optionally 'held_out', got "
            f"keys {sorted(split)}"
        )
    train = _as_index_set(split["train"], n, f"split_masks[{r}]['train']")
    if split.get("held_out") is None:
        return train, ~train
    out = _as_index_set(split["held_out"], n, f"split_masks[{r}]['held_out']")
    if (train & out).any():
        raise ValueError(
            f"split_masks[{r}]: {int((train & out).sum())} examples are in both "
            "'train' and 'held_out'"
        )
    return train, out


def aggregate(
    results: Sequence,
    split_masks: Sequence,
    *,
    num_examples: int | None = None,
    ddof: int = 0,
) -> EnsembleDepth:
    """Effective prediction depth of an ensemble: per-example mean depth per split.

    Model r scores some examples of a dataset of n examples (its training split, the held-out
    examples, or both); its depths are split by whether the example was in its training split.

    Args:
        results: R per-model results, each either

            * a :class:`DepthResult` with ``example_index`` ``[M_r]`` (the dataset indices of
              its queries; without it, M_r must equal n and the order is the dataset's), or
            * a 1-D ``[n]`` depth array over the dataset, with NaN or a negative value for
              examples the model did not score.

            A model that scored its training split and its held-out split in two calls can be
            given as two entries with the same split mask, or merged beforehand.
        split_masks: R entries (one per result, same order), each either a boolean ``[n]``
            mask or an integer index array of the examples in that model's training split, or
            a dict ``{"train": mask_or_indices, "held_out": mask_or_indices}`` (``held_out``
            defaults to every scored example outside ``train``).
        num_examples: n; inferred from the masks / arrays / indices when not given.
        ddof: delta degrees of freedom for the standard deviations (0: population std, so a
            single model gives 0).

    Returns:
        :class:`EnsembleDepth` with ``per_model [R, n]``, ``in_train [R, n]``,
        ``held_out [R, n]`` and per-example ``train_mean / train_std / train_count`` and
        ``held_out_mean / held_out_std / held_out_count`` (``[n]`` each).

    Raises:
        ValueError: no results, not one split mask per result, a result or mask whose
            length or example indices do not fit ``n`` (naming ``results[r]``), or
            DepthResults of different ``metric``.
    """
    results = list(results)
    split_masks = list(split_masks)
    if len(results) != len(split_masks):
        raise ValueError(
            f"aggregate(): {len(results)} results but {len(split_masks)} split masks; give one "
            "split mask per model"
        )
    if not results:
        raise ValueError("aggregate(): no results given")
    metrics = sorted({res.metric for res in results if isinstance(res, DepthResult)})
    if len(metrics) > 1:
        raise ValueError(f"aggregate(): the results come from different k-NN metrics "
                         f"{metrics}; an ensemble's depths are averaged over one metric")
    n = int(num_examples) if num_examples is not None else _infer_n(results, split_masks)
    per_model, in_train, held_out = [], [], []
    for r, (res, split) in enumerate(zip(results, split_masks, strict=True)):
        depth = _model_depths(res, n, r)
        scored = ~depth.isnan()
        train, out = _split(split, n, r)
        per_model.append(depth)
        in_train.append(train)
        held_out.append(out & scored)
    values = torch.stack(per_model)
    train_mask = torch.stack(in_train)
    out_mask = torch.stack(held_out)
    train_scored = train_mask & ~values.isnan()
    train_mean, train_std, train_count = _stats(values, train_scored, ddof)
    out_mean, out_std, out_count = _stats(values, out_mask, ddof)
    return EnsembleDepth(
        per_model=values,
        in_train=train_mask,
        held_out=out_mask,
        train_mean=train_mean,
        train_std=train_std,
        train_count=train_count,
        held_out_mean=out_mean,
        held_out_std=out_std,
        held_out_count=out_count,
        ddof=ddof,
    )
