"""Prediction depth (docs/design.md section 1) on top of the k-NN op (section 2).

- :mod:`.rule`: :func:`depth_from_predictions` (the rule alone) and the reference modes.
- :mod:`.args`: the one validation path of both drivers (arguments, defaults, reference).
- :mod:`.support`: where the support set lives (:class:`LocalSupport`; the sharded one is
  :class:`.sharded.ShardedSupport`, built on :mod:`pdepth.distributed`), the only thing the
  drivers ask for k-NN work; :mod:`.placement` picks one for a call.
- :mod:`.result`: :class:`DepthResult`, its one builder and its files.
- :mod:`.embeddings`: :func:`prediction_depth` (embeddings, one layer at a time).
- :mod:`.stream`: :func:`stream_prediction_depth` (a model; the support set streamed).
- :mod:`.ensemble`: :func:`aggregate` / :class:`EnsembleDepth` (effective depth per split).

The k-NN work is always done by the op (:func:`pdepth.knn_vote`, :func:`pdepth.knn`);
nothing here computes distances or votes.
"""

from .embeddings import prediction_depth
from .ensemble import EnsembleDepth, aggregate
from .result import DepthResult, build_result
from .rule import REFERENCE_MODES, depth_from_predictions
from .sharded import ShardedSupport
from .stream import StreamResult, peak_rss_bytes, stream_prediction_depth
from .support import LocalSupport

__all__ = [
    "REFERENCE_MODES",
    "DepthResult",
    "EnsembleDepth",
    "LocalSupport",
    "ShardedSupport",
    "StreamResult",
    "aggregate",
    "build_result",
    "depth_from_predictions",
    "peak_rss_bytes",
    "prediction_depth",
    "stream_prediction_depth",
]
