"""The layers above the k-NN on CUDA (issue 28's device check): pdepth.score, `pdepth score
--device cuda` and prediction_depth in every filter mode give the CPU's depths on inputs whose
distances are exact in float32 or well separated. Skipped without a card; the k-NN op's own
CUDA cases are in tests/test_knn_cuda.py, the protocol's in tests/test_protocol.py."""

from __future__ import annotations

import json

import pytest
import torch
from run_helpers import needs_fmnist

import pdepth
from pdepth.cli import main

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def _net(seed=0, classes=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, classes)).eval()


def _data(n, seed, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_score_on_cuda_equals_cpu():
    """Integer weights and inputs: every activation exact on both devices (TF32 included)."""
    model = _net()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-2, 3, p.shape, generator=g).float())
    train, test = _data(60, 1), _data(20, 2)
    train, test = (train[0].round().clamp(-3, 3), train[1]), (test[0].round().clamp(-3, 3), test[1])
    kw = dict(probes=["1", "4"], k=3, memory_budget=None)
    cpu = pdepth.score(model, train, test, device="cpu", **kw)
    gpu = pdepth.score(model, train, test, device="cuda", **kw)
    for split in ("train", "test"):
        a, b = getattr(cpu, split), getattr(gpu, split)
        assert torch.equal(a.depth.cpu(), b.depth.cpu()), split
        assert torch.equal(a.layer_pred.cpu(), b.layer_pred.cpu()), split


@pytest.mark.parametrize("filter", ["fp32", "tf32", "bf16", "bf16x3", "auto"])
def test_prediction_depth_every_filter_on_cuda(filter):
    """Integer embeddings: every distance exact, so every format on CUDA gives the CPU's."""
    g = torch.Generator().manual_seed(3)
    layers = [torch.randint(-3, 4, (300, d), generator=g).float() for d in (5, 40, 700)]
    labels = torch.randint(0, 4, (300,), generator=g)
    kw = dict(k=5, num_classes=4, reference="labels")
    want = pdepth.prediction_depth(layers, labels, **kw)
    got = pdepth.prediction_depth([x.cuda() for x in layers], labels.cuda(), filter=filter, **kw)
    assert torch.equal(got.depth.cpu(), want.depth)
    assert torch.equal(got.layer_pred.cpu(), want.layer_pred)


@needs_fmnist
def test_cli_score_on_cuda_equals_cpu(tmp_path):
    pytest.importorskip("torchvision")
    pd = pytest.importorskip("pandas")
    base = ["score", "--model", "torchvision:resnet18", "--model-arg", "num_classes=10",
            "--probes", "layer1,layer4", "--subset", "24", "--test-subset", "8", "--k", "3",
            "--quiet"]
    torch.manual_seed(0)  # the same random weights in both runs
    assert main([*base, "--out", str(tmp_path / "cpu")]) == 0
    torch.manual_seed(0)
    assert main([*base, "--device", "cuda", "--out", str(tmp_path / "cuda")]) == 0
    cfg = json.loads((tmp_path / "cuda" / "config.json").read_text())
    assert cfg["status"] == "complete"
    a = pd.read_parquet(tmp_path / "cpu" / "results.parquet")
    b = pd.read_parquet(tmp_path / "cuda" / "results.parquet")
    assert a.dataset_index.tolist() == b.dataset_index.tolist()
    assert a.split.tolist() == b.split.tolist()
    # the convolutions round differently on the card, so a near tie may flip a probe's vote
    assert (a.depth == b.depth).mean() >= 0.85
