"""The registry of model families: which models each probe preset covers, its probes, and the
layout of its block outputs (class and prefix tokens).

A :class:`Family` is a name (the preset's), a recogniser (does it cover this model? by module
structure and class names: timm, torchvision and transformers are never imported here), the
rule that names its probed modules, and, for transformers, a :class:`TokenLayout`. Preset
``"auto"`` is :func:`auto_family`: the first family that recognises the model, the specific
families before the generic ones (``vgg``, ``mlp``), and a ValueError for a model none
recognises (it never guesses). :func:`register_family` adds a family.

Families (docs/protocol.md, "Probe presets"):

* ``cnn`` -- :class:`pdepth.models.SmallCNN`: ``block1``, ``block2``, ``block3``, ``fc``.
* ``vit`` -- ViT / DeiT: every transformer block's output. timm (``blocks.i``; prefix tokens
  from ``num_prefix_tokens``: 1 for ViT, 2 for distilled DeiT), torchvision
  (``encoder.layers.encoder_layer_i``; 1), Hugging Face ``ViTModel`` /
  ``ViTForImageClassification`` and the models built like them (DeiT, DINOv2, CLIP vision:
  ``layers.i`` in transformers 5, ``encoder.layer.i`` before; prefix: the class token, a
  distillation token, register tokens). The class token is row 0.
* ``swin`` -- every Swin block's output (timm ``layers.i.blocks.j``, torchvision
  ``features.i.j``, Hugging Face ``...layers.i.blocks.j``); no class token. timm and
  torchvision blocks output channels-last maps ``[B, H, W, C]``, Hugging Face ones ``[B, L, C]``.
* ``convnext`` -- every ConvNeXt block's output (timm ``stages.i.blocks.j``, torchvision
  ``features.i.j``, Hugging Face ``...stages.i.layers.j``): conv maps ``[B, C, H, W]``.
* ``resnet`` (alias ``resnet18``) -- the stem's normalisation (``bn1``) and every residual
  block (``layerI.J``): torchvision and timm ResNets.
* ``vgg`` (alias ``vgg16``) -- after each ``Conv2d`` (its activation, else its norm, else the
  conv). ``auto`` takes it for a VGG, or a network of plain layers with a ``Conv2d``.
* ``mlp`` -- after each dense layer but the last (its activation, else the ``Linear``).
  ``auto`` takes it for a network of plain layers without a ``Conv2d``.

"Plain layers" (the generic families' recognisers): every parameter belongs to a ``Linear``,
``Conv2d``, normalisation or ``PReLU`` module, and the model is not one of timm's,
torchvision's or transformers' (those are covered by name only: a parameter held by another
module -- a class token, a position embedding, a layer scale -- means another architecture).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["FAMILIES", "TOKENS", "Family", "TokenLayout", "auto_family", "family_names",
           "get_family", "recognise", "register_family"]

#: The token rules of a transformer probe: the class token, the mean of the patch tokens, every token.
TOKENS = ("cls", "mean", "all")
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid,
               nn.Hardswish, nn.Mish)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
_PLAIN = (nn.Linear, nn.Conv2d, nn.PReLU, *NORMS)
_LIBRARIES = ("timm.", "torchvision.", "transformers.")


@dataclass(frozen=True)
class TokenLayout:
    """How a transformer family's block outputs ``[B, T, C]`` are laid out.

    Attributes:
        class_token: the row of the class token, or None (the model has none).
        prefix: the leading rows that are not patch tokens (class, distillation, register
            tokens), left out of the ``"mean"`` rule.
        channels_last: 4-D block outputs are ``[B, H, W, C]`` maps (Swin), not conv maps.
    """

    class_token: int | None
    prefix: int = 0
    channels_last: bool = False

    @property
    def default_token(self) -> str:
        """``"cls"`` where there is a class token, else ``"mean"``."""
        return "cls" if self.class_token is not None else "mean"


def _no_tokens(model: nn.Module) -> TokenLayout | None:
    return None


@dataclass(frozen=True)
class Family:
    """One model family of the registry.

    Attributes:
        name: the preset name.
        summary: the models it covers and its probes, one line (docs and messages).
        recognise: ``model -> bool``, whether ``auto`` takes this family for it.
        modules: ``model -> [module name]``, the probed modules in forward order; a ValueError
            naming the preset where the model does not fit.
        tokens: ``model -> TokenLayout | None`` (None: not a transformer, no token rule).
        aliases: other preset names of the family.
        generic: tried by ``auto`` after every specific family.
    """

    name: str
    summary: str
    recognise: Callable[[nn.Module], bool]
    modules: Callable[[nn.Module], list[str]]
    tokens: Callable[[nn.Module], TokenLayout | None] = _no_tokens
    aliases: tuple[str, ...] = ()
    generic: bool = False


#: The registry: family name -> :class:`Family` (:func:`register_family` adds one).
FAMILIES: dict[str, Family] = {}
_ALIASES: dict[str, str] = {}


def register_family(family: Family) -> Family:
    """Adds ``family`` (its name and aliases become presets); ValueError for a taken name."""
    for name in (family.name, *family.aliases):
        if name in _ALIASES or name == "auto":
            raise ValueError(f"probe preset {name!r} is already registered")
    FAMILIES[family.name] = family
    _ALIASES.update({n: family.name for n in (family.name, *family.aliases)})
    return family


def family_names() -> tuple[str, ...]:
    """Every preset name: ``"auto"`` and the families' names and aliases, sorted."""
    return ("auto", *sorted(_ALIASES))


def get_family(name: str) -> Family:
    """The family of preset ``name`` (an alias included); ValueError listing the presets."""
    if name not in _ALIASES:
        raise ValueError(f"unknown probe preset {name!r}; valid presets: "
                         f"{', '.join(family_names())}")
    return FAMILIES[_ALIASES[name]]


def recognise(model: nn.Module) -> Family | None:
    """The first family whose recogniser takes ``model`` (specific families first)."""
    order = sorted(FAMILIES.values(), key=lambda f: f.generic)  # stable: registration order
    return next((f for f in order if f.recognise(model)), None)


def auto_family(model: nn.Module) -> Family:
    """Preset ``"auto"``: :func:`recognise`, or a ValueError that lists the presets and says
    how to name the probed modules."""
    family = recognise(model)
    if family is None:
        kind = type(model)
        top = [n for n, _ in model.named_children()]
        raise ValueError(
            f"probes 'auto' does not recognise {kind.__name__} ({kind.__module__}): name a "
            f"preset ({', '.join(family_names()[1:])}) or the modules to probe, in the order "
            f"the forward pass runs them (probes=['blocks.0', 'blocks.1', ...]; --probes "
            f"NAME,NAME); its top-level modules: {', '.join(top) or 'none'}")
    return family


# --- helpers -------------------------------------------------------------------------------

def _child(model: nn.Module, path: str) -> nn.Module | None:
    """The submodule at dotted ``path``, or None."""
    m = model
    for part in path.split("."):
        m = m._modules.get(part) if isinstance(m, nn.Module) else None
        if m is None:
            return None
    return m


def _matching(model: nn.Module, pattern: re.Pattern) -> list[str]:
    """Names of the modules whose class name fullmatches ``pattern``, outermost only."""
    out: list[str] = []
    for name, m in model.named_modules():
        if pattern.fullmatch(type(m).__name__) and not any(
                name.startswith(o + ".") for o in out):
            out.append(name)
    return out


def _plain(model: nn.Module) -> bool:
    """Every parameter in a plain layer, and not a timm / torchvision / transformers model."""
    if type(model).__module__.startswith(_LIBRARIES):
        return False
    return all(isinstance(m, _PLAIN) or not any(True for _ in m.parameters(recurse=False))
               for m in model.modules())


def _no(preset: str, model: nn.Module, what: str) -> ValueError:
    return ValueError(f"preset {preset!r}: {type(model).__name__} {what}")


# --- cnn -----------------------------------------------------------------------------------

_CNN = ("block1", "block2", "block3", "fc")


def _cnn_modules(model: nn.Module) -> list[str]:
    missing = [w for w in _CNN if _child(model, w) is None]
    if missing:
        raise ValueError(f"preset 'cnn' is for pdepth.models.SmallCNN; "
                         f"{type(model).__name__} lacks {missing}")
    return list(_CNN)


# --- vit -----------------------------------------------------------------------------------

def _hf_vit(model: nn.Module) -> tuple[str, nn.Module, str] | None:
    """``(prefix, embeddings, blocks path)`` of a Hugging Face ViT-like model: an
    ``embeddings`` module with a patch embedding and a class token, beside its blocks."""
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] != "embeddings":
            continue
        if not any(hasattr(m, a) for a in ("patch_embeddings", "patch_embedding")):
            continue
        if not any(isinstance(getattr(m, a, None), nn.Parameter)
                   for a in ("cls_token", "class_embedding")):
            continue
        parent = name.rsplit(".", 1)[0] + "." if "." in name else ""
        for path in ("layers", "encoder.layer", "encoder.layers", "layer"):
            if isinstance(_child(model, parent + path), (nn.ModuleList, nn.Sequential)):
                return parent, m, parent + path
    return None


def _vit_blocks(model: nn.Module) -> str | None:
    """The dotted path of the container of a ViT's blocks, or None."""
    if (isinstance(_child(model, "blocks"), (nn.ModuleList, nn.Sequential))
            and _child(model, "patch_embed") is not None
            and isinstance(getattr(model, "num_prefix_tokens", None), int)):
        return "blocks"  # timm
    if (isinstance(getattr(model, "class_token", None), nn.Parameter)
            and isinstance(_child(model, "encoder.layers"), nn.Sequential)):
        return "encoder.layers"  # torchvision
    hf = _hf_vit(model)
    return hf[2] if hf else None


def _vit_modules(model: nn.Module) -> list[str]:
    path = _vit_blocks(model)
    if path is None:
        raise _no("vit", model, "is not a ViT / DeiT (no timm blocks with patch_embed, "
                  "torchvision encoder.layers or Hugging Face embeddings + encoder layers)")
    return [f"{path}.{n}" for n, _ in _child(model, path).named_children()]


def _vit_tokens(model: nn.Module) -> TokenLayout | None:
    path = _vit_blocks(model)
    if path == "blocks":  # timm: class token (row 0) first, then distillation / registers
        has_cls = bool(getattr(model, "has_class_token",
                               getattr(model, "cls_token", None) is not None))
        return TokenLayout(0 if has_cls else None, int(model.num_prefix_tokens))
    if path == "encoder.layers":
        return TokenLayout(0, 1)
    if path is not None:
        emb = _hf_vit(model)[1]
        registers = getattr(emb, "register_tokens", None)
        extra = (isinstance(getattr(emb, "distillation_token", None), nn.Parameter)
                 + (int(registers.shape[1]) if isinstance(registers, nn.Parameter) else 0))
        return TokenLayout(0, 1 + extra)
    return None


# --- swin and convnext: blocks found by their class names ----------------------------------

_SWIN_BLOCK = re.compile(r"Swin\w*(Block|Layer)(V2)?")  # timm, torchvision, HF (Swinv2Layer)
_CONVNEXT_BLOCK = re.compile(r"(ConvNeXt|ConvNext|CN)(V2)?(Block|Layer)")


def _blocks_rule(preset: str, pattern: re.Pattern, what: str):
    def modules(model: nn.Module) -> list[str]:
        found = _matching(model, pattern)
        if not found:
            raise _no(preset, model, f"has no {what} block (a module of class "
                      f"{pattern.pattern})")
        return found
    return modules


# --- resnet, vgg, mlp (the rules of the first presets) -------------------------------------

def _resnet_modules(model: nn.Module) -> list[str]:
    names = {n for n, _ in model.named_modules()}
    stem = next((s for s in ("bn1", "stem.bn", "stem.norm", "stem.bn1") if s in names), None)
    blocks = []
    for i in range(1, 5):
        layer = _child(model, f"layer{i}")
        if layer is not None:
            blocks += [f"layer{i}.{child}" for child, _ in layer.named_children()]
    if not blocks:
        raise _no("resnet", model, "has no layer1..layer4 (not a torchvision/timm-style "
                  "ResNet)")
    return ([stem] if stem else []) + blocks


def _vgg_modules(model: nn.Module) -> list[str]:
    out, pending = [], None
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if pending is not None:
                out.append(pending[0])
            pending = [n, False]  # [probe name, saw a norm]
        elif pending is not None and isinstance(m, NORMS) and not pending[1]:
            pending = [n, True]
        elif pending is not None and isinstance(m, ACTIVATIONS):
            out.append(n)
            pending = None
    if pending is not None:
        out.append(pending[0])
    if not out:
        raise _no("vgg", model, "has no Conv2d")
    return out


def _mlp_modules(model: nn.Module) -> list[str]:
    named = list(model.named_modules())
    linears = [i for i, (_, m) in enumerate(named) if isinstance(m, nn.Linear)]
    if not linears:
        raise _no("mlp", model, "has no nn.Linear")
    out = []
    for i in linears[:-1]:
        probe = named[i][0]
        for n, m in named[i + 1:]:
            if isinstance(m, nn.Linear):
                break
            if isinstance(m, ACTIVATIONS):
                probe = n
                break
        out.append(probe)
    return out


def _has(kind):
    return lambda model: any(isinstance(m, kind) for m in model.modules())


register_family(Family(
    "cnn", "pdepth.models.SmallCNN: block1, block2, block3, fc",
    lambda m: all(_child(m, w) is not None for w in _CNN), _cnn_modules))
register_family(Family(
    "vit", "ViT / DeiT (timm, torchvision, Hugging Face): every transformer block",
    lambda m: _vit_blocks(m) is not None, _vit_modules, _vit_tokens))
register_family(Family(
    "swin", "Swin (timm, torchvision, Hugging Face): every Swin block",
    lambda m: bool(_matching(m, _SWIN_BLOCK)), _blocks_rule("swin", _SWIN_BLOCK, "Swin"),
    lambda m: TokenLayout(None, 0, channels_last=True)))
register_family(Family(
    "convnext", "ConvNeXt (timm, torchvision, Hugging Face): every ConvNeXt block",
    lambda m: bool(_matching(m, _CONVNEXT_BLOCK)),
    _blocks_rule("convnext", _CONVNEXT_BLOCK, "ConvNeXt")))
register_family(Family(
    "resnet", "torchvision / timm ResNets: the stem's bn1 and every residual block",
    lambda m: _child(m, "layer1") is not None, _resnet_modules, aliases=("resnet18",)))
register_family(Family(
    "vgg", "VGGs and plain conv nets: after each Conv2d (its activation, else its norm)",
    lambda m: "VGG" in type(m).__name__ or (_plain(m) and _has(nn.Conv2d)(m)), _vgg_modules,
    aliases=("vgg16",), generic=True))
register_family(Family(
    "mlp", "plain dense nets: after each Linear but the last (its activation)",
    lambda m: _plain(m) and _has(nn.Linear)(m) and not _has(nn.Conv2d)(m), _mlp_modules,
    generic=True))
