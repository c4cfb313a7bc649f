"""Embedding extraction: every probe of a network in one forward pass, with forward hooks.

A :class:`ProbeSpec` names the probed modules (by their ``named_modules()`` name), in order
from input to output. By convention (docs/design.md section 1) probe 0 is the raw input and the
last probe is the softmax of the model's output; the hooked modules sit in between. Each hook
copies its module's output at the moment the module runs (so an in-place activation that runs
later, e.g. ``ReLU(inplace=True)`` after a batch norm, cannot change what was recorded),
reads it under the token rule, optionally pools it to at most ``max_dim`` features, flattens
it to ``[B, D]`` and stores it.

Presets (``ProbeSpec.from_preset(name, model)``, see :data:`PRESETS`) are the model families
of :mod:`pdepth.families` (its docstring lists each one's probes): ``cnn``, ``vit``, ``swin``,
``convnext``, ``resnet`` / ``resnet18``, ``vgg`` / ``vgg16``, ``mlp``, and ``"auto"``: the
family that recognises the model, or a ValueError naming the presets where none does.

Token rule (``token=``, recorded as ``ProbeSpec.token``), for the hooked modules' outputs:

* ``[B, T, C]`` token sequences: ``"cls"`` -- the class token's row (the family's
  :class:`~pdepth.families.TokenLayout`; refused for a model without one), ``"mean"`` -- the
  mean over the tokens after the family's prefix tokens (class, distillation, register), ``"all"``
  -- every token (prefix included) as ``[B, C, T]``, pooled over tokens to ``max_dim`` and
  flattened.
* ``[B, H, W, C]`` maps of a channels-last family (timm / torchvision Swin): ``"mean"`` -- the
  mean over positions, ``"all"`` -- the map as ``[B, C, H, W]`` (pooled like a conv map).
* conv maps ``[B, C, H, W]`` and ``[B, D]`` outputs pass unchanged.

The default is the family's for a transformer preset (``vit``: ``"cls"`` where the model has
a class token, else ``"mean"``; ``swin``: ``"mean"``) and None (no token rule: outputs as they
are) for the other presets and for module names. The input and softmax probes never take it.

Pooling (``max_dim``): a probe output ``[B, C, H, W]`` with more than ``max_dim`` features is
adaptive-average-pooled to ``[B, C, h, w]``, the largest ``h <= H`` (and ``w = W*h // H``)
with ``C*h*w <= max_dim`` (at least 1x1, so at most ``C`` features if ``C > max_dim``);
``[B, C, L]`` outputs are pooled along ``L`` the same way; other shapes are flattened
unpooled. The rule applies to every probe, the input included.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .families import TOKENS, TokenLayout, auto_family, family_names, get_family, recognise

__all__ = [
    "INPUT",
    "PRESETS",
    "SOFTMAX",
    "TOKENS",
    "Embeddings",
    "ProbeRecorder",
    "ProbeSpec",
    "extract",
    "iter_batches",
    "model_output",
    "pinned",
    "pool_embedding",
    "probe_dims",
    "probe_shapes",
    "read_tokens",
    "resolve_probes",
]

#: The name of probe 0, the flattened input.
INPUT = "input"
#: The name of the last probe, the softmax output.
SOFTMAX = "softmax"
#: The built-in probe presets (model families; ``"auto"`` picks one).
PRESETS = family_names()  # the built-in families; pdepth.families.family_names() is live


@dataclass(frozen=True)
class ProbeSpec:
    """Which activations to record, in order from input to output.

    Attributes:
        modules: names of the hooked modules (as in ``model.named_modules()``); each must run
            exactly once per forward pass, in this order (the order their outputs are
            computed: :meth:`ProbeRecorder.run` refuses another one, since depth counts the
            probes in this order).
        input: record the raw input as probe 0 (default True).
        softmax: record the softmax of the model's output as the last probe (default True).
        max_dim: pool conv maps to at most this many features (None: no pooling); see the
            module docstring.
        preset: the preset the modules came from, if any (informational; for ``"auto"`` the
            family it chose).
        token: the token rule of the hooked outputs, ``"cls"``, ``"mean"``, ``"all"`` or None
            (outputs as they are); see the module docstring.
        layout: where the class and prefix tokens sit (:class:`pdepth.families.TokenLayout`;
            :func:`resolve_probes` fills it in from the model's family).
    """

    modules: tuple[str, ...] = ()
    input: bool = True
    softmax: bool = True
    max_dim: int | None = None
    preset: str | None = field(default=None, compare=False)
    token: str | None = None
    layout: TokenLayout | None = None

    def __post_init__(self):
        object.__setattr__(self, "modules", tuple(self.modules))
        if self.max_dim is not None and int(self.max_dim) < 1:
            raise ValueError(f"max_dim must be a positive integer or None, got {self.max_dim}")
        if len(set(self.modules)) != len(self.modules):
            raise ValueError(f"probe modules must be distinct, got {list(self.modules)}")
        if self.token is not None and self.token not in TOKENS:
            raise ValueError(f"token must be one of {', '.join(TOKENS)} or None, got "
                             f"{self.token!r}")

    @property
    def names(self) -> list[str]:
        """Probe names in order: ``"input"``, the module names, ``"softmax"``."""
        return ([INPUT] if self.input else []) + list(self.modules) + (
            [SOFTMAX] if self.softmax else [])

    @property
    def num_probes(self) -> int:
        return len(self.names)

    @classmethod
    def from_preset(cls, name: str, model: nn.Module, *, max_dim: int | None = None,
                    input: bool = True, softmax: bool = True,
                    token: str | None = None) -> ProbeSpec:
        """The probes of a preset (:data:`PRESETS`) on ``model``, with the family's token
        rule (``token`` None: its default) checked against the model."""
        family = auto_family(model) if name == "auto" else get_family(name)
        layout = family.tokens(model)
        spec = cls(modules=family.modules(model), input=input, softmax=softmax,
                   max_dim=max_dim, preset=family.name if name == "auto" else name,
                   token=token if token is not None or layout is None else
                   layout.default_token, layout=layout)
        _check_token(spec, model)
        return spec

    def validate(self, model: nn.Module) -> dict[str, nn.Module]:
        """Name -> module for every hooked probe; ValueError listing the valid names for an
        unknown one."""
        named = dict(model.named_modules())
        unknown = [m for m in self.modules if m not in named or m == ""]
        if unknown:
            valid = [n for n in named if n]
            raise ValueError(
                f"unknown probe module(s) {unknown}; valid module names of "
                f"{type(model).__name__}: {', '.join(valid)}; or a preset: "
                f"{', '.join(family_names())}"
            )
        return {m: named[m] for m in self.modules}


def _check_token(spec: ProbeSpec, model: nn.Module) -> None:
    """``"cls"`` needs a class token: a ValueError naming the model where it has none."""
    if spec.token == "cls" and (spec.layout is None or spec.layout.class_token is None):
        family = f" ({spec.preset})" if spec.preset else ""
        raise ValueError(f"token 'cls': {type(model).__name__}{family} has no class token; use "
                         "token 'mean' (mean over its tokens) or 'all'")


def resolve_probes(model: nn.Module, probes=None, *, max_dim: int | None = None,
                   token: str | None = None) -> ProbeSpec:
    """A :class:`ProbeSpec` from a spec, a preset name, or a sequence of module names (input
    and softmax probes added; an empty one is refused); None means preset ``"auto"``; a string
    that names no preset but one of the model's modules is that module alone.
    ``max_dim`` and ``token`` (``"cls"``, ``"mean"``, ``"all"``: module docstring) override
    the spec's when given; a preset's default token is its family's. The token layout comes
    from the model's family (:func:`pdepth.families.recognise`; none: no prefix tokens, no
    class token). The module names are validated against ``model``; their order against the
    forward pass when it runs (:class:`ProbeRecorder`: a ValueError naming the forward
    order, at the first batch)."""
    if probes is None:
        probes = "auto"
    if isinstance(probes, ProbeSpec):
        spec = dataclasses.replace(
            probes, max_dim=probes.max_dim if max_dim is None else max_dim,
            token=probes.token if token is None else token)
    elif isinstance(probes, str):
        if probes not in family_names():
            named = [n for n, _ in model.named_modules() if n]
            if probes in named:  # one module name (--probes blocks.0): a list of one
                return resolve_probes(model, [probes], max_dim=max_dim, token=token)
            raise ValueError(
                f"unknown probe preset {probes!r}; valid presets: {', '.join(family_names())}; "
                f"or pass a list of module names: {', '.join(named)}"
            )
        return _validated(ProbeSpec.from_preset(probes, model, max_dim=max_dim, token=token),
                          model)
    else:
        spec = ProbeSpec(tuple(probes), max_dim=max_dim, token=token)
        if not spec.modules:  # e.g. --probes "," -- only the input and softmax probes
            raise ValueError(f"the probe list names no module: pass module names (in the order "
                             f"the forward pass runs them) or a preset: "
                             f"{', '.join(family_names())}")
    if spec.token is not None and spec.layout is None:
        family = recognise(model)
        spec = dataclasses.replace(spec, layout=family.tokens(model) if family else None)
    _check_token(spec, model)
    return _validated(spec, model)


def _validated(spec: ProbeSpec, model: nn.Module) -> ProbeSpec:
    spec.validate(model)
    return spec


def read_tokens(t: torch.Tensor, token: str | None,
                layout: TokenLayout | None) -> torch.Tensor:
    """A hooked output under the token rule (module docstring): ``[B, T, C]`` to ``[B, C]``
    (``"cls"``, ``"mean"``) or ``[B, C, T]`` (``"all"``); a channels-last ``[B, H, W, C]``
    map to ``[B, C]`` or ``[B, C, H, W]``; anything else unchanged."""
    if token is None:
        return t
    # low-precision outputs (autocast) are averaged in float32
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    if t.dim() == 3:
        if token == "cls":
            return t[:, layout.class_token]
        if token == "mean":
            prefix = layout.prefix if layout is not None else 0
            if t.shape[1] <= prefix:
                raise ValueError(f"token 'mean': an output of {t.shape[1]} token(s) has none "
                                 f"after the model's {prefix} prefix token(s)")
            return t[:, prefix:].mean(1, dtype=acc)
        return t.transpose(1, 2)
    if t.dim() == 4 and layout is not None and layout.channels_last:
        return t.mean((1, 2), dtype=acc) if token == "mean" else t.permute(0, 3, 1, 2)
    return t


def pool_embedding(t: torch.Tensor, max_dim: int | None) -> torch.Tensor:
    """``[B, ...] -> [B, D]``: flattened, after adaptive average pooling to at most ``max_dim``
    features for ``[B, C, H, W]`` and ``[B, C, L]`` tensors (module docstring)."""
    if max_dim is None or t[0].numel() <= max_dim:
        return t.reshape(t.shape[0], -1)
    if t.dim() == 4:
        c, h_in, w_in = t.shape[1:]
        h = h_in
        while h > 1 and c * h * max(1, (w_in * h) // h_in) > max_dim:
            h -= 1
        w = max(1, (w_in * h) // h_in)
        return F.adaptive_avg_pool2d(t, (h, w)).reshape(t.shape[0], -1)
    if t.dim() == 3:
        c = t.shape[1]
        return F.adaptive_avg_pool1d(t, max(1, max_dim // c)).reshape(t.shape[0], -1)
    return t.reshape(t.shape[0], -1)


def model_output(out) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, the first element of a tuple/list, or
    ``out["logits"]`` / ``out.logits``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the logits in a model output of type {type(out).__name__}")


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    if isinstance(out, Mapping):
        for o in out.values():
            if isinstance(o, torch.Tensor):
                return o
    raise TypeError(f"probe output of type {type(out).__name__} holds no tensor")


class _Truncated(Exception):
    """Raised by the last probe's hook to stop a truncated forward pass."""


class ProbeRecorder:
    """Forward hooks that record every probe of ``spec`` in one forward pass.

    Use as a context manager (hooks are removed on exit)::

        with ProbeRecorder(model, spec) as rec:
            layers, logits = rec.run(x)   # layers: list of [B, D_l] tensors, spec order

    Recorded tensors are detached copies in ``dtype`` (default float32) on ``storage``
    (default: the model's device). With ``truncate=True`` and no softmax probe, the forward
    pass stops once every probed module has run (nothing after it is computed) and
    :meth:`run` returns None for the logits.
    """

    def __init__(self, model: nn.Module, spec: ProbeSpec, *, dtype=torch.float32,
                 storage: torch.device | str | None = None, truncate: bool = False):
        self.model = model
        self.spec = spec
        self.dtype = dtype
        self.storage = None if storage is None else torch.device(storage)
        self._modules = spec.validate(model)
        _check_token(spec, model)
        self._truncate = truncate and not spec.softmax
        self._skip_forward = truncate and not spec.softmax and not spec.modules
        self._handles: list = []
        self._buffer: dict[str, torch.Tensor] = {}

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        t = pool_embedding(t.detach(), self.spec.max_dim)
        dev = self.storage if self.storage is not None else t.device
        # .to() may return the same storage; clone() guarantees a private copy.
        return t.to(device=dev, dtype=self.dtype).clone()

    def _hook(self, name: str):
        def hook(module, args, output):
            if name in self._buffer:
                raise RuntimeError(
                    f"probe module {name!r} ran more than once in one forward pass (a shared "
                    "module such as a ResNet block's ReLU); probe a module that runs once"
                )
            t = read_tokens(_first_tensor(output), self.spec.token, self.spec.layout)
            self._buffer[name] = self._store(t)
            if self._truncate and len(self._buffer) == len(self._modules):
                raise _Truncated  # every probe has run: the rest of the network is not needed
        return hook

    def __enter__(self) -> ProbeRecorder:
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._buffer.clear()

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One forward pass: (probe embeddings in spec order, logits as float32)."""
        self._buffer.clear()
        logits = None
        if not self._skip_forward:
            try:
                logits = model_output(self.model(x)).detach().float()
            except _Truncated:
                pass
        missing = [m for m in self.spec.modules if m not in self._buffer]
        if missing:
            raise RuntimeError(f"probe module(s) {missing} did not run in the forward pass")
        if list(self._buffer) != list(self.spec.modules):  # depth counts probes in this order
            raise ValueError(f"probe modules {list(self.spec.modules)} are not in the order the "
                             f"forward pass runs them: list them as {list(self._buffer)}")
        layers = []
        if self.spec.input:
            layers.append(self._store(x))
        layers += [self._buffer[m] for m in self.spec.modules]
        if self.spec.softmax:
            layers.append(self._store(torch.softmax(logits, dim=1)))
        self._buffer.clear()
        if logits is None:
            return layers, None
        dev = self.storage if self.storage is not None else logits.device
        return layers, logits.to(dev)


@dataclass(eq=False)
class Embeddings:
    """Probe embeddings of N examples.

    Attributes:
        layers: ordered dict probe name -> ``[N, D_l]`` tensor (input to output).
        logits: ``[N, C]`` float32 model outputs.
        labels: ``[N]`` int64 labels when the data yielded them, else None.
    """

    layers: OrderedDict[str, torch.Tensor]
    logits: torch.Tensor
    labels: torch.Tensor | None = None

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=1)

    @property
    def pred(self) -> torch.Tensor:
        return self.logits.argmax(1)

    @property
    def names(self) -> list[str]:
        return list(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers.values())


def pinned(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` in pinned (page-locked) host memory when it goes to a CUDA ``device``, so that
    the batches sliced from it copy with ``non_blocking=True`` while the GPU computes; else
    ``x`` itself."""
    if torch.device(device).type == "cuda" and x.device.type == "cpu" and not x.is_pinned():
        return x.pin_memory()
    return x


def iter_batches(data, batch_size: int = 256) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(x, y or None)`` batches from a tensor ``[N, ...]``, a ``(x, y)`` pair of tensors, a
    ``Dataset`` yielding ``x`` or ``(x, y, ...)``, or an iterable of batches (a DataLoader)."""
    if isinstance(data, torch.Tensor):
        for i in range(0, data.shape[0], batch_size):
            yield data[i:i + batch_size], None
        return
    if (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)):
        x, y = data
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(
            data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    for batch in data:
        if isinstance(batch, torch.Tensor):
            yield batch, None
        elif isinstance(batch, Mapping):
            yield batch.get("x", batch.get("image")), batch.get("y", batch.get("label"))
        else:
            yield batch[0], (batch[1] if len(batch) > 1 else None)


def extract(
    model: nn.Module,
    loader,
    probes=None,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    max_dim: int | None = None,
    token: str | None = None,
    dtype: torch.dtype = torch.float32,
    storage: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "extract",
) -> Embeddings:
    """Embeddings of every probe for every example, one forward pass per batch.

    Args:
        model: any ``nn.Module``; run in eval mode under ``no_grad`` (its mode is restored).
        loader: a DataLoader / iterable of batches (``x`` or ``(x, y, ...)``), a Dataset, a
            tensor ``[N, ...]`` or an ``(x, y)`` pair of tensors.
        probes: a :class:`ProbeSpec`, a preset name (:data:`PRESETS`), module names, or None
            (preset ``"auto"``).
        batch_size: batch size when ``loader`` is a tensor or Dataset.
        device: where the model runs (default: where its parameters are).
        max_dim: pool conv maps to at most this many features (overrides the spec's).
        token: the token rule of transformer block outputs, ``"cls"``, ``"mean"`` or ``"all"``
            (overrides the spec's; default: the preset's, see :func:`resolve_probes`).
        dtype: storage dtype of the embeddings.
        storage: where the embeddings are kept (default CPU).
        progress: tqdm progress bar.

    Returns:
        :class:`Embeddings` with one ``[N, D_l]`` tensor per probe, the logits and the labels.

    Raises:
        ValueError: an unknown preset, a model ``"auto"`` does not recognise, a token rule
            the model cannot take, or a loader that yields no batches.
        RuntimeError: a probe module that did not run in the forward pass.
        TypeError: a probe or model output that holds no tensor.
    """
    spec = resolve_probes(model, probes, max_dim=max_dim, token=token)
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    chunks: list[list[torch.Tensor]] = [[] for _ in spec.names]
    logits, labels = [], []
    batches = iter_batches(loader, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, total=None, unit="batch", leave=False)
    was_training = model.training
    model.eval()
    try:
        with ProbeRecorder(model, spec, dtype=dtype, storage=storage) as rec:
            for x, y in batches:
                layers, out = rec.run(x.to(device, non_blocking=True))
                for store, t in zip(chunks, layers, strict=True):
                    store.append(t)
                logits.append(out)
                if y is not None:
                    labels.append(torch.as_tensor(y).long().cpu())
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("extract(): the loader yielded no batches")
    return Embeddings(
        layers=OrderedDict((name, torch.cat(c)) for name, c in zip(spec.names, chunks,
                                                                    strict=True)),
        logits=torch.cat(logits),
        labels=torch.cat(labels) if labels else None,
    )


def probe_dims(model: nn.Module, spec: ProbeSpec, example: torch.Tensor) -> list[int]:
    """Embedding width of each probe for inputs shaped like ``example`` (``[B, ...]``)."""
    return probe_shapes(model, spec, example)[1]


@torch.no_grad()
def probe_shapes(model: nn.Module, spec: ProbeSpec, example: torch.Tensor
                 ) -> tuple[int, list[int]]:
    """``(the output's width, each probe's width)`` from one forward call (eval mode, the
    model's mode restored) on the first row of ``example`` (``[B, ...]``)."""
    was_training = model.training
    model.eval()
    try:
        with ProbeRecorder(model, spec) as rec:
            layers, logits = rec.run(example[:1])
    finally:
        model.train(was_training)
    return int(logits.reshape(logits.shape[0], -1).shape[1]), [int(t.shape[1]) for t in layers]
