"""pdepth: fast, exact prediction depth (Baldock, Maennel, Neyshabur, NeurIPS 2021).

- k-NN core (:func:`knn`, :func:`knn_vote`, :func:`vote`; :mod:`pdepth.ops`): the compiled
  extension ``pdepth._C`` (C++ on CPU, CUDA on GPU); :mod:`pdepth.reference` is the float64
  oracle and fallback; the running top-k and its merge rule are :mod:`pdepth.topk`.
- Prediction depth on embeddings (:func:`prediction_depth`, :func:`depth_from_predictions`,
  :func:`aggregate`) and drop-in shims for existing probe code (:mod:`pdepth.compat`).
- The paper's protocol: probes and extraction (:func:`extract`), model-level streaming
  (:func:`stream_prediction_depth`), models, training and metrics (:func:`run`),
  difficulty categories (:func:`categorize`); the CLI is ``pdepth run``.
- A model trained elsewhere (:func:`score`, ``pdepth score``; :mod:`pdepth.model_score`): both
  splits' depth, models by name (:mod:`pdepth.builders`), Hugging Face datasets
  (:mod:`pdepth.hf_data`).
"""

import sys

from . import compat, data, models, ops, probes, reference
from ._extension import backend, build_info
from ._version import __version__
from .categories import CATEGORIES, CategoryThresholds, categorize
from .data import load_fashion_mnist
from .depth import (
    REFERENCE_MODES,
    DepthResult,
    EnsembleDepth,
    LocalSupport,
    ShardedSupport,
    aggregate,
    depth_from_predictions,
    prediction_depth,
)
from .model_score import ScoreResult, score
from .ops import (
    FILTERS,
    METRICS,
    SELF_MATCH_POLICIES,
    knn,
    knn_plan,
    knn_stats,
    knn_vote,
    normalize_rows,
    vote,
)
from .pipeline import RunConfig, run
from .probes import PRESETS, Embeddings, ProbeRecorder, ProbeSpec, extract
from .stream import StreamResult, stream_prediction_depth
from .topk import Neighbors, Vote, empty_topk, merge_topk, neighbor_labels, vote_counts

# The modules pdepth.ops and pdepth.probes were named pdepth.knn and pdepth.extract, names the
# functions pdepth.knn and pdepth.extract now own. Registering the old module paths keeps
# `from pdepth.knn import merge_topk` working without a module hiding behind a function.
sys.modules[__name__ + ".knn"] = ops
sys.modules[__name__ + ".extract"] = probes

__all__ = [
    "CATEGORIES",
    "FILTERS",
    "METRICS",
    "PRESETS",
    "REFERENCE_MODES",
    "SELF_MATCH_POLICIES",
    "CategoryThresholds",
    "DepthResult",
    "Embeddings",
    "EnsembleDepth",
    "LocalSupport",
    "Neighbors",
    "ProbeRecorder",
    "ProbeSpec",
    "RunConfig",
    "ScoreResult",
    "ShardedSupport",
    "StreamResult",
    "Vote",
    "__version__",
    "aggregate",
    "backend",
    "build_info",
    "categorize",
    "compat",
    "data",
    "depth_from_predictions",
    "empty_topk",
    "extract",
    "knn",
    "knn_plan",
    "knn_stats",
    "knn_vote",
    "load_fashion_mnist",
    "merge_topk",
    "models",
    "neighbor_labels",
    "normalize_rows",
    "prediction_depth",
    "reference",
    "run",
    "score",
    "stream_prediction_depth",
    "vote",
    "vote_counts",
]
