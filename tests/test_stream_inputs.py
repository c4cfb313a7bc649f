"""stream_prediction_depth: the inputs it reads (loaders and their labels) and the checks it
shares with prediction_depth. The equality with prediction_depth on clean inputs is tested in
test_stream.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pdepth
from pdepth import stream as stream_mod
from pdepth.probes import extract
from pdepth.stream import stream_prediction_depth

PROBES = ["1"]  # input, the hidden ReLU, softmax: three probes


def _model(classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, classes)).eval()


def _data(n=60, m=25, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, 6, generator=g) * 2
    ys = torch.arange(n) % classes
    xs = centres[ys] + torch.randn(n, 6, generator=g)
    yq = torch.randint(0, classes, (m,), generator=g)
    xq = centres[yq] + torch.randn(m, 6, generator=g)
    return xs, ys, xq, yq


def _want(model, xs, ys, xq, yq, k, **kw):
    sup = extract(model, xs, PROBES)
    qry = extract(model, xq, PROBES)
    return pdepth.prediction_depth(sup.layers, ys, qry.layers, network_pred=qry.logits,
                                   query_labels=yq, k=k, **kw)


# ---------------------------------------------------------------------------------------------
# Loaders: order and labels
# ---------------------------------------------------------------------------------------------


def test_shuffled_support_loader_is_refused():
    # Regression: the labels a shuffled loader yields were ignored, so the embeddings were
    # paired with other rows' support_labels and the depths came out wrong, silently.
    model = _model()
    xs, ys, xq, yq = _data()
    loader = DataLoader(TensorDataset(xs, ys), batch_size=16, shuffle=True)
    with pytest.raises(ValueError, match=r"^support is a DataLoader with a shuffling sampler "
                                         r"\(RandomSampler\).*shuffle=False"):
        stream_prediction_depth(model, loader, ys, xq, probes=PROBES, k=5, query_labels=yq)
    with pytest.raises(ValueError, match=r"^support is a DataLoader with a shuffling sampler"):
        stream_prediction_depth(model, loader, ys, probes=PROBES, k=5)  # scoring the support
    sampler = torch.utils.data.WeightedRandomSampler(torch.ones(60), 60)
    with pytest.raises(ValueError, match=r"WeightedRandomSampler"):
        stream_prediction_depth(model, DataLoader(TensorDataset(xs, ys), sampler=sampler),
                                ys, xq, probes=PROBES, k=5, query_labels=yq)
    queries = DataLoader(TensorDataset(xq, yq), batch_size=8, shuffle=True)
    with pytest.raises(ValueError, match=r"^queries is a DataLoader with a shuffling sampler"):
        stream_prediction_depth(model, xs, ys, queries, probes=PROBES, k=5)


def test_loader_labels_are_checked_against_support_labels():
    model = _model()
    xs, ys, xq, yq = _data()
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(3))
    # the loader's own order differs from the order of support_labels
    loader = DataLoader(TensorDataset(xs[perm], ys[perm]), batch_size=16)
    with pytest.raises(ValueError, match=r"^support yields labels that differ from "
                                         r"support_labels in \d+ of the 16 rows 0\.\.15"):
        stream_prediction_depth(model, loader, ys, xq, probes=PROBES, k=5, query_labels=yq)
    # the same order: equal to the tensor input and to prediction_depth
    loader = DataLoader(TensorDataset(xs, ys), batch_size=16)
    res = stream_prediction_depth(model, loader, ys, xq, probes=PROBES, k=5, query_labels=yq,
                                  batch_size=16)
    assert res.result.equals(_want(model, xs, ys, xq, yq, 5))
    # other labels on purpose (e.g. consensus labels): allowed with check_loader_labels=False
    consensus = ys.clone()
    consensus[:10] = (consensus[:10] + 1) % 3
    with pytest.raises(ValueError, match="check_loader_labels=False"):
        stream_prediction_depth(model, loader, consensus, xq, probes=PROBES, k=5,
                                query_labels=yq)
    res = stream_prediction_depth(model, loader, consensus, xq, probes=PROBES, k=5,
                                  query_labels=yq, check_loader_labels=False)
    assert res.result.equals(_want(model, xs, consensus, xq, yq, 5))
    # the query loader's labels are checked against query_labels when both are given
    queries = DataLoader(TensorDataset(xq, yq.flip(0)), batch_size=8)
    with pytest.raises(ValueError, match=r"^queries yields labels that differ from "
                                         r"query_labels"):
        stream_prediction_depth(model, xs, ys, queries, probes=PROBES, k=5, query_labels=yq)
    # ... and used when query_labels is not given
    queries = DataLoader(TensorDataset(xq, yq), batch_size=8)
    res = stream_prediction_depth(model, xs, ys, queries, probes=PROBES, k=5)
    assert torch.equal(res.result.labels, yq)


# ---------------------------------------------------------------------------------------------
# The checks prediction_depth makes
# ---------------------------------------------------------------------------------------------


def test_float_labels_and_references_are_refused():
    # Regression: float labels and references were truncated with .long().
    model = _model()
    xs, ys, xq, yq = _data()
    kw = dict(probes=PROBES, k=5)
    with pytest.raises(ValueError, match=r"^support_labels must hold integer class ids"):
        stream_prediction_depth(model, xs, ys + 0.5, xq, query_labels=yq, **kw)
    with pytest.raises(ValueError, match=r"^query_labels must hold integer class ids"):
        stream_prediction_depth(model, xs, ys, xq, query_labels=yq + 0.5, **kw)
    with pytest.raises(ValueError, match=r"^reference must hold integer class ids"):
        stream_prediction_depth(model, xs, ys, xq, reference=yq.double(), **kw)
    queries = DataLoader(TensorDataset(xq, yq + 0.5), batch_size=8)
    with pytest.raises(ValueError, match=r"the labels the query loader yields must hold "
                                         r"integer class ids"):
        stream_prediction_depth(model, xs, ys, queries, **kw)


def test_out_of_range_reference_and_self_index_are_refused():
    # Regression: these were accepted, where prediction_depth rejects them.
    model = _model()
    xs, ys, xq, yq = _data()
    kw = dict(probes=PROBES, k=5, query_labels=yq)
    with pytest.raises(ValueError, match=r"^reference must hold class ids >= 0"):
        stream_prediction_depth(model, xs, ys, xq, reference=yq - 1, **kw)
    with pytest.raises(ValueError, match=r"^reference must lie in \[0, num_classes=3\)"):
        stream_prediction_depth(model, xs, ys, xq, reference=yq + 1, num_classes=3, **kw)
    with pytest.raises(ValueError, match=r"^reference has 24 entries but there are 25 queries"):
        stream_prediction_depth(model, xs, ys, xq, reference=yq[:24], **kw)
    bad = torch.full((25,), -1)
    bad[3] = 60
    with pytest.raises(ValueError, match=r"^self_index must hold -1 \(no self match\) or a "
                                         r"support index in \[0, N=60\), got values in "
                                         r"\[-1, 60\]"):
        stream_prediction_depth(model, xs, ys, xq, self_index=bad, **kw)
    with pytest.raises(ValueError, match=r"^self_index must hold -1"):
        stream_prediction_depth(model, xs, ys, xq, self_index=torch.full((25,), -3), **kw)
    with pytest.raises(ValueError, match=r"^support_labels must hold class ids >= 0"):
        stream_prediction_depth(model, xs, ys - 1, xq, **kw)
    with pytest.raises(ValueError, match=r"^reference must be one of"):
        stream_prediction_depth(model, xs, ys, xq, reference="consensus", **kw)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        stream_prediction_depth(model, xs, ys, xq, probes=PROBES, k=2.5)


def test_classes_absent_from_the_support_set():
    # support split with class 0 only, queries labelled 0 and 1: as prediction_depth
    model = _model()
    xs, _, xq, _ = _data()
    ys = torch.zeros(60, dtype=torch.long)
    yq = torch.arange(25) % 2
    res = stream_prediction_depth(model, xs, ys, xq, probes=PROBES, k=5, query_labels=yq,
                                  reference="labels")
    sup = extract(model, xs, PROBES)
    qry = extract(model, xq, PROBES)
    want = pdepth.prediction_depth(sup.layers, ys, qry.layers, reference="labels",
                                   query_labels=yq, k=5)
    assert res.result.equals(want) and res.result.num_classes == 2
    assert res.result.layer_pred.eq(0).all()
    assert res.result.depth.tolist() == [0 if y == 0 else 3 for y in yq.tolist()]


# ---------------------------------------------------------------------------------------------
# Too few usable support points: never a vote over empty slots
# ---------------------------------------------------------------------------------------------


def test_empty_slots_never_reach_the_vote(monkeypatch):
    # Regression: an empty slot (index -1) was looked up as labels[-1], the last support
    # label, and voted. Whatever leaves a slot empty, the stream raises naming k.
    model = _model()
    xs, ys, xq, yq = _data()
    real = stream_mod.knn

    def short_knn(*args, **kwargs):  # a support stream that leaves the last slot empty
        top = real(*args, **kwargs)
        index = top.index.clone()
        index[:, -1] = -1
        return type(top)(top.dist, index)

    monkeypatch.setattr(stream_mod, "knn", short_knn)
    with pytest.raises(ValueError, match=r"^k=5 is larger than the usable support: query 0 "
                                         r"has only 4 support points to vote from \(support_labels "
                                         r"has N=60"):
        stream_prediction_depth(model, xs, ys, xq, probes=PROBES, k=5, query_labels=yq)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"k=60 is larger than the support set allows \(N=60, "
                                         r"one point excluded as self match\)"):
        stream_prediction_depth(model, xs, ys, probes=PROBES, k=60)
    res = stream_prediction_depth(model, xs, ys, probes=PROBES, k=59, batch_size=7)
    assert res.result.num_examples == 60
