"""Training one model of the protocol (Adam, cosine learning rate), recording every example's
prediction (and, optionally, a snapshot such as the probes' accuracy) at initialisation and
after each epoch."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["EPOCH_SCORES", "TrainOptions", "train_model"]


@dataclass(frozen=True)
class TrainOptions:
    """The settings of :func:`train_model`."""

    epochs: int
    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    eval_batch_size: int = 1000
    seed: int = 0  # of the batch order


EPOCH_SCORES = ("label_prob", "margin", "el2n")  # history["epoch_scores"], scores=True


@torch.no_grad()
def predict(model, x, batch_size, device, labels=None):
    """The argmax prediction of ``model`` (in eval mode) on every row of ``x`` (``[n]``
    int64). With ``labels [n]``: ``(prediction, {name: [n] float32})`` with, from the same
    logits, the softmax probability of the label, the logit margin (the label's logit minus
    the largest other) and the EL2N ``|softmax - onehot(label)|_2`` (:data:`EPOCH_SCORES`)."""
    was = model.training
    model.eval()
    preds, scores = [], []
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i:i + batch_size].to(device, non_blocking=True))
        preds.append(logits.argmax(1).cpu())
        if labels is not None:
            scores.append(_label_scores(logits.float(), labels[i:i + batch_size].to(device)))
    model.train(was)
    if labels is None:
        return torch.cat(preds)
    return torch.cat(preds), {name: torch.cat([s[j] for s in scores])
                              for j, name in enumerate(EPOCH_SCORES)}


def _label_scores(logits, labels) -> tuple[torch.Tensor, ...]:
    """``logits [b, C]`` float32, ``labels [b]`` -> the :data:`EPOCH_SCORES`, ``[b]`` float32
    each, on the CPU."""
    rows = torch.arange(labels.shape[0], device=labels.device)
    probs = torch.softmax(logits, 1)
    p_label = probs[rows, labels]
    other = logits.clone()
    other[rows, labels] = -torch.inf
    margin = logits[rows, labels] - other.max(1).values
    onehot = torch.nn.functional.one_hot(labels, logits.shape[1]).float()
    el2n = (probs - onehot).norm(dim=1)
    return p_label.cpu(), margin.cpu(), el2n.cpu()


def train_model(model, x, y, train_index, options: TrainOptions | None = None, *,
                device="cpu", progress=False, desc="train", held_out_labels=None,
                snapshot=None, scores=False, **settings):
    """Trains ``model`` on ``x[train_index]`` and records the prediction on every row of ``x``
    at initialisation and after each epoch.

    ``options`` (a :class:`TrainOptions`), or its fields as keywords (``epochs=`` is
    required then, as in ``train_model(model, x, y, idx, epochs=6, lr=2e-3)``).

    Returns ``(epoch_pred [epochs + 1, n] int64, history)`` with ``history`` holding per-epoch
    ``loss``, ``train_accuracy`` (on the training half against ``y``, the labels it trains
    on; eval mode) and ``held_out_accuracy`` (on the other rows, against ``held_out_labels
    [n]``, default ``y``: e.g. the dataset's labels where ``y`` carries label noise).

    ``snapshot``: a callable ``snapshot(model)`` run at initialisation and after each epoch
    (e.g. :class:`pdepth.protocol.convergence.ProbeCurve`); its ``epochs + 1`` results are
    ``history["snapshots"]``. It must leave the model as it found it and draw no random
    number (eval mode, ``no_grad``), so that it never changes training.

    ``scores``: also record, from the same forward pass that gives ``epoch_pred``, every
    example's probability of its label ``y``, logit margin and EL2N at initialisation and
    after each epoch (:func:`predict`): ``history["epoch_scores"]``, ``{name: [epochs + 1,
    n] float32}`` (the inputs of :mod:`pdepth.scores`). It reads only the logits, so it
    never changes training either.
    """
    if options is None:
        options = TrainOptions(**settings)
    elif settings:
        raise TypeError(f"train_model() takes options= or the settings "
                        f"{', '.join(f.name for f in fields(TrainOptions))}, not both")
    device = torch.device(device)
    model.to(device)
    train_index = torch.as_tensor(train_index)
    held = torch.ones(x.shape[0], dtype=torch.bool)
    held[train_index] = False
    y_held = y if held_out_labels is None else torch.as_tensor(held_out_labels)
    xt, yt = x[train_index].to(device), y[train_index].to(device)
    steps_per_epoch = max(1, -(-xt.shape[0] // options.batch_size))
    opt = torch.optim.Adam(model.parameters(), lr=options.lr,
                           weight_decay=options.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=options.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(int(options.seed))
    record = _Recorder(model, x, y if scores else None, options.eval_batch_size, device)
    preds = [record()]
    history = {"loss": [], "train_accuracy": [], "held_out_accuracy": []}
    if snapshot is not None:
        history["snapshots"] = [snapshot(model)]
    epochs_iter = range(options.epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs_iter = tqdm(epochs_iter, desc=desc, unit="epoch", leave=False)
    for _ in epochs_iter:
        perm = torch.randperm(xt.shape[0], generator=gen).to(device)
        loss = _epoch(model, (xt, yt), perm, (opt, sched), options.batch_size)
        pred = record()
        preds.append(pred)
        if snapshot is not None:
            history["snapshots"].append(snapshot(model))
        history["loss"].append(loss)
        history["train_accuracy"].append(float((pred == y)[~held].float().mean()))
        history["held_out_accuracy"].append(
            float((pred == y_held)[held].float().mean()) if held.any() else float("nan"))
        if progress:
            epochs_iter.set_postfix(loss=f"{history['loss'][-1]:.3f}",
                                    train=f"{history['train_accuracy'][-1]:.3f}",
                                    held_out=f"{history['held_out_accuracy'][-1]:.3f}")
    if scores:
        history["epoch_scores"] = {name: torch.stack(v) for name, v in record.scores.items()}
    return torch.stack(preds), history


class _Recorder:
    """``record()``: the prediction on every row of ``x`` (:func:`predict`), keeping the
    :data:`EPOCH_SCORES` of each call in ``scores`` where ``labels`` are given."""

    def __init__(self, model, x, labels, batch_size, device):
        self.model, self.x, self.labels = model, x, labels
        self.batch_size, self.device = batch_size, device
        self.scores = {name: [] for name in EPOCH_SCORES}

    def __call__(self) -> torch.Tensor:
        if self.labels is None:
            return predict(self.model, self.x, self.batch_size, self.device)
        pred, scores = predict(self.model, self.x, self.batch_size, self.device, self.labels)
        for name, v in scores.items():
            self.scores[name].append(v)
        return pred


def _epoch(model, data, perm, optimizer, batch_size) -> float:
    """One pass over ``data = (x, y)`` in the order ``perm``; the mean training loss."""
    (xt, yt), (opt, sched) = data, optimizer
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    total = 0.0
    for i in range(0, xt.shape[0], batch_size):
        idx = perm[i:i + batch_size]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xt[idx]), yt[idx])
        loss.backward()
        opt.step()
        sched.step()
        total += float(loss.detach()) * idx.shape[0]
    return total / xt.shape[0]
