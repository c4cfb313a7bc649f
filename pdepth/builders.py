"""Models by name for ``pdepth score`` (and ``pdepth run --model``): ``timm:NAME``,
``torchvision:NAME``, ``hf:DIR`` and ``module:factory``, with builder arguments
(``--model-arg KEY=VALUE``) and the model's own preprocessing.

Nothing is downloaded: timm models are built with ``pretrained=False`` and torchvision ones
with ``weights=None`` (random weights, unless ``--checkpoint`` loads a state dict), and
``hf:DIR`` is read from a local ``save_pretrained`` folder only (``local_files_only=True``).
timm and transformers come with the ``models`` extra (``pip install "pdepth[models]"``),
checked before any work (:func:`model_dependencies`).
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .models import _call, call_factory, load_checkpoint, load_factory

__all__ = ["MODELS_HINT", "BuiltModel", "build_named_model", "call_factory",
           "model_dependencies", "output_width", "parse_model_args", "preprocess",
           "PreprocessedImages", "input_transform"]

MODELS_HINT = 'pip install "pdepth[models]"'
KINDS = ("timm", "torchvision", "hf")

def parse_model_args(items: Sequence[str] | None) -> dict:
    """``["KEY=VALUE", ...]`` (``--model-arg``) -> a dict; a VALUE is a Python literal where
    it parses as one (``32``, ``(32, 32)``, ``True``, ``None``), else the string itself.
    A KEY given twice or not an identifier is refused, naming the flag."""
    args: dict = {}
    for item in items or ():
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-arg takes KEY=VALUE with KEY a Python identifier "
                             f"(e.g. drop_rate=0.1), got {item!r}")
        if key in args:
            raise ValueError(f"--model-arg {key} is given twice")
        try:
            args[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            args[key] = text
    return args


def model_kind(spec: str) -> str:
    """``timm``, ``torchvision``, ``hf`` or ``module`` (a ``module:factory``)."""
    prefix = str(spec).partition(":")[0]
    return prefix if prefix in KINDS else "module"


def model_dependencies(spec: str) -> tuple[str, ...]:
    """The optional modules a model spec needs (checked before any work)."""
    return {"timm": ("timm",), "hf": ("transformers",), "torchvision": ("torchvision",)}.get(
        model_kind(spec), ())


@dataclass
class BuiltModel:
    """A model built by name, with what the score records about it.

    ``preprocessing``: the model's own input rules where it declares them (timm's data
    config: ``input_size`` ``[C, H, W]``, ``interpolation``, ``mean``, ``std``; a Hugging
    Face folder's ``preprocessor_config.json``), with ``source`` saying where they come from;
    None where the model declares none (the dataset's own statistics are used)."""

    model: nn.Module
    spec: str
    kind: str
    args: dict = field(default_factory=dict)
    preprocessing: dict | None = None


def build_named_model(spec: str, model_args: dict | None = None, *, checkpoint: str | None =
                      None, num_classes: int | None = None, in_channels: int | None = None,
                      image_size: int | None = None) -> BuiltModel:
    """The model ``spec`` names, built with ``model_args`` (and, for ``module:factory``, the
    data's ``num_classes`` / ``in_channels`` / ``image_size`` where the factory takes them,
    :func:`call_factory`), its ``checkpoint`` loaded (``torch.load(weights_only=True)``).

    Raises ValueError (one line, naming ``--model`` / ``--model-arg``) for an unknown name,
    a folder that is not a saved model, or an argument the builder rejects."""
    args = dict(model_args or {})
    kind, name = model_kind(spec), str(spec).partition(":")[2]
    if kind != "module" and not name:
        raise ValueError(f"--model {spec}: name the model after {kind}: (e.g. {kind}:"
                         f"{'DIR' if kind == 'hf' else 'resnet18'})")
    if kind == "timm":
        model = _timm(name, args, spec)
        pre = _timm_preprocessing(model)
    elif kind == "torchvision":
        model, pre = _torchvision(name, args, spec), None
    elif kind == "hf":
        model, pre = _hf(name, args, spec), _hf_preprocessing(name)
    else:
        given = {"num_classes": num_classes, "in_channels": in_channels,
                 "image_size": image_size}
        model = call_factory(load_factory(spec), {k: v for k, v in given.items()
                                                  if v is not None}, args, spec)
        pre = None
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return BuiltModel(model.eval(), str(spec), kind, args, pre)


def _timm(name: str, args: dict, spec: str) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"--model {spec}: timm has no model {name!r} (see "
                         "timm.list_models(); pdepth builds it with random weights)")
    args.pop("pretrained", None)  # never downloads
    return _call(lambda **kw: timm.create_model(name, pretrained=False, **kw), args, spec,
                 args)


def _timm_preprocessing(model: nn.Module) -> dict:
    """timm's data config for ``model`` (``timm.data.resolve_data_config``), its input size
    taken from the model where it declares one (``patch_embed.img_size``: a ViT built with
    ``img_size=`` keeps the pretrained config's 224)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    size = list(cfg["input_size"])
    declared = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if declared is not None:
        size[1:] = list(declared) if isinstance(declared, (tuple, list)) else [declared] * 2
    channels = _first_conv_channels(model)
    if channels is not None:
        size[0] = channels
    return {"source": "timm.data.resolve_data_config", "input_size": [int(s) for s in size],
            "interpolation": str(cfg.get("interpolation", "bilinear")),
            "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]]}


def _torchvision(name: str, args: dict, spec: str) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise ValueError(f"--model {spec}: torchvision has no model {name!r} (see "
                         "torchvision.models.list_models())")
    args.pop("weights", None)  # never downloads
    return _call(lambda **kw: torchvision.models.get_model(name, weights=None, **kw), args,
                 spec, args)


def _hf(folder: str, args: dict, spec: str) -> nn.Module:
    """An image classifier saved with ``save_pretrained`` in ``folder``, read from there only;
    its forward returns the logits tensor (a hook unwraps the output object)."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"--model {spec}: {folder} is not a folder written by "
                         "save_pretrained (no config.json)")
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar is not pdepth's progress
    try:
        model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True,
                                                                **args)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"--model {spec}: cannot load an image classifier from {folder} "
                         f"({' '.join(str(exc).split())[:200]})") from None
    except TypeError as exc:
        raise ValueError(f"--model {spec} rejects --model-arg {args}: {exc}") from None
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    model.register_forward_hook(_logits_only)
    return model


def _logits_only(module, inputs, output):
    return getattr(output, "logits", output)


def _hf_preprocessing(folder: str) -> dict | None:
    """The folder's ``preprocessor_config.json`` (image processor) where it has one: size,
    resample, mean / std; None without."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        cfg = json.load(f)
    size = cfg.get("size") or {}
    hw = ([size.get("height"), size.get("width")] if isinstance(size, dict)
          else [size, size])
    if None in hw:
        hw = [size.get("shortest_edge")] * 2 if isinstance(size, dict) else [None, None]
    resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(cfg.get("resample"), "bilinear")
    out = {"source": "preprocessor_config.json", "interpolation": resample}
    if None not in hw and cfg.get("do_resize", True):
        out["input_size"] = [None, int(hw[0]), int(hw[1])]
    if cfg.get("do_normalize", True) and cfg.get("image_mean") is not None:
        out["mean"] = [float(v) for v in cfg["image_mean"]]
        out["std"] = [float(v) for v in cfg["image_std"]]
    return out


def _first_conv_channels(model: nn.Module) -> int | None:
    """The input channels of the model's first convolution (None without one)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return None


def output_width(model: nn.Module, example: torch.Tensor) -> int:
    """The number of outputs of ``model`` for a batch like ``example`` (eval mode)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example[:1])
    finally:
        model.train(was)
    out = getattr(out, "logits", out)
    return int(out.reshape(out.shape[0], -1).shape[1])


def input_transform(images: torch.Tensor, model: nn.Module, pre: dict | None,
                    mean: Sequence[float], std: Sequence[float]):
    """The model's input rule for a split of uint8 images ``[n, H, W]`` / ``[n, H, W, C]``:
    a function from a uint8 batch of that split to the model's float32 input
    ``[b, C', H', W']``, and the record of what it does (:func:`preprocess`, one batch at a
    time). Raises ValueError when the model's channels cannot be made from the images'."""
    channels = 1 if images.dim() == 3 else int(images.shape[3])
    pre = dict(pre or {})
    want = (pre.get("input_size") or [None])[0] or _first_conv_channels(model)
    expand = want is not None and want != channels
    if expand:
        if channels != 1:
            raise ValueError(f"the model takes {want}-channel images, the dataset's have "
                             f"{channels}")
        mean, std = list(mean) * want if len(mean) == 1 else mean, \
            list(std) * want if len(std) == 1 else std
    size = pre.get("input_size")
    mode = pre.get("interpolation", "bilinear")
    resize = size is not None and list(images.shape[1:3]) != list(size[1:])
    m, s = pre.get("mean", mean), pre.get("std", std)
    mt = torch.tensor(m, dtype=torch.float32).reshape(1, -1, 1, 1)
    st = torch.tensor(s, dtype=torch.float32).reshape(1, -1, 1, 1)

    def transform(batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(torch.float32).div_(255.0)
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()
        if expand:
            x = x.expand(-1, want, -1, -1).contiguous()
        if resize:
            x = _resize(x, tuple(size[1:]), mode)
        return x.sub_(mt).div_(st)

    hw = list(size[1:]) if resize else list(images.shape[1:3])
    record = {"source": pre.get("source", "dataset statistics"),
              "input_shape": [int(want if expand else channels)] + [int(v) for v in hw],
              "interpolation": mode if size is not None else None, "resized": resize,
              "crop": None, "mean": [float(v) for v in m], "std": [float(v) for v in s]}
    return transform, record


def preprocess(images: torch.Tensor, model: nn.Module, pre: dict | None,
               mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, dict]:
    """uint8 images ``[n, H, W]`` / ``[n, H, W, C]`` -> the model's float32 input
    ``[n, C', H', W']`` and the record of what was done: scaled to [0, 1]; grey repeated to
    the channels of the model's first convolution; resized to the model's input size (no
    crop) with its interpolation; standardised with the model's mean / std where it declares
    them, else with the dataset's (``mean`` / ``std``). The whole split at once; for a split
    too large for that, :class:`PreprocessedImages`."""
    transform, record = input_transform(images, model, pre, mean, std)
    return transform(images), record


class PreprocessedImages(torch.utils.data.Dataset):
    """A split of uint8 images ``[n, H, W(, C)]`` and labels ``[n]`` whose model inputs are
    made batch by batch when read (:func:`input_transform`), so that a split resized to the
    model's input size is never held whole in RAM (5,000 images at 224 x 224 are 3 GB of
    float32). Items are ``(x [C', H', W'] float32, label)``; a DataLoader's batch is made in
    one call (``__getitems__``), with the bits of :func:`preprocess` on the whole split."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images: {images.shape[0]} rows but labels has "
                             f"{labels.shape[0]}")
        self.images, self.targets, self.transform = images, labels, transform

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int):
        return self.transform(self.images[i:i + 1])[0], self.targets[i]

    def __getitems__(self, indices: Sequence[int]) -> list:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        x = self.transform(self.images[idx])
        return list(zip(x.unbind(0), self.targets[idx].unbind(0), strict=True))


def _resize(x: torch.Tensor, size: tuple, mode: str, block: int = 256) -> torch.Tensor:
    mode = mode if mode in ("nearest", "bilinear", "bicubic") else "bilinear"
    kw = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
    out = [torch.nn.functional.interpolate(x[i:i + block], size=size, mode=mode, **kw)
           for i in range(0, x.shape[0], block)]
    return torch.cat(out) if out else x.new_zeros((0, x.shape[1], *size))
