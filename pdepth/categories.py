"""Difficulty categories from the two-dimensional view of prediction depth.

Baldock et al. (2021) plot each example's prediction depth when it is in the model's training
split against its depth when it is held out, and describe three groups of *difficult*
examples in this 2-D view: examples that **look like another class** (the held-out networks
confidently and early predict a different class -- low held-out depth -- while a network that
trains on the example must override what its early layers say -- high train-split depth),
**ambiguous** examples (high depth in both splits; networks do not agree on a class) and
**atypical** (rare) examples that a network only gets right by memorising them (high
held-out depth, no other class winning consistently in the early layers). Everything else is
**easy** (low depth in both splits).

The paper describes these groups qualitatively; :func:`categorize` makes them a partition
with explicit rules. With ``L`` the number of probes, ``d_tr`` / ``d_ho`` the mean
train-split / held-out depth, the rules are applied in this order, first match wins:

1. ``easy``: ``d_tr <= easy_depth * L`` and ``d_ho <= easy_depth * L`` and
   ``held_out_accuracy >= easy_accuracy``.
2. ``looks_like_other_class``: the held-out networks agree on a class other than the label
   (``held_out_accuracy <= wrong_accuracy``, ``held_out_agreement >= held_out_agreement``
   and
   ``held_out_mode != label``) and the early probes vote for that same class (the most
   frequent k-NN vote over the first ``ceil(early_fraction * L)`` probes of every model,
   ``early_mode``, equals ``held_out_mode`` with a share ``early_mode_share >= early_vote``).
3. ``ambiguous``: the held-out networks disagree with each other
   (``held_out_agreement < held_out_agreement``) and ``d_ho > easy_depth * L``, or
   ``ensemble_entropy >= ambiguous_entropy * ln(C)``.
4. ``atypical``: every other example (difficult, but the held-out networks agree with each
   other and no other class wins the early probes: typically correct only when trained on,
   or consistently wrong without early-layer support for the wrong class).

Examples with no held-out model (``held_out_count == 0``: every example of a ``--checkpoint``
run, which holds nothing out) get no category (a missing value): the categories rest on the
held-out view, which such an example lacks.

``held_out_agreement`` (column and threshold) was called ``consistency`` before; the old
threshold name is still accepted, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields

import numpy as np

__all__ = ["CATEGORIES", "CategoryThresholds", "categorize"]

#: The difficulty categories, in the order of the report (docs/protocol.md, "Difficulty categories").
CATEGORIES = ("easy", "ambiguous", "looks_like_other_class", "atypical")

_REQUIRED = ("label", "train_depth", "held_out_depth", "held_out_accuracy",
             "held_out_agreement", "held_out_mode", "early_mode", "early_mode_share")


@dataclass(frozen=True)
class CategoryThresholds:
    """Thresholds of :func:`categorize` (see the module docstring for the rules).

    Attributes:
        easy_depth: easy needs both mean depths ``<= easy_depth * L`` (fraction of probes).
        easy_accuracy: easy needs a held-out accuracy at least this.
        held_out_agreement: share of held-out models on their most frequent prediction
            needed to call them in agreement (formerly ``consistency``).
        wrong_accuracy: looks-like-other-class needs a held-out accuracy at most this.
        early_fraction: the early probes are the first ``ceil(early_fraction * L)``.
        early_vote: looks-like-other-class needs this share of the early probes' votes for
            the held-out networks' (wrong) class.
        ambiguous_entropy: an ensemble entropy of at least this fraction of ``ln(C)`` makes an
            example ambiguous.
    """

    easy_depth: float = 1.0 / 3.0
    easy_accuracy: float = 0.5
    held_out_agreement: float = 0.75
    wrong_accuracy: float = 0.25
    early_fraction: float = 0.5
    early_vote: float = 0.5
    ambiguous_entropy: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> CategoryThresholds:
        d = _renamed(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown category thresholds {sorted(unknown)}; valid: "
                             f"{sorted(known)}")
        return cls(**d)


def categorize(table, num_layers: int, thresholds: CategoryThresholds | None = None, *,
               num_classes: int | None = None, **overrides):
    """Difficulty category of every example (a pandas Categorical over :data:`CATEGORIES`).

    Args:
        table: a DataFrame (or dict of arrays) with the columns of
            :func:`pdepth.metrics.summarize`: ``label``, ``train_depth``, ``held_out_depth``,
            ``held_out_accuracy``, ``held_out_agreement``, ``held_out_mode``, ``early_mode``,
            ``early_mode_share`` and optionally ``ensemble_entropy``.
        num_layers: L, the number of probes (depths range over ``0..L``).
        thresholds: a :class:`CategoryThresholds` (default thresholds when None); keyword
            ``overrides`` replace single fields, e.g. ``categorize(df, 6, easy_depth=0.5)``.
        num_classes: C, for the entropy rule (default ``label.max() + 1``, at least 2).

    Returns:
        ``pandas.Categorical`` of length n (missing where no model held the example out).
        Rules and thresholds: module docstring and
        docs/protocol.md.

    Raises:
        ValueError: the table lacks a column the rules read (naming them).
    """
    import pandas as pd

    t = thresholds or CategoryThresholds()
    if overrides:
        t = CategoryThresholds.from_dict({**t.to_dict(), **_renamed(overrides)})
    missing = [c for c in _REQUIRED if c not in table]
    if missing:
        raise ValueError(f"categorize(): the table lacks columns {missing}")
    col = {c: np.asarray(table[c]) for c in _REQUIRED}
    label = col["label"].astype(np.int64)
    if num_classes is None:
        num_classes = max(2, int(label.max()) + 1 if label.size else 2)
    cut = t.easy_depth * num_layers
    d_tr = col["train_depth"].astype(np.float64)
    d_ho = col["held_out_depth"].astype(np.float64)
    acc = col["held_out_accuracy"].astype(np.float64)
    agreement = col["held_out_agreement"].astype(np.float64)
    has_ho = ~np.isnan(d_ho)

    easy = has_ho & (np.nan_to_num(d_tr, nan=0.0) <= cut) & (d_ho <= cut) & (
        acc >= t.easy_accuracy)
    agree = has_ho & (agreement >= t.held_out_agreement)
    looks_like = (agree & (acc <= t.wrong_accuracy) & (col["held_out_mode"] != label)
                  & (col["early_mode"] == col["held_out_mode"])
                  & (col["early_mode_share"].astype(np.float64) >= t.early_vote))
    ambiguous = has_ho & (agreement < t.held_out_agreement) & (d_ho > cut)
    if "ensemble_entropy" in table:
        ent = np.asarray(table["ensemble_entropy"], np.float64)
        ambiguous |= has_ho & (np.nan_to_num(ent, nan=0.0)
                               >= t.ambiguous_entropy * math.log(num_classes))
    out = np.full(label.shape[0], "atypical", dtype=object)
    out[ambiguous] = "ambiguous"
    out[looks_like] = "looks_like_other_class"
    out[easy] = "easy"
    out[~has_ho] = None  # no held-out view: no category
    return pd.Categorical(out, categories=list(CATEGORIES))


def _renamed(thresholds: dict) -> dict:
    """``thresholds`` with the old name ``consistency`` mapped to ``held_out_agreement``
    (DeprecationWarning)."""
    if "consistency" not in thresholds:
        return dict(thresholds)
    warnings.warn("the category threshold 'consistency' is now called 'held_out_agreement' "
                  "(it is not Jiang et al.'s consistency score, the C-score)",
                  DeprecationWarning, stacklevel=3)
    d = dict(thresholds)
    value = d.pop("consistency")
    if d.setdefault("held_out_agreement", value) != value:
        raise ValueError(f"category thresholds: 'consistency' (old name, {value!r}) and "
                         f"'held_out_agreement' ({d['held_out_agreement']!r}) disagree")
    return d
