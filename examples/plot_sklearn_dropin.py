"""
Replacing scikit-learn's KNeighborsClassifier
=============================================

Probe code often fits a ``sklearn.neighbors.KNeighborsClassifier`` per layer. Changing the
import to :class:`pdepth.compat.sklearn.KNeighborsClassifier` keeps the estimator API
(``fit / predict / predict_proba / kneighbors / score``, ``clone``, pipelines,
``GridSearchCV``) and its predictions (uniform vote, ties to the lowest class id) while the
exact k-NN runs in pdepth's fused kernel. docs/migration.md lists the deliberate differences.
"""

import time

import numpy as np
from sklearn.neighbors import KNeighborsClassifier as SkKNN

import pdepth
from pdepth.compat.sklearn import KNeighborsClassifier

images, labels = pdepth.load_fashion_mnist(split="train")
x = images[:6000].reshape(6000, -1).float().div(255).numpy()  # float32 [n, 784]
y = labels[:6000].numpy()
x_fit, y_fit, x_new, y_new = x[:5000], y[:5000], x[5000:], y[5000:]

# %%
# The same predictions
# --------------------
ours = KNeighborsClassifier(n_neighbors=15).fit(x_fit, y_fit)
theirs = SkKNN(n_neighbors=15, algorithm="brute").fit(x_fit, y_fit)
t0 = time.perf_counter()
p_ours = ours.predict(x_new)
t1 = time.perf_counter()
p_theirs = theirs.predict(x_new)
t2 = time.perf_counter()
print("identical predictions:", np.array_equal(p_ours, p_theirs))
print(f"accuracy {ours.score(x_new, y_new):.3f}; pdepth {t1 - t0:.2f} s, "
      f"scikit-learn {t2 - t1:.2f} s (one run on a shared machine: a rough ratio only)")

# %%
# Neighbours and probabilities
# ----------------------------
# ``kneighbors`` returns ``(distances, indices)`` as scikit-learn does (Euclidean
# distances). ``metric="cosine"`` is supported too (scikit-learn's ``1 - cos``).
dist, idx = ours.kneighbors(x_new[:3], n_neighbors=5)
print(np.round(dist, 3))
print(idx)
print(np.round(ours.predict_proba(x_new[:2]), 2))

# %%
# A real estimator: cross-validation works as before
# --------------------------------------------------
from sklearn.model_selection import cross_val_score  # noqa: E402

print(cross_val_score(KNeighborsClassifier(n_neighbors=15), x_fit, y_fit, cv=3).round(3))
