"""``summary.json``: the paper's claims, each as one number computed on the run's own results.

:func:`claims_summary` reads only the per-example table (``results.parquet``) and the stacked
per-model arrays (``per_model.npz``), so anyone can recompute it from a finished run. Every
entry of ``claims`` holds:

* ``claim`` -- what Baldock et al. (2021) report, in a sentence;
* ``statistic`` / ``value`` -- what is measured and its value (a Spearman rank correlation
  for the "depth relates to X" claims; a difference of accuracies for the layer claims);
* ``computed_on`` -- which split, columns and labels it uses;
* ``n_examples`` / ``n_models`` -- what it rests on;
* ``paper_direction`` -- ``"positive"`` or ``"negative"``: the sign the paper reports;
* ``holds`` -- the value has that sign (``None`` where it cannot be computed, e.g. the
  flipped-label entry of a run without label noise); some entries add per-probe lists.

``score_correlations`` (the Spearman matrix of the difficulty scores over the examples) and
``score_reliability`` (per score, the Spearman correlation between the score computed from
two disjoint halves of the seeds, and its Spearman-Brown estimate for all seeds) compare
prediction depth with the field's scores (docs/scores.md).

``label_errors`` compares the ``label_error`` flags (:mod:`pdepth.label_errors`) with the
flips of ``--label-noise`` where there are flips: counts, precision, recall and F1.
Rules: docs/design.md section 11.
"""

from __future__ import annotations

import math

import numpy as np

from .categories import CATEGORIES
from .metrics import CONVERGED, VOTE_SHARES, convergence_epoch, early_probes, json_floats

__all__ = ["SCORE_COLUMNS", "claims_summary", "score_correlations", "score_reliability",
           "spearman"]

# the difficulty scores compared (results.parquet columns) and whether a higher value means
# a harder example (pdepth.scores.SCORES and docs/scores.md say why)
SCORE_COLUMNS = {
    "held_out_depth": True, "train_depth": True, "held_out_accuracy": False, "margin": False,
    "iteration_learned": True, "el2n": True, "forgetting_events": True,
    "first_learned": True, "aum": False, "data_map_confidence": False,
    "data_map_variability": True, "train_loss": True, "held_out_loss": True,
}


def spearman(x, y) -> tuple[float, int]:
    """Spearman rank correlation of ``x [n]`` and ``y [n]`` over the pairs where both are
    finite (average ranks for ties), and the number of those pairs. NaN when fewer than 3
    pairs or either side is constant."""
    import pandas as pd

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    rx, ry = pd.Series(x[ok]).rank().to_numpy(), pd.Series(y[ok]).rank().to_numpy()
    if n < 3 or rx.std() == 0 or ry.std() == 0:
        return float("nan"), n
    return float(np.corrcoef(rx, ry)[0, 1]), n


# (id, claim, x column, y column, paper direction, what it is computed on)
_CORRELATIONS = (
    ("depth_vs_accuracy", "Examples of higher prediction depth are classified less accurately "
     "when held out.", "held_out_depth", "held_out_accuracy_original", "negative",
     "held-out split: mean depth vs the fraction of held-out models predicting the original "
     "label (is the network right)"),
    ("depth_vs_confidence", "Higher depth, lower confidence.", "held_out_depth", "confidence",
     "negative", "held-out split: mean depth vs mean softmax probability of the predicted "
                 "class"),
    ("depth_vs_margin", "Higher depth, smaller margin.", "held_out_depth", "margin",
     "negative", "held-out split: mean depth vs mean (probability of the given label minus "
                 "the largest other)"),
    ("depth_vs_uncertainty", "Higher depth, more uncertain ensemble predictions.",
     "held_out_depth", "ensemble_entropy", "positive",
     "held-out split: mean depth vs entropy of the held-out models' mean softmax"),
    ("depth_vs_agreement", "Higher depth, less agreement between held-out networks.",
     "held_out_depth", "held_out_agreement", "negative",
     "held-out split: mean depth vs the share of held-out models on their most frequent "
     "prediction (label-free)"),
    ("depth_vs_speed_of_learning", "Examples of higher depth are learned later in training.",
     "train_depth", "iteration_learned", "positive",
     "training split: mean depth vs mean epoch after which the prediction no longer changes"),
    ("learns_easy_data_first", "Networks learn easy (shallow) data first.", "held_out_depth",
     "iteration_learned", "positive",
     "held-out depth (difficulty without training on the example) vs the training split's "
     "iteration learned"),
)


def claims_summary(table, per_model: dict, *, early_fraction: float = 0.5) -> dict:
    """The content of ``summary.json`` (see the module docstring).

    Args:
        table: the per-example DataFrame of ``results.parquet``.
        per_model: the arrays of ``per_model.npz``; uses ``in_train [R, n]``,
            ``layer_pred [R, L, n]``, ``labels [n]`` (given) and ``original_labels [n]``
            (default: ``labels``).
        early_fraction: the early probes of the flipped-label entry are the first
            ``ceil(early_fraction * L)``.
    """
    in_train = np.asarray(per_model["in_train"], bool)
    r_models = in_train.shape[0]
    claims = {}
    for key, claim, x, y, direction, on in _CORRELATIONS:
        value, n = spearman(table[x], table[y])
        claims[key] = _entry(claim, f"Spearman({x}, {y})", value, on, n, r_models, direction)
    claims["early_layers_generalise"] = _layer_gap(per_model)
    claims["flipped_labels_memorised_late"] = _flipped_layers(per_model, early_fraction)
    claims["groups_processed_differently"] = _groups(table, per_model, early_fraction)
    claims["early_layers_converge_faster"] = _convergence(per_model)
    return {"n_examples": int(len(table)), "n_models": r_models,
            "num_layers": int(np.asarray(per_model["layer_pred"]).shape[1]),
            "claims": claims, "label_errors": _label_errors(table),
            "score_correlations": score_correlations(table),
            "score_reliability": score_reliability(per_model, early_fraction=early_fraction)}


def score_correlations(table) -> dict:
    """The Spearman correlation (:func:`spearman`, pairwise over the examples where both are
    finite) of every two columns of :data:`SCORE_COLUMNS` the table has: ``{"scores":
    [names], "higher_is_harder": [bools], "matrix": [[r or None]], "n_examples": [[n]]}``."""
    names = [c for c in SCORE_COLUMNS if c in table]
    pairs = [[spearman(table[a], table[b]) for b in names] for a in names]
    return {"scores": names, "higher_is_harder": [SCORE_COLUMNS[c] for c in names],
            "matrix": [[_finite(r) for r, _ in row] for row in pairs],
            "n_examples": [[n for _, n in row] for row in pairs],
            "computed_on": "every example; Spearman over the examples where both scores are "
                           "finite (average ranks for ties)"}


def score_reliability(per_model: dict, *, early_fraction: float = 0.5) -> dict:
    """How stable each score of :data:`SCORE_COLUMNS` is across training seeds: the seeds
    (sorted) are split into two disjoint halves, those at even and at odd positions (each
    seed trains both halves of the data, so each half of the seeds scores every example from
    training and held-out models); every score is recomputed from each half's models
    (:func:`pdepth.metrics.summarize`, :func:`pdepth.scores.score_columns`) and
    ``split_half`` is the Spearman correlation of the two over the examples;
    ``spearman_brown`` = 2 r / (1 + r) estimates the correlation of the score from all seeds
    with its value from as many new seeds. With one seed every value is None and ``reason``
    says why."""
    seeds = np.asarray(per_model.get("seeds", np.zeros(0)))
    unique = sorted({int(s) for s in seeds})
    out = {"seeds_a": unique[0::2], "seeds_b": unique[1::2], "scores": None, "reason": None,
           "computed_on": "per score: Spearman over the examples between the score from the "
                          "models of seeds_a and from those of seeds_b; Spearman-Brown "
                          "2r/(1+r) for all seeds"}
    if len(unique) < 2:
        out["reason"] = (f"the run has {len(unique)} seed{'s' if len(unique) != 1 else ''}: "
                         "two disjoint halves of the seeds need at least 2")
        return out
    halves = [_score_table(per_model, np.isin(seeds, part), early_fraction)
              for part in (out["seeds_a"], out["seeds_b"])]
    out["scores"] = {}
    for name in SCORE_COLUMNS:
        if name not in halves[0]:
            continue
        r, n = spearman(halves[0][name], halves[1][name])
        brown = 2 * r / (1 + r) if math.isfinite(r) and r > -1 else float("nan")
        out["scores"][name] = {"split_half": _finite(r), "spearman_brown": _finite(brown),
                               "n_examples": n}
    return out


def _score_table(per_model: dict, models: np.ndarray, early_fraction: float) -> dict:
    """The score columns (:data:`SCORE_COLUMNS`) from the models ``models [R]`` (bool) only;
    the scores of :mod:`pdepth.scores` only where the run recorded their per-epoch arrays."""
    from .metrics import summarize
    from .scores import default_el2n_epoch, score_columns

    pick = {name: np.asarray(per_model[name])[models]
            for name in ("depth", "in_train", "probs", "layer_pred", "epoch_pred")}
    table = summarize(pick["depth"], pick["in_train"], pick["probs"], pick["layer_pred"],
                      pick["epoch_pred"], per_model["labels"], early_fraction=early_fraction)
    cols = {name: table[name].to_numpy() for name in SCORE_COLUMNS if name in table}
    epoch_arrays = ("epoch_label_prob", "epoch_margin", "epoch_el2n")
    if all(name in per_model for name in epoch_arrays):
        chosen = int(per_model.get("el2n_epoch", -1))
        el2n_epoch = (chosen if chosen >= 0
                      else default_el2n_epoch(pick["epoch_pred"].shape[1] - 1))
        cols.update(score_columns(
            {**pick, **{name: np.asarray(per_model[name])[models] for name in epoch_arrays},
             "labels": per_model["labels"]}, el2n_epoch))
    return cols


def _entry(claim, statistic, value, computed_on, n_examples, n_models, direction,
           **extra) -> dict:
    """One claim's entry; ``holds`` is whether ``value`` has the paper's sign."""
    ok = value is not None and math.isfinite(value)
    sign = 1.0 if direction == "positive" else -1.0
    return {"claim": claim, "statistic": statistic, "value": float(value) if ok else None,
            "computed_on": computed_on, "n_examples": int(n_examples),
            "n_models": int(n_models), "paper_direction": direction,
            "holds": bool(sign * value > 0) if ok else None, **extra}


def _probe_accuracy(layer_pred, labels, mask) -> np.ndarray:
    """``[L]``: share of (model, example) pairs in ``mask [R, n]`` whose probe vote is
    ``labels [n]`` (NaN where none)."""
    hit = (np.asarray(layer_pred) == np.asarray(labels)[None, None, :]) & mask[:, None, :]
    count = mask.sum()
    return hit.sum((0, 2)) / count if count else np.full(layer_pred.shape[1], np.nan)


def _layer_gap(per_model: dict) -> dict:
    """Early layers generalise, later layers memorise: train minus held-out k-NN accuracy
    (against the given labels) per probe; the statistic is its growth from the first probe to
    the last."""
    lp, in_train = np.asarray(per_model["layer_pred"]), np.asarray(per_model["in_train"], bool)
    y = np.asarray(per_model["labels"])
    train, held = _probe_accuracy(lp, y, in_train), _probe_accuracy(lp, y, ~in_train)
    gap = train - held
    return _entry(
        "Early layers generalise (their k-NN is as accurate on held-out examples as on the "
        "training split), later layers memorise (the training split becomes more accurate).",
        "gap[last probe] - gap[first probe], gap = train - held-out k-NN accuracy",
        float(gap[-1] - gap[0]),
        "every (model, example) pair: per probe, k-NN vote == given label, training split vs "
        "held out", in_train.shape[1], in_train.shape[0], "positive",
        knn_accuracy_train=json_floats(train), knn_accuracy_held_out=json_floats(held))


def _flipped_layers(per_model: dict, early_fraction: float) -> dict:
    """The label-noise experiment: on examples whose label was flipped, per probe, the share
    of k-NN votes for the flipped (given) and for the original label, training split and held
    out. Holds when the training split's votes for the flipped label grow from the early probes
    to the last, and the early probes vote the original label more often than the flipped one."""
    lp, in_train = np.asarray(per_model["layer_pred"]), np.asarray(per_model["in_train"], bool)
    y = np.asarray(per_model["labels"])
    orig = np.asarray(per_model.get("original_labels", y))
    flipped = y != orig
    claim = ("Later layers memorise: on the training split, the early probes vote the original "
             "class of a flipped example, the last probes its flipped label.")
    stat = "train share voting the flipped label: last probe - mean of the early probes"
    on = ("examples whose label was flipped (--label-noise), every (model, example) pair; "
          "per probe, k-NN vote == flipped label / == original label")
    if not flipped.any():
        return _entry(claim, stat, None, on + "; this run flipped no label", 0,
                      in_train.shape[0], "positive")
    mask = lambda m: m & flipped[None, :]  # noqa: E731
    acc = {f"{split}_{which}": _probe_accuracy(lp, labels, mask(m))
           for split, m in (("train", in_train), ("held_out", ~in_train))
           for which, labels in (("given", y), ("original", orig))}
    n_early = early_probes(lp.shape[1], early_fraction)
    tg, to = acc["train_given"], acc["train_original"]
    value = float(tg[-1] - tg[:n_early].mean())
    entry = _entry(claim, stat, value, on, int(flipped.sum()), in_train.shape[0], "positive",
                   knn_accuracy_flipped={k: json_floats(v) for k, v in acc.items()},
                   early_probes=n_early)
    entry["holds"] = bool(value > 0 and to[:n_early].mean() > tg[:n_early].mean())
    return entry


def _groups(table, per_model: dict, early_fraction: float) -> dict:
    """The difficulty categories are processed differently: per category, split and probe, the
    mean share of the k-NN votes for the given label, the network's prediction and the most
    frequent other class (``knn_vote_share``, :func:`pdepth.metrics.vote_shares`). The
    statistic: on the training split, the early probes' mean share of votes for the given
    label, ``easy`` minus ``looks_like_other_class`` (holds when positive: even a network
    that trains on a look-alike gets little support for its label from its early layers)."""
    claim = ("The groups of difficult examples are processed differently: the early layers of "
             "a network give the label of an example that looks like another class little "
             "support, even when it trains on it, unlike an easy example's.")
    stat = ("train split, early probes: mean share of k-NN votes for the given label, easy "
            "minus looks_like_other_class")
    on = ("every (model, example) pair per split and category; shares of the k-NN votes for "
          "the given label / the network's prediction / the most frequent other class")
    in_train = np.asarray(per_model["in_train"], bool)
    if "knn_vote_share" not in per_model:
        return _entry(claim, stat, None, on + "; this run has no knn_vote_share", 0,
                      in_train.shape[0], "positive")
    share = np.asarray(per_model["knn_vote_share"], np.float64)  # [R, L, n, 3]
    scored = np.asarray(per_model["depth"]) >= 0
    category = np.asarray(table["category"].astype(str))
    means = {c: {split: _mean_share(share, m & (category == c)[None])
                 for split, m in (("train", in_train & scored),
                                  ("held_out", ~in_train & scored))}
             for c in CATEGORIES}
    n_early = early_probes(share.shape[1], early_fraction)
    early = {c: float(np.mean(means[c]["train"][:n_early, 0]))
             for c in ("looks_like_other_class", "easy")}
    value = _finite(early["easy"] - early["looks_like_other_class"])
    # JSON has no NaN: a category with no example (e.g. none in a --checkpoint run) is null
    shares = {c: {split: [json_floats(row) for row in m] for split, m in means[c].items()}
              for c in CATEGORIES}
    counts = {c: int((category == c).sum()) for c in CATEGORIES}
    return _entry(claim, stat, value, on, counts["looks_like_other_class"] + counts["easy"],
                  in_train.shape[0], "positive", vote_share=shares,
                  vote_share_order=list(VOTE_SHARES), category_examples=counts,
                  early_probes=n_early)


def _mean_share(share: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[L, 3]`` mean of ``share [R, L, n, 3]`` over the (model, example) pairs in ``mask
    [R, n]`` (NaN where none)."""
    count = mask.sum()
    if not count:
        return np.full(share.shape[1::2], np.nan)
    return (share * mask[:, None, :, None]).sum((0, 2)) / count


def _convergence(per_model: dict) -> dict:
    """Early layers converge faster: the epoch at which each probe's k-NN accuracy on a fixed
    sample of the training split (mean curve over the models) has made 95% of its gain
    (:func:`pdepth.metrics.convergence_epoch`); the statistic is the Spearman correlation of
    the probe index with that epoch."""
    from .protocol.convergence import PROBE_CURVE_SAMPLE  # (the protocol imports this module)

    claim = "Early layers converge faster: their k-NN accuracy reaches its final value earlier."
    stat = f"Spearman(probe index, epoch reaching {CONVERGED:.0%} of the accuracy gain)"
    on = (f"per model, a fixed sample of up to {PROBE_CURVE_SAMPLE} examples of its training "
          "split, "
          "leave-one-out k-NN against the given labels at initialisation and after every "
          "epoch; the mean curve over the models")
    r_models = np.asarray(per_model["in_train"]).shape[0]
    curves = np.asarray(per_model.get("probe_accuracy_epochs", np.zeros((0, 0, 0))),
                        np.float64)  # [R, E+1, L]
    if curves.ndim != 3 or curves.shape[1] < 2:  # older runs; a checkpoint trains no epoch
        return _entry(claim, stat, None, on + "; this run has no per-epoch probe accuracy "
                      "(no training epoch, or a run of an older version)", 0, r_models,
                      "positive")
    mean = curves.mean(0)
    epochs = convergence_epoch(mean)
    value, _ = spearman(np.arange(mean.shape[1]), epochs)
    sample = int(min(PROBE_CURVE_SAMPLE, np.asarray(per_model["in_train"]).sum(1).min()))
    return _entry(claim, stat, value, on, sample, r_models, "positive",
                  convergence_epoch=epochs.tolist(), probe_accuracy_epochs=mean.tolist())


def _label_errors(table) -> dict:
    """The ``label_error`` flags against the ``label_flipped`` column: counts, and precision,
    recall and F1 where labels were flipped (None otherwise)."""
    flag = np.asarray(table["label_error"], bool)
    flipped = np.asarray(table["label_flipped"], bool)
    tp = int((flag & flipped).sum())
    out = {"flagged": int(flag.sum()), "flipped": int(flipped.sum()), "true_positives": tp,
           "relabel_correct": None, "precision": None, "recall": None, "f1": None}
    if flipped.any():
        precision = tp / flag.sum() if flag.any() else float("nan")
        recall = tp / flipped.sum()
        f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
        hit = flag & flipped
        out.update(precision=_finite(precision), recall=float(recall), f1=float(f1),
                   relabel_correct=int((np.asarray(table["suggested_label"])[hit]
                                        == np.asarray(table["original_label"])[hit]).sum()))
    return out


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
