"""Streaming model-level depth (pdepth.stream_prediction_depth): the support set streamed
through the model batch by batch and merged into running top-k gives exactly the depth of
:func:`pdepth.prediction_depth` on the materialised embeddings. Its input checks:
tests/test_stream_inputs.py."""

from __future__ import annotations

import pytest
import torch

import pdepth
from pdepth import models


def _model():
    torch.manual_seed(0)
    model = models.cnn().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
    return model


# --------------------------------------------------------------------------------------------
# streaming == embeddings-level
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [None, 300_000])
def test_stream_equals_embedding_level_depth(budget, device):
    model = _model().to(device)
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(250, 1, 28, 28, generator=g), torch.randint(0, 10, (250,), generator=g)
    xq, yq = torch.randn(90, 1, 28, 28, generator=g), torch.randint(0, 10, (90,), generator=g)
    # the first 40 queries are support points 100..139 (self excluded), the rest are new
    xq[:40] = xs[100:140]
    self_index = torch.full((90,), -1)
    self_index[:40] = torch.arange(100, 140)
    res = pdepth.stream_prediction_depth(model, xs, ys, xq, probes="cnn", k=7,
                                         self_index=self_index, query_labels=yq, batch_size=32,
                                         memory_budget=budget, vote_counts=True,
                                         example_index=torch.arange(90) + 1000)
    sup = pdepth.extract(model, xs, "cnn", batch_size=32, storage=device)
    qry = pdepth.extract(model, xq, "cnn", batch_size=32, storage=device)
    want = pdepth.prediction_depth(sup.layers, ys, qry.layers, network_pred=qry.logits.cpu(),
                                   k=7, self_index=self_index, query_labels=yq, vote_counts=True,
                                   example_index=torch.arange(90) + 1000, device=device)
    assert res.result.equals(want)  # the vote counts too, chunk by chunk
    assert res.result.vote_counts is not None and res.result.vote_counts.shape == (6, 90, 10)
    assert res.num_chunks == (1 if budget is None else 3)
    assert res.peak_bytes > 0 and res.peak_rss_bytes > 0
    torch.testing.assert_close(res.logits, qry.logits.cpu())
    if device.type == "cuda":
        assert res.cuda_peak_bytes > 0


def test_stream_scores_support_itself_like_prediction_depth():
    model = _model()
    g = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(120, 1, 28, 28, generator=g), torch.randint(0, 10, (120,), generator=g)
    res = pdepth.stream_prediction_depth(model, xs, ys, probes="cnn", k=5, batch_size=50,
                                         memory_budget=1)
    sup = pdepth.extract(model, xs, "cnn", batch_size=50)
    want = pdepth.prediction_depth(sup.layers, ys, network_pred=sup.logits, k=5)
    assert res.result.equals(want)
    assert res.num_chunks == 3  # one batch per chunk at a tiny budget
    with pytest.raises(ValueError, match="k=120 is larger"):
        pdepth.stream_prediction_depth(model, xs, ys, probes="cnn", k=120)


def test_stream_scores_a_whole_support_chunk_symmetrically(monkeypatch):
    """One chunk holding the whole support set is scored against itself by the symmetric op
    (docs/design.md section 13: N (N - 1) pairs per probe, no second pass over the support
    set), with the general stream's result."""
    monkeypatch.setattr(pdepth.ops, "SYMMETRIC_FILTERS", pdepth.ops.FILTERS)
    monkeypatch.setattr(pdepth.ops, "SYMMETRIC_MIN_D", 0)  # at the cnn's narrow probes
    model = _model()
    g = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(100, 1, 28, 28, generator=g), torch.randint(0, 10, (100,), generator=g)
    pdepth.knn_stats(reset=True)
    res = pdepth.stream_prediction_depth(model, xs, ys, probes="cnn", k=5, batch_size=40)
    layers = res.result.layer_pred.shape[0]
    assert res.num_chunks == 1
    assert pdepth.knn_stats()["pairs"] == layers * 100 * 99
    monkeypatch.setattr(pdepth.ops, "SYMMETRIC", False)
    want = pdepth.stream_prediction_depth(model, xs, ys, probes="cnn", k=5, batch_size=40)
    assert res.result.equals(want.result)


@pytest.mark.parametrize("budget", [None, 1])
def test_stream_cosine_equals_prediction_depth_over_hand_normalised_embeddings(budget):
    """metric="cosine" normalises each batch's rows as recorded: chunks and support batches
    give prediction_depth over the hand-normalised embeddings."""
    model = _model()
    g = torch.Generator().manual_seed(4)
    xs, ys = torch.randn(100, 1, 28, 28, generator=g), torch.randint(0, 10, (100,), generator=g)
    xq = torch.randn(30, 1, 28, 28, generator=g)
    res = pdepth.stream_prediction_depth(model, xs, ys, xq, probes="cnn", k=5, batch_size=40,
                                         memory_budget=budget, metric="cosine")
    sup = pdepth.extract(model, xs, "cnn", batch_size=40)
    qry = pdepth.extract(model, xq, "cnn", batch_size=40)
    norm = pdepth.normalize_rows
    want = pdepth.prediction_depth([norm(t) for t in sup.layers.values()], ys,
                                   [norm(t) for t in qry.layers.values()],
                                   network_pred=qry.logits, k=5, num_classes=10)
    assert torch.equal(res.result.layer_pred, want.layer_pred)
    assert torch.equal(res.depth, want.depth)
    with pytest.raises(ValueError, match="metric must be .* got 'l2'"):
        pdepth.stream_prediction_depth(model, xs, ys, probes="cnn", k=5, metric="l2")


def test_stream_result_depth_is_the_tensor_and_the_old_spelling_warns():
    # res.depth is the depth tensor (as prediction_depth's); the DepthResult is res.result.
    # Before, res.depth was the DepthResult: res.depth.depth (and its other attributes) still
    # read the DepthResult's, with a DeprecationWarning.
    import copy
    import warnings

    g = torch.Generator().manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3))
    xs, ys = torch.randn(40, 16, generator=g), torch.arange(40) % 3
    res = pdepth.stream_prediction_depth(model, xs, ys, probes=["1", "3"], k=3)
    assert isinstance(res.result, pdepth.DepthResult)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        depth = res.depth
        assert isinstance(depth, torch.Tensor) and torch.equal(depth, res.result.depth)
        assert type(depth + 1) is torch.Tensor and type(copy.deepcopy(depth)) is torch.Tensor
    with pytest.warns(DeprecationWarning, match=r"res\.result\.depth"):
        assert torch.equal(res.depth.depth, res.result.depth)
    with pytest.warns(DeprecationWarning, match=r"res\.result\.layer_pred"):
        assert res.depth.layer_pred is res.result.layer_pred
    with pytest.raises(AttributeError):
        _ = res.depth.no_such_attribute
