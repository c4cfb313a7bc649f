"""
I have embeddings: prediction depth in ten lines
================================================

You have, for every example, one embedding per probe (layer) of a network: a list of ``L``
tensors ``[n, d_l]`` from input to output, and the labels. :func:`pdepth.prediction_depth`
builds a k-NN classifier at each probe (support: the same examples, each one's own row
excluded) and returns each example's depth: the first probe from which every probe agrees
with the reference.

Here the "network" is made up: ten Gaussian classes whose separation grows from probe to
probe, so easy examples settle early and the 5% whose labels we flip never settle.
"""

import tempfile

import matplotlib.pyplot as plt
import torch

import pdepth

torch.manual_seed(0)
n, classes, dim, num_layers = 3000, 10, 32, 6
labels = torch.randint(0, classes, (n,))
centres = torch.randn(classes, dim)
noise = torch.randn(n, dim)
layers = [s * centres[labels] + noise for s in torch.linspace(0.1, 1.5, num_layers)]
flipped = torch.rand(n) < 0.05
given = torch.where(flipped, (labels + 1) % classes, labels)  # 5% label errors

# %%
# The ten lines: embeddings in, depth out
# ---------------------------------------
# ``reference="labels"`` compares every probe's k-NN prediction with the given label
# (``"network"`` with ``network_pred=`` is the paper's choice when you have the network's
# predictions). ``res.depth`` is ``int64 [n]`` in ``0..L``; ``L`` means "never settles".
res = pdepth.prediction_depth(layers, given, reference="labels", k=30)
print("depth:", res.depth[:10].tolist())
print("k-NN accuracy per probe:", [round(a, 3) for a in res.layer_accuracy.tolist()])
print(f"mean depth: clean {res.depth[~flipped].float().mean():.2f}, "
      f"flipped {res.depth[flipped].float().mean():.2f}")

# %%
# Depth per example: the flipped labels sit at the bottom
# -------------------------------------------------------
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
bins = torch.arange(num_layers + 2) - 0.5
a.hist([res.depth[~flipped].numpy(), res.depth[flipped].numpy()], bins=bins.numpy(),
       density=True, label=["clean labels", "flipped labels"])
a.set_xlabel("prediction depth")
a.set_ylabel("fraction of examples")
a.legend()
b.plot(range(num_layers), res.layer_accuracy.numpy(), marker="o")
b.set_xlabel("probe")
b.set_ylabel("k-NN accuracy (given labels)")
fig.tight_layout()
plt.show()

# %%
# The same with a query split, cosine distance, and saving
# --------------------------------------------------------
# ``query_layers`` scores other examples against the support set (no self match);
# ``metric="cosine"`` ranks L2-normalised rows. Results save to ``.npz`` or ``.parquet``.
queries = [layer[:500] + 0.1 * torch.randn(500, dim) for layer in layers]
held = pdepth.prediction_depth(layers, given, queries, reference="labels",
                               query_labels=given[:500], metric="cosine", k=30)
loaded = pdepth.DepthResult.load(held.save(tempfile.mkdtemp() + "/depth.parquet"))
print(held.depth.shape, held.depth.dtype, loaded.equals(held))
