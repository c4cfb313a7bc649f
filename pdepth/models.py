"""Models for 28x28 single-channel images (Fashion-MNIST) and their probe presets.

* :func:`cnn` -- a small, fast CNN (three conv blocks and one hidden dense layer); the CPU
  default of ``pdepth run``.
* :func:`resnet18` -- torchvision's ResNet-18 with a 3x3 stride-1 stem, no stem max-pool and a
  one-channel input (the CIFAR-style adaptation used for small images).
* :func:`vgg16` -- VGG-16 (configuration "D", batch norm) with the last max-pool dropped so
  that 28x28 inputs keep a 1x1 map, and a 512-512-C classifier.
* :func:`mlp` -- a ReLU multilayer perceptron on the flattened image.

:data:`ARCHITECTURES` maps the names used by the CLI (``--arch``) to the builders and
:func:`build_model` builds one by name. Each architecture's probe preset (which modules are
probed, see :mod:`pdepth.extract`) has the architecture's name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["ARCHITECTURES", "SmallCNN", "MLP", "VGG", "build_model", "cnn", "mlp", "resnet18",
           "vgg16"]


class SmallCNN(nn.Module):
    """Three conv blocks (conv 3x3, batch norm, ReLU, 2x2 max-pool) and a hidden dense layer.

    Probes (preset ``"cnn"``): input, ``block1`` (16x14x14), ``block2`` (32x7x7), ``block3``
    (64x3x3), ``fc`` (128, after its ReLU), softmax: 6 probes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 widths: Sequence[int] = (16, 32, 64), hidden: int = 128, image_size: int = 28):
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"SmallCNN takes three widths, got {tuple(widths)}")
        blocks = []
        c_in, size = in_channels, image_size
        for w in widths:
            blocks.append(nn.Sequential(
                nn.Conv2d(c_in, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ))
            c_in, size = w, size // 2
        self.block1, self.block2, self.block3 = blocks
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c_in * size * size, hidden),
                                nn.ReLU(inplace=True))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        return self.head(self.fc(x))


class MLP(nn.Module):
    """``Flatten -> [Linear -> ReLU] * len(hidden) -> Linear``.

    The dense layers are ``layers.0``, ``layers.2``, ... (each followed by a ReLU at
    ``layers.1``, ``layers.3``, ...) and ``head``. Probes (preset ``"mlp"``): input, the output
    of each hidden dense layer after its ReLU, softmax (the output of the last dense layer):
    ``len(hidden) + 2`` probes.
    """

    def __init__(self, num_classes: int = 10, in_features: int = 784,
                 hidden: Sequence[int] = (512, 512, 512, 512)):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.flatten = nn.Flatten()
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.flatten(x)))


_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class VGG(nn.Module):
    """VGG with batch norm: ``features`` (conv 3x3, BN, ReLU, max-pools), global average pool,
    and a ``classifier`` of two hidden dense layers and the output layer.

    The default configuration is VGG-16 ("D", 13 convs) without its last max-pool, so a 28x28
    input gives a 1x1 map. Probes (preset ``"vgg16"``): input, each conv's output after its
    BN and ReLU (13), softmax: 15 probes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, cfg=_VGG16_CFG,
                 hidden: int = 512, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1, bias=False), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def cnn(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    """The small fast CNN (the CPU default)."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels)


def mlp(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> MLP:
    """An MLP with four hidden layers of 512 units."""
    return MLP(num_classes=num_classes, in_features=in_channels * image_size * image_size)


def vgg16(num_classes: int = 10, in_channels: int = 1) -> VGG:
    """VGG-16 with batch norm, adapted to 28x28 inputs (last max-pool dropped)."""
    return VGG(num_classes=num_classes, in_channels=in_channels)


def resnet18(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """torchvision's ResNet-18 with a 3x3 stride-1 stem conv and no stem max-pool.

    Probes (preset ``"resnet18"``): input, ``bn1`` (the stem's normalisation), the output of
    each of the 8 residual blocks (``layer1.0`` ... ``layer4.1``: the residual sum after the
    block's final ReLU), softmax: 11 probes.
    """
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "cnn": cnn,
    "resnet18": resnet18,
    "vgg16": vgg16,
    "mlp": mlp,
}


def build_model(arch: str, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Builds an architecture of :data:`ARCHITECTURES` by name.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {arch!r}; valid architectures: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[arch](num_classes=num_classes, in_channels=in_channels)
