"""Drop-in replacements for existing prediction-depth and k-NN code, one import each.

* :mod:`pdepth.compat.sklearn` -- ``KNeighborsClassifier`` (scikit-learn's estimator, uniform
  weights, Euclidean distance).
* :mod:`pdepth.compat.difficulty` -- ``prediction_depth`` of the ``nn_example_difficulty``
  package (``difficulty.metrics.prediction_depth``).
* :mod:`pdepth.compat.knndnn` -- ``knn_predict`` of the AngularGap ``knndnn.py`` family, with
  true nearest neighbours.

See ``docs/migration.md`` for before/after snippets and every deliberate difference.
"""

from . import difficulty, knndnn, sklearn

__all__ = ["difficulty", "knndnn", "sklearn"]
