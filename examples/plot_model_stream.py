"""
I have a model: extract, stream, score
======================================

Three ways to get prediction depth from a PyTorch model, all with the same result:

- :func:`pdepth.extract` captures every probe in one forward pass (hooks), then
  :func:`pdepth.prediction_depth` runs on the embeddings;
- :func:`pdepth.stream_prediction_depth` streams the support set through the model and
  merges it into running top-k lists, so no probe's full support embeddings are held;
- :func:`pdepth.score` scores the paper's two splits (training examples against the training
  split with their own row excluded, test examples against the same support).

The model is a small MLP trained for two epochs on 2,000 Fashion-MNIST images (the Debian
package at ``/usr/share/datasets/fashion-mnist``; nothing is downloaded).
"""

import matplotlib.pyplot as plt
import torch
from torch import nn

import pdepth

torch.manual_seed(0)
images, labels = pdepth.load_fashion_mnist(split="train")
x = images[:2000].float().div(255).unsqueeze(1)  # [n, 1, 28, 28] float32
y = labels[:2000]                                  # [n] int64
x_test, y_test = (t[:500] for t in pdepth.load_fashion_mnist(split="test"))
x_test = x_test.float().div(255).unsqueeze(1)

model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128),
                      nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
opt = torch.optim.Adam(model.parameters(), lr=2e-3)
for _epoch in range(2):
    for i in torch.randperm(len(x)).split(64):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
model.eval()

# %%
# Extract, then depth
# -------------------
# ``probes=None`` is ``"auto"``: the family that recognises the model (here ``mlp``: the
# input, every dense layer's activation, the softmax). ``Embeddings.layers`` maps each probe's
# name to its ``float32 [n, d_l]`` tensor; ``Embeddings.pred`` is the model's prediction.
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=500)
emb = pdepth.extract(model, loader)
print({name: tuple(t.shape) for name, t in emb.layers.items()})
res = pdepth.prediction_depth(emb.layers, y, reference="network", network_pred=emb.pred, k=30)
print("mean depth", res.depth.float().mean().item())

# %%
# Stream: the same depths without holding the embeddings
# ------------------------------------------------------
streamed = pdepth.stream_prediction_depth(model, loader, y, k=30, reference="network")
print("same depths:", torch.equal(streamed.depth, res.depth))

# %%
# Score both splits
# -----------------
scored = pdepth.score(model, (x, y), (x_test, y_test), k=30)
for split, r in [("train", scored.train), ("test", scored.test)]:
    print(f"{split}: mean depth {r.depth.float().mean():.2f}, "
          f"k-NN accuracy per probe {[round(a, 2) for a in r.layer_accuracy.tolist()]}")

fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
bins = torch.arange(len(emb.layers) + 2) - 0.5
a.hist([scored.train.depth.numpy(), scored.test.depth.numpy()], bins=bins.numpy(),
       density=True, label=["train (self excluded)", "test"])
a.set_xlabel("prediction depth")
a.legend()
for split, r in [("train", scored.train), ("test", scored.test)]:
    b.plot(r.layer_accuracy.numpy(), marker="o", label=split)
b.set_xticks(range(len(emb.layers)), emb.names, rotation=30)
b.set_ylabel("k-NN accuracy")
b.legend()
fig.tight_layout()
plt.show()
