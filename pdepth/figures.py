"""The report's figures: their file names and captions, the summary claims each shows, and
the modules drawing them needs. Data only, imported by the report that draws them and by the
run folder's rules (:mod:`pdepth.protocol.outdir`: which file names are pdepth's), which the
report applies in turn: so it imports nothing of pdepth's."""

__all__ = ["FIGURES", "FIGURE_CLAIMS", "PRUNE_FIGURES", "REPORT_DEPENDENCIES", "SCORE_FIGURES",
           "is_figure_name"]

REPORT_DEPENDENCIES = ("pandas", "pyarrow", "matplotlib")

FIGURES = {
    "depth_hist.png": "Prediction depth per split (all models): examples in the model's "
                      "training split vs held out.",
    "metrics_vs_depth.png": "Held-out accuracy (the C-score), held-out agreement, confidence, "
                            "margin, ensemble uncertainty (entropy) and iteration learned "
                            "against (rounded) mean depth; mean with standard error per depth.",
    "layer_knn.png": "k-NN accuracy (vs the given labels) at each probe, for examples in the "
                     "training split (self excluded) and held out: early layers generalise, "
                     "later layers memorise.",
    "depth_2d.png": "Train-split depth vs held-out depth: counts (left) and the difficulty "
                    "categories, the paper's three groups of difficult examples and the easy "
                    "ones (right, jittered).",
    "vote_shares.png": "Per category and probe, the mean share of the k-NN votes for the "
                       "given label, the network's prediction and the most frequent other "
                       "class; training split (top) and held out (bottom).",
    "convergence.png": "k-NN accuracy of each probe on a fixed sample of the training split "
                       "after each epoch (mean over the models; left) and the epoch at which "
                       "it makes 95% of its gain (right).",
    "label_noise.png": "Examples whose label was flipped (--label-noise): per probe, the share "
                       "of k-NN votes for the flipped (given) and for the original label, "
                       "training split vs held out. Drawn only where labels were flipped.",
    "examples_by_depth.png": "Random examples at each (rounded) held-out depth.",
    "examples_by_category.png": "Random examples of each category (title: label -> held-out "
                                "networks' most frequent prediction).",
    "training.png": "Training curves of every model.",
    "score_correlations.png": "Spearman correlation over the examples between every two "
                              "difficulty scores (summary.json score_correlations; "
                              "docs/scores.md); a '*' marks a score where higher means "
                              "easier, so a negative cell between a starred and an unstarred "
                              "score means agreement.",
    "score_reliability.png": "Each score's stability across training seeds (summary.json "
                             "score_reliability): the Spearman correlation between the score "
                             "from two disjoint halves of the seeds, and its Spearman-Brown "
                             "estimate for all seeds. Drawn only with at least 2 seeds.",
}
# drawn into a run's report only where `pdepth prune` ran (pdepth.prune_report)
PRUNE_FIGURES = {
    "pruning.png": "Pruning curves (pdepth prune, prune.json): test accuracy after retraining "
                   "on the fraction of the examples each score keeps, per mode (easiest or "
                   "hardest removed, stratified), mean and std over the retraining seeds; "
                   "the random baseline dashed, all examples in gray.",
}
# the summary.json claims each figure shows (pdepth.summary)
FIGURE_CLAIMS = {
    "metrics_vs_depth.png": ("depth_vs_accuracy", "depth_vs_agreement", "depth_vs_confidence",
                             "depth_vs_margin", "depth_vs_uncertainty",
                             "depth_vs_speed_of_learning", "learns_easy_data_first"),
    "layer_knn.png": ("early_layers_generalise",),
    "vote_shares.png": ("groups_processed_differently",),
    "convergence.png": ("early_layers_converge_faster",),
    "label_noise.png": ("flipped_labels_memorised_late",),
}

# the figures of a `pdepth score` folder (pdepth.score_report): one model, its training split
# (self excluded) and its test split; no ensemble, no epochs, no images stored
SCORE_FIGURES = {
    "depth_hist.png": "Prediction depth per split: training examples (self excluded) vs test "
                      "examples, as a fraction of each split.",
    "layer_knn.png": "k-NN accuracy (vs the given labels) at each probe, for the training "
                     "split (self excluded) and the test split.",
    "accuracy_vs_depth.png": "The model's accuracy (its prediction vs the given label) at each "
                             "prediction depth, per split, with the number of examples at "
                             "each depth next to its point.",
}


def is_figure_name(name: str) -> bool:
    """Whether ``figures/name`` is a figure pdepth draws (a run's or a score's)."""
    return name in FIGURES or name in SCORE_FIGURES or name in PRUNE_FIGURES
