"""The end-to-end protocol of Baldock et al. (2021), on one dataset and architecture.

For every seed s the dataset (or a random ``subset`` of it, with a fraction ``label_noise``
of its labels flipped to another class) is split 50/50 at random; model
``(s, h)`` trains on half h and holds out the other half. Every model:

1. trains for ``epochs`` epochs (Adam, cosine learning rate), recording every example's
   prediction after each epoch (and at initialisation);
2. computes prediction depth (:func:`pdepth.stream_prediction_depth`) for its training half
   (each example's own support point excluded) and for its held-out half, with its training
   half as the k-NN support set (labels = the given labels; reference = the network's own
   prediction, docs/design.md section 1);
3. saves its arrays to ``models/seed<s>-half<h>.npz`` as soon as it is done (an interrupted
   run resumes from these files).

The per-model results are then aggregated per example (:func:`pdepth.metrics.summarize`),
categorised (:func:`pdepth.categorize`) and written out with a report
(:mod:`pdepth.report`). See docs/protocol.md for the output files and their columns.

Modules, in the order a run uses them: :mod:`.errors` (the errors a user can fix),
:mod:`.config` (:class:`RunConfig`, the protocol key, the split), :mod:`.outdir` (the output
directory: marker, overwrite, resume, per-model files), :mod:`.train` (one model's training),
:mod:`.model_run` (one model's work), :mod:`.results` (aggregation), :mod:`.run` (``run()``).
"""

from .config import RunConfig, flip_labels, run_dependencies, split_halves
from .errors import (
    INSTALL_HINT,
    MissingDependencyError,
    ModelFileError,
    OutputExistsError,
    require_modules,
)
from .outdir import MARKER, RESULT_DIRS, RESULT_FILES, load_results, prepare_output
from .runner import run, versions
from .train import TrainOptions, train_model

__all__ = [
    "INSTALL_HINT",
    "MARKER",
    "RESULT_DIRS",
    "RESULT_FILES",
    "MissingDependencyError",
    "ModelFileError",
    "OutputExistsError",
    "RunConfig",
    "TrainOptions",
    "flip_labels",
    "load_results",
    "prepare_output",
    "require_modules",
    "run",
    "run_dependencies",
    "split_halves",
    "train_model",
    "versions",
]
