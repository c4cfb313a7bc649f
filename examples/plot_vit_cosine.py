"""
Cosine probes on a small ViT (timm, random weights)
===================================================

Transformer blocks output token sequences ``[B, T, C]``; a probe reads one row per image by a
token rule (``"cls"``: the class token, the default where there is one; ``"mean"``: the mean
of the patch tokens; ``"all"``). The ``vit`` family recognises timm, torchvision and Hugging
Face ViTs and probes every block. ``metric="cosine"`` ranks L2-normalised rows, the usual
choice for transformer features.

The ViT is built from a config with random weights (nothing is downloaded; needs the
``models`` extra: ``pip install "pdepth[models]"``), so its depths describe an untrained
network: the point is the API. With a trained checkpoint, load its ``state_dict`` first.
"""

import matplotlib.pyplot as plt
import timm
import torch

import pdepth

torch.manual_seed(0)
model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7,
                          in_chans=1, num_classes=10, depth=4, embed_dim=96, num_heads=3).eval()

images, labels = pdepth.load_fashion_mnist(split="train")
x, y = images[:1000].float().div(255).unsqueeze(1), labels[:1000]
x_test, y_test = (t[:300] for t in pdepth.load_fashion_mnist(split="test"))
x_test = x_test.float().div(255).unsqueeze(1)

# %%
# Which probes ``auto`` picks, and the tokens
# -------------------------------------------
spec = pdepth.probes.resolve_probes(model, None)
print(spec)

# %%
# Depth with cosine k-NN, class token vs mean of the patch tokens
# ---------------------------------------------------------------
# ``reference="labels"``: an untrained head predicts nothing meaningful, so compare each
# probe with the given labels instead of the network's prediction.
fig, ax = plt.subplots(figsize=(7, 3.5))
for token in ["cls", "mean"]:
    res = pdepth.score(model, (x, y), (x_test, y_test), token=token, metric="cosine", k=10,
                       reference="labels")
    acc = res.test.layer_accuracy
    print(f"token={token}: test k-NN accuracy per probe {[round(a, 2) for a in acc.tolist()]}")
    ax.plot(acc.numpy(), marker="o", label=f"token={token}")
ax.set_xticks(range(len(res.test.layer_names)), res.test.layer_names, rotation=30)
ax.set_ylabel("k-NN accuracy (test)")
ax.legend()
fig.tight_layout()
plt.show()
