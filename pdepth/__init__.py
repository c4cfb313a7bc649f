"""pdepth: fast, exact prediction depth (Baldock, Maennel, Neyshabur, NeurIPS 2021).

The k-NN core (:func:`knn`, :func:`knn_vote`, :func:`vote`) runs in the compiled extension
``pdepth._C`` (C++ on CPU, CUDA on GPU); :mod:`pdepth.reference` is the float64 oracle and
fallback.
"""

from . import reference
from .knn import (
    SELF_MATCH_POLICIES,
    Neighbors,
    Vote,
    backend,
    build_info,
    empty_topk,
    knn,
    knn_vote,
    vote,
)

__version__ = "0.1.0"

__all__ = [
    "SELF_MATCH_POLICIES",
    "Neighbors",
    "Vote",
    "__version__",
    "backend",
    "build_info",
    "empty_topk",
    "knn",
    "knn_vote",
    "reference",
    "vote",
]
