"""Models for square images of any size (28x28 grey, 32x32 colour, ...) and the user's own.

Every builder takes ``(num_classes, in_channels, image_size)``:

* :func:`cnn` -- a small, fast CNN (three conv blocks and one hidden dense layer); the CPU
  default of ``pdepth run``. Needs ``image_size >= 8``.
* :func:`resnet18` -- ResNet-18 in the paper's form: torchvision's ResNet-18 with GroupNorm
  (32 groups) in place of BatchNorm and a stem chosen by the input size (see there).
* :func:`vgg16` -- VGG-16 (configuration "D", batch norm) with the last max-pool dropped,
  a global average pool and a 512-512-C classifier. Needs ``image_size >= 16``.
* :func:`mlp` -- a ReLU multilayer perceptron on the flattened image.

:data:`ARCHITECTURES` maps the names used by the CLI (``--arch``) to the builders and
:func:`build_model` builds one by name. Each architecture's probe preset (which modules are
probed, :mod:`pdepth.probes`) has the architecture's name. :data:`ARCH_VERSIONS` counts the
changes of an architecture that change its results (part of the protocol key).

The user's own model (``--model module:factory``): :func:`load_factory` imports the factory,
:func:`make_model` calls it (the calling convention is there); :func:`load_checkpoint` loads
a state dict into a model (``--checkpoint``).
"""

from __future__ import annotations

import importlib
import inspect
import pickle
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["ARCHITECTURES", "ARCH_VERSIONS", "MLP", "SmallCNN", "VGG", "build_model", "cnn",
           "load_checkpoint", "load_factory", "make_model", "mlp", "resnet18",
           "vgg16"]


class SmallCNN(nn.Module):
    """Three conv blocks (conv 3x3, batch norm, ReLU, 2x2 max-pool) and a hidden dense layer.

    Probes (preset ``"cnn"``): input, ``block1`` (16 x S/2 x S/2), ``block2`` (32 x S/4 x
    S/4), ``block3`` (64 x S/8 x S/8), ``fc`` (128, after its ReLU), softmax: 6 probes, for
    any image size S >= 8 (28x28: 16x14x14, 32x7x7, 64x3x3).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 widths: Sequence[int] = (16, 32, 64), hidden: int = 128, image_size: int = 28):
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"SmallCNN takes three widths, got {tuple(widths)}")
        if image_size < 8:
            raise ValueError(f"SmallCNN needs image_size >= 8 (three 2x2 max-pools), got "
                             f"{image_size}")
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
    input gives a 1x1 map and a 32x32 one a 2x2 map before the global average pool. Probes
    (preset ``"vgg16"``): input, each conv's output after its BN and ReLU (13), softmax: 15
    probes.
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


def cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> SmallCNN:
    """The small fast CNN (the CPU default)."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


def mlp(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> MLP:
    """An MLP with four hidden layers of 512 units."""
    return MLP(num_classes=num_classes, in_features=in_channels * image_size * image_size)


def vgg16(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> VGG:
    """VGG-16 with batch norm, last max-pool dropped (four 2x2 pools: image_size >= 16)."""
    if image_size < 16:
        raise ValueError(f"vgg16 needs image_size >= 16 (four 2x2 max-pools), got {image_size}")
    return VGG(num_classes=num_classes, in_channels=in_channels)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


def resnet18(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """ResNet-18 in the paper's form: torchvision's ResNet-18 with ``GroupNorm(32, C)`` in
    place of every BatchNorm, and a stem chosen by the input size.

    * Small images (``image_size <= 32``: 28x28 and 32x32): a 3x3 stride-1 conv (padding 1,
      64 channels, no bias), GroupNorm, ReLU and no max-pool (the CIFAR stem), so the four
      stages see 32/16/8/4 (32x32) or 28/14/7/4 (28x28) maps; the two stems differ only in
      ``in_channels`` (3 for colour, 1 for grey).
    * Larger images: torchvision's ImageNet stem (7x7 stride-2 conv, GroupNorm, ReLU, 3x3
      stride-2 max-pool).

    Probes (preset ``"resnet18"``): input, ``bn1`` (the stem's normalisation), the output of
    each of the 8 residual blocks (``layer1.0`` ... ``layer4.1``: the residual sum after the
    block's final ReLU), softmax: 11 probes.
    """
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes, norm_layer=_group_norm)
    if image_size <= 32:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


#: The built-in ``--arch`` values: name -> the function that builds the model.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "cnn": cnn,
    "resnet18": resnet18,
    "vgg16": vgg16,
    "mlp": mlp,
}


#: Changes of an architecture that change its results: part of the protocol key (version 1,
#: the first, is left out so that earlier runs keep their key). resnet18 2: GroupNorm.
ARCH_VERSIONS = {"resnet18": 2}


def build_model(arch: str, num_classes: int = 10, in_channels: int = 1,
                image_size: int = 28) -> nn.Module:
    """Builds an architecture of :data:`ARCHITECTURES` by name for ``in_channels`` x
    ``image_size`` x ``image_size`` inputs.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {arch!r}; valid architectures: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[arch](num_classes=num_classes, in_channels=in_channels,
                               image_size=image_size)


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable ``factory`` of ``module:factory`` (``--model``; ``factory`` may be a
    dotted attribute path, e.g. ``nets:Zoo.small``); ValueError naming the flag otherwise."""
    module, sep, attr = str(spec).partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"--model takes module:factory (e.g. mynets:build), got {spec!r}")
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"--model {spec}: cannot import {module!r} ({exc}); is its folder on "
                         "PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--model {spec}: {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--model {spec}: {attr!r} is a {type(obj).__name__}, not callable")
    return obj


def make_model(arch: str | None, model: str | None = None, *, num_classes: int,
               in_channels: int, image_size: int, model_args: dict | None = None) -> nn.Module:
    """The run's network: ``build_model(arch, ...)``, or with ``model`` (``module:factory``)
    the user's factory called with the keywords among ``num_classes``, ``in_channels`` and
    ``image_size`` that its signature names -- or timm's names for them, ``in_chans`` and
    ``img_size``, where it takes those instead -- (all three where it takes ``**kwargs``),
    and ``model_args`` (``--model-arg``, which win), nothing else
    (:func:`call_factory`); it must return an ``nn.Module`` mapping ``[B,
    in_channels, image_size, image_size]`` float32 inputs to ``[B, num_classes]`` logits."""
    if model is None:
        if model_args:
            raise ValueError(f"--model-arg {sorted(model_args)} is for --model, not --arch")
        return build_model(arch, num_classes, in_channels, image_size)
    given = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    return call_factory(load_factory(model), given, model_args, model)


# What pdepth calls a factory's input shape, and the names timm (and some others) use.
_ALIASES = {"in_channels": ("in_chans",), "image_size": ("img_size",)}


def call_factory(factory: Callable[..., nn.Module], given: dict, model_args: dict | None,
                 spec: str) -> nn.Module:
    """``factory(**keywords)``: of ``given`` (pdepth's ``num_classes``, ``in_channels``,
    ``image_size``) the keywords its signature names -- under timm's names ``in_chans`` /
    ``img_size`` where it takes those instead -- then ``model_args`` (``--model-arg``, which
    win). It must return an ``nn.Module``.

    A factory that takes ``**kwargs`` and names none of them (timm's and torchvision's
    builders, e.g. ``timm.models:resnet18``) is tried with pdepth's names, then timm's, then
    ``in_chans`` alone, then ``num_classes`` alone: each next one only where the builder
    refused a keyword of the one before (a TypeError naming it)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        params = {}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    keywords = {}
    for key, value in given.items():
        names = [n for n in (key, *_ALIASES.get(key, ())) if n in params]
        if names:
            keywords[names[0]] = value
    model_args = model_args or {}
    named_shape = any(n in params for key in ("in_channels", "image_size")
                      for n in (key, *_ALIASES[key]))
    if var_kw and not named_shape:
        net = _call_kwargs(factory, given, keywords, model_args, spec)
    else:
        net = _call(factory, {**keywords, **model_args}, spec, model_args)
    if not isinstance(net, nn.Module):
        raise ValueError(f"--model {spec}: the factory returned a {type(net).__name__}, not "
                         "a torch.nn.Module")
    return net


def _call_kwargs(factory, given: dict, named: dict, model_args: dict, spec: str):
    """:func:`call_factory` for a ``**kwargs`` builder: the keyword sets in turn."""
    shape = {k: given[k] for k in ("in_channels", "image_size") if k in given}
    timm_names = {_ALIASES[k][0]: v for k, v in shape.items()}
    tries = [shape, timm_names, {k: v for k, v in timm_names.items() if k == "in_chans"}, {}]
    base = {**({"num_classes": given["num_classes"]} if "num_classes" in given else {}),
            **named}
    for i, extra in enumerate(tries):
        keywords = {**base, **extra, **model_args}
        try:
            return factory(**keywords)
        except TypeError as exc:
            if i < len(tries) - 1 and any(repr(k) in str(exc) for k in extra):
                continue  # a shape keyword refused: the next set
            raise _rejected(spec, keywords, model_args, exc) from None
        except (ValueError, AssertionError) as exc:
            raise _rejected(spec, keywords, model_args, exc) from None


def _call(builder, keywords: dict, spec: str, model_args: dict):
    """``builder(**keywords)``; the TypeError / ValueError / AssertionError of a builder
    that rejects its arguments becomes a one-line ValueError naming ``--model-arg``."""
    try:
        return builder(**keywords)
    except (TypeError, ValueError, AssertionError) as exc:
        raise _rejected(spec, keywords, model_args, exc) from None


def _rejected(spec: str, keywords: dict, model_args: dict, exc: BaseException) -> ValueError:
    what = (f"--model-arg {' '.join(f'{k}={v!r}' for k, v in model_args.items())}"
            if model_args else f"the keywords {sorted(keywords)}")
    text = " ".join(str(exc).split())[:300]
    return ValueError(f"--model {spec} rejects {what}: {type(exc).__name__}: {text}")


def load_checkpoint(model: nn.Module, path: str) -> nn.Module:
    """Loads the state dict saved at ``path`` into ``model`` (``--checkpoint``), with
    ``torch.load(path, weights_only=True)``: tensors and plain containers only, never
    arbitrary pickled objects. The file holds ``model.state_dict()``, or a dict with it under
    ``"state_dict"`` or ``"model"``.

    Raises:
        ValueError: the file cannot be read, is empty, is not a ``torch.save`` file (text, a
            zip archive of something else, a truncated file), needs pickle (refused, saying
            so), holds no state dict, or does not fit ``model`` (naming the missing /
            unexpected keys or the mismatched shapes); each naming the file.
    """
    state = _read_checkpoint(path)
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ValueError(f"--checkpoint {path} holds a {type(state).__name__}, not a state "
                         "dict (save model.state_dict())")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit
        raise ValueError(f"--checkpoint {path} does not fit {type(model).__name__}: "
                         f"{' '.join(str(exc).split())}") from None
    if missing or unexpected:
        raise ValueError(
            f"--checkpoint {path} does not fit {type(model).__name__} (another architecture?): "
            f"missing keys {_few(missing)}; unexpected keys {_few(unexpected)}")
    return model


_ZIP = b"PK\x03\x04"  # torch.save's format is a zip archive; before torch 1.6 a pickle


def _read_checkpoint(path: str):
    """``torch.load(path, weights_only=True)``; a one-line ValueError naming ``path`` and
    what is wrong instead of torch's KeyError / EOFError / RuntimeError for a file that is
    not a checkpoint."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ValueError(f"--checkpoint {path} cannot be read ({exc.strerror or exc})") from None
    if not head:
        raise ValueError(f"--checkpoint {path} is empty (0 bytes), not a checkpoint; save one "
                         "with torch.save(model.state_dict(), path)")
    what = ("a zip archive but not a readable torch.save checkpoint (another archive, or a "
            "damaged or truncated checkpoint)" if head == _ZIP else
            "a pickle but not a readable torch.save checkpoint (damaged or truncated?)"
            if head[0] == 0x80 else
            "not a torch.save checkpoint (neither its zip format nor its older pickle format)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc).split("WeightsUnpickler error:", 1)
        detail = " ".join(text[1].split("Check the documentation")[0].split()) if len(
            text) == 2 else _first_line(exc)
        if "Unsupported global" not in detail:  # a damaged pickle, not a refused object
            raise ValueError(f"--checkpoint {path} is {what}: {detail}") from None
        raise ValueError(
            f"--checkpoint {path} is refused: loading it needs pickle to build Python objects, "
            f"and pdepth loads checkpoints with torch.load(weights_only=True) only, since "
            f"unpickling can run arbitrary code ({detail.split('. Please')[0]}); save "
            f"model.state_dict() instead") from None
    except MemoryError:
        raise
    except Exception as exc:  # torch's KeyError, EOFError, RuntimeError... for a foreign file
        raise ValueError(f"--checkpoint {path} is {what}: {_first_line(exc)}") from None


def _first_line(exc: BaseException, most: int = 120) -> str:
    """The first line of an exception's message, shortened; its type where it is empty."""
    text = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= most else text[:most - 3] + "..."


def _few(names: Sequence[str], most: int = 8) -> str:
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return (", ".join(names[:most]) + more) if names else "none"
