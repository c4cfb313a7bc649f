"""pdepth.models: every architecture builds by name, maps a batch to logits, and rejects
unknown names."""

from __future__ import annotations

import pytest
import torch

from pdepth import models


@pytest.mark.parametrize("arch", sorted(models.ARCHITECTURES))
def test_every_architecture_gives_logits(arch):
    if arch == "resnet18":
        pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = models.build_model(arch, num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 7) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_unknown_architecture_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid architectures: cnn"):
        models.build_model("alexnet")
