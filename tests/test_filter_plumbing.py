"""``filter=`` (the k-NN op's filter format, pdepth.FILTERS) through everything above the ops:
prediction_depth, stream_prediction_depth, the sharded support set, the protocol and its
CLI (``--knn-filter``), and the compat shims.

The filter only decides which pairs get their canonical key computed, never the result, so
every path must give the same bits whatever the filter; the tests check that, that the
keyword really reaches the op (pdepth.knn_stats counts the pairs filtered in each format),
that a bad value raises ValueError naming the valid ones before any expensive work, and that
the filter is not part of the protocol key (a run resumes with another filter)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from run_helpers import TINY, needs_fmnist, one_error_line

import pdepth
from pdepth import models
from pdepth.cli import main
from pdepth.pipeline import MARKER, RunConfig

CPU_FILTERS = ("auto", "fp32", "bf16", "bf16x3")  # tf32 is CUDA-only
D = 384  # >= 32: "auto" resolves to a bfloat16 filter on a CPU that has a bf16 GEMM
VALID = "'auto', 'fp32', 'bf16', 'bf16x3', 'tf32'"

needs_extension = pytest.mark.skipif(pdepth.backend() != "extension",
                                     reason="the compiled extension is not loaded (no stats)")


def _layers(n: int = 240, m: int = 0, seed: int = 0):
    """Three probes ``[n + m, D_l]`` (D_l = 384, 320, 12) of 4 noisy clusters, with exact
    ties: rows 200.. repeat rows 0.. (a duplicate at the same distance as its original, whose
    lower index must win whatever the filter). Returns (layers, labels [n + m])."""
    g = torch.Generator().manual_seed(seed)
    rows = n + m
    labels = torch.randint(0, 4, (rows,), generator=g)
    layers = []
    for dim, noise in ((D, 3.0), (320, 1.5), (12, 0.5)):
        centers = torch.randn(4, dim, generator=g)
        x = centers[labels] + noise * torch.randn(rows, dim, generator=g) + 5.0  # off-centre
        x[200:220] = x[:20]
        layers.append(x)
    labels[200:220] = labels[:20]
    return layers, labels


def _same(a: pdepth.DepthResult, b: pdepth.DepthResult) -> None:
    """Every array and setting of two DepthResults is identical."""
    assert a.equals(b)
    for f in dataclasses.fields(pdepth.DepthResult):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


def _bf16_pairs(fn) -> int:
    """The pairs the op filtered in bfloat16 while ``fn()`` ran."""
    pdepth.knn_stats(reset=True)
    fn()
    return pdepth.knn_stats()["pairs_bf16"]


# ------------------------------------------------------------------------------------------
# prediction_depth
# ------------------------------------------------------------------------------------------


@needs_extension
def test_auto_resolves_to_bf16_at_this_width():
    # What makes the "auto" cases below exercise the bfloat16 filter (on this CPU).
    plan = pdepth.knn_plan(D)
    if plan["filter"] == "fp32":
        pytest.skip(f"no bfloat16 GEMM on this CPU: {plan['reason']}")
    assert plan["filter"] == "bf16", plan


@pytest.mark.parametrize("filter", CPU_FILTERS)
def test_prediction_depth_same_for_every_filter(filter):
    layers, labels = _layers()
    want = pdepth.prediction_depth(layers, labels, reference="labels", k=7, filter="fp32")
    got = pdepth.prediction_depth(layers, labels, reference="labels", k=7, filter=filter)
    _same(got, want)
    assert int(want.depth.max()) > 0  # the probes disagree somewhere: depths are not trivial
    # queries of their own, with a network prediction as reference and self matches
    layers, labels = _layers(n=240, m=60, seed=1)
    sup, qry = [x[:240] for x in layers], [x[240:] for x in layers]
    qry[0][:10] = sup[0][30:40]
    self_index = torch.cat([torch.arange(30, 40), torch.full((50,), -1)])
    net = torch.randint(0, 4, (60,), generator=torch.Generator().manual_seed(3))
    kw = dict(network_pred=net, k=5, self_index=self_index, query_labels=labels[240:])
    _same(pdepth.prediction_depth(sup, labels[:240], qry, filter=filter, **kw),
          pdepth.prediction_depth(sup, labels[:240], qry, filter="fp32", **kw))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device: torch.cuda.is_available() is False")
def test_cuda_every_filter_including_tf32():
    """On CUDA every filter, "tf32" included, through both drivers: the same results."""
    device, filters = torch.device("cuda"), pdepth.FILTERS
    layers, labels = _layers()
    want = pdepth.prediction_depth(layers, labels, reference="labels", k=7, filter="fp32",
                                   device=device)
    for filter in filters:
        _same(pdepth.prediction_depth(layers, labels, reference="labels", k=7, filter=filter,
                                      device=device), want)
    model, xs, ys, xq, kw = _stream_data()
    model = model.to(device)
    want = pdepth.stream_prediction_depth(model, xs, ys, xq, filter="fp32", **kw)
    for filter in filters:
        _same(pdepth.stream_prediction_depth(model, xs, ys, xq, filter=filter, **kw).result,
              want.result)


@needs_extension
def test_prediction_depth_filter_reaches_the_op():
    layers, labels = _layers()

    def run(filter):
        return lambda: pdepth.prediction_depth(layers, labels, reference="labels", k=7,
                                               filter=filter)

    assert _bf16_pairs(run("bf16")) > 0
    assert _bf16_pairs(run("fp32")) == 0
    stats = pdepth.knn_stats()
    assert stats["pairs_fp32"] > 0 and stats["pairs_bf16x3"] == 0


def test_prediction_depth_bad_filter_before_any_layer():
    read = []

    def gen():
        for x in _layers()[0]:
            read.append(1)
            yield x

    labels = _layers()[1]
    for bad in ("nope", "BF16", None, 3):
        with pytest.raises(ValueError, match=f"prediction_depth\\(\\): filter must be one of "
                                             f"{VALID}"):
            pdepth.prediction_depth(gen(), labels, reference="labels", k=7, filter=bad)
    with pytest.raises(ValueError, match="'tf32' is a CUDA tensor-core format"):
        pdepth.prediction_depth(gen(), labels, reference="labels", k=7, filter="tf32",
                                device="cpu")
    assert not read  # nothing was read (a generator of layers was never advanced)
    # what depends on the embeddings is the op's: float64 takes only auto / fp32
    layers = [x.double() for x in _layers()[0]]
    with pytest.raises(ValueError, match=r"layer 0: .*filter='bf16' needs float32"):
        pdepth.prediction_depth(layers, labels, reference="labels", k=7, filter="bf16")
    _same(pdepth.prediction_depth(layers, labels, reference="labels", k=7, filter="auto"),
          pdepth.prediction_depth(layers, labels, reference="labels", k=7, filter="fp32"))


# ------------------------------------------------------------------------------------------
# stream_prediction_depth
# ------------------------------------------------------------------------------------------


def _stream_data():
    torch.manual_seed(0)
    model = models.cnn().eval()  # probes of 784, 3136, 1568, 576, 128, 10 features
    g = torch.Generator().manual_seed(5)
    xs, ys = torch.randn(90, 1, 28, 28, generator=g), torch.randint(0, 10, (90,), generator=g)
    xq = torch.cat([xs[20:35], torch.randn(15, 1, 28, 28, generator=g)])
    self_index = torch.cat([torch.arange(20, 35), torch.full((15,), -1)])
    kw = dict(probes="cnn", k=5, self_index=self_index, batch_size=8, memory_budget=400_000)
    return model, xs, ys, xq, kw


@functools.lru_cache(maxsize=1)
def _stream_fp32():
    model, xs, ys, xq, kw = _stream_data()
    return pdepth.stream_prediction_depth(model, xs, ys, xq, filter="fp32", **kw)


@pytest.mark.parametrize("filter", CPU_FILTERS)
def test_stream_same_for_every_filter(filter):
    model, xs, ys, xq, kw = _stream_data()
    want = _stream_fp32()
    got = pdepth.stream_prediction_depth(model, xs, ys, xq, filter=filter, **kw)
    assert want.num_chunks > 1  # the running top-k is streamed over several passes
    _same(got.result, want.result)
    assert torch.equal(got.logits, want.logits)
    # and equal to the embeddings-level driver with the same filter
    sup = pdepth.extract(model, xs, "cnn", batch_size=32)
    qry = pdepth.extract(model, xq, "cnn", batch_size=32)
    emb = pdepth.prediction_depth(sup.layers, ys, qry.layers, network_pred=qry.logits, k=5,
                                  self_index=kw["self_index"], filter=filter)
    assert got.result.equals(emb)


@needs_extension
def test_stream_filter_reaches_the_op():
    model, xs, ys, xq, kw = _stream_data()

    def run(filter):
        return lambda: pdepth.stream_prediction_depth(model, xs, ys, xq, filter=filter, **kw)

    assert _bf16_pairs(run("bf16")) > 0
    assert _bf16_pairs(run("fp32")) == 0


class _Untouchable(torch.nn.Module):
    """A model that must not run (the filter is checked first)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        raise AssertionError("the model ran before the filter was checked")


def test_stream_bad_filter_before_the_model_runs():
    model = _Untouchable()
    x, y = torch.zeros(8, 4), torch.zeros(8, dtype=torch.long)
    kw = dict(probes=["fc"], k=2)
    with pytest.raises(ValueError, match=f"stream_prediction_depth\\(\\): filter must be one "
                                         f"of {VALID}, got 'nope'"):
        pdepth.stream_prediction_depth(model, x, y, filter="nope", **kw)
    with pytest.raises(ValueError, match="'tf32' is a CUDA tensor-core format"):
        pdepth.stream_prediction_depth(model, x, y, filter="tf32", device="cpu", **kw)
    with pytest.raises(ValueError, match="filter='bf16' needs float32"):
        pdepth.stream_prediction_depth(model, x, y, filter="bf16", dtype=torch.float64, **kw)


# ------------------------------------------------------------------------------------------
# sharded support set (2 gloo processes)
# ------------------------------------------------------------------------------------------


def _sharded_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    from pdepth import distributed as pdist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        layers, labels = _layers(n=240, m=40, seed=2)
        sup, qry = [x[:240] for x in layers], [x[240:] for x in layers]
        a, b = pdist.shard_range(240, rank, world)
        pdepth.knn_stats(reset=True)
        vt = pdist.knn_vote(qry[0], sup[0][a:b], labels[a:b], 7, 4, shard_offset=a,
                            filter="bf16")
        results["vote"] = (vt.pred, vt.dist, vt.index)
        results["bf16_pairs"] = pdepth.knn_stats().get("pairs_bf16", 0)
        res = pdepth.prediction_depth(
            [x[a:b] for x in sup], labels[a:b], qry, reference="labels",
            query_labels=labels[240:], num_classes=4, k=7,
            shard=pdepth.ShardedSupport(a), filter="bf16")
        results["depth"] = (res.depth, res.layer_pred)
        # the ranks may use different filters: the result is the same bits
        res = pdepth.prediction_depth(
            [x[a:b] for x in sup], labels[a:b], qry, reference="labels",
            query_labels=labels[240:], num_classes=4, k=7,
            shard=pdepth.ShardedSupport(a), filter=("bf16", "fp32")[rank])
        results["mixed"] = (res.depth, res.layer_pred)
        model, xs, ys, xq, kw = _stream_data()
        a, b = pdist.shard_range(xs.shape[0], rank, world)
        res = pdepth.stream_prediction_depth(model, xs[a:b], ys[a:b], xq, num_classes=10,
                                             shard=pdepth.ShardedSupport(a), filter="bf16",
                                             **kw)
        results["stream"] = (res.result.depth, res.result.layer_pred)
        # a bad filter on every rank: ValueError before any collective
        try:
            pdepth.prediction_depth([x[a:b] for x in sup], labels[a:b], qry,
                                    reference="labels", query_labels=labels[240:],
                                    num_classes=4, k=7, shard=pdepth.ShardedSupport(a),
                                    filter="nope")
            results["bad"] = "no error"
        except Exception as exc:
            results["bad"] = (type(exc).__name__, str(exc))
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    os._exit(0)  # as tests/test_distributed.py: no gloo teardown race


@pytest.mark.skipif(not torch.distributed.is_available()
                    or not torch.distributed.is_gloo_available(), reason="gloo")
@pytest.mark.slow
def test_sharded_with_bf16_filter_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.start_processes(_sharded_worker, args=(world, str(tmp_path / "rdzv"), str(tmp_path)),
                       nprocs=world, join=True, start_method="spawn")
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    layers, labels = _layers(n=240, m=40, seed=2)
    sup, qry = [x[:240] for x in layers], [x[240:] for x in layers]
    vt = pdepth.knn_vote(qry[0], sup[0], labels[:240], 7, 4, filter="fp32")
    want = pdepth.prediction_depth(sup, labels[:240], qry, reference="labels",
                                   query_labels=labels[240:], num_classes=4, k=7,
                                   filter="fp32")
    model, xs, ys, xq, kw = _stream_data()
    want_stream = pdepth.stream_prediction_depth(model, xs, ys, xq, num_classes=10,
                                                 filter="fp32", **kw)
    for rank, res in enumerate(per_rank):
        for got, exp in zip(res["vote"], vt, strict=True):
            assert torch.equal(got, exp), rank
        if pdepth.backend() == "extension":
            assert res["bf16_pairs"] > 0, rank
        for key in ("depth", "mixed"):
            assert torch.equal(res[key][0], want.depth), (rank, key)
            assert torch.equal(res[key][1], want.layer_pred), (rank, key)
        assert torch.equal(res["stream"][0], want_stream.result.depth), rank
        assert torch.equal(res["stream"][1], want_stream.result.layer_pred), rank
        kind, msg = res["bad"]
        assert kind == "ValueError" and "filter must be one of" in msg, res["bad"]


# ------------------------------------------------------------------------------------------
# the protocol: RunConfig, the protocol key, the CLI
# ------------------------------------------------------------------------------------------


def test_run_config_filter_is_not_in_the_protocol_key():
    from pdepth.protocol.config import RUNTIME_KEYS, rank_settings

    base = RunConfig(subset=200, epochs=1, k=3)
    keys = {f: RunConfig(subset=200, epochs=1, k=3, knn_filter=f).protocol_key()
            for f in pdepth.FILTERS}
    assert set(keys.values()) == {base.protocol_key()}
    # the key of every existing run directory stays what it was: the hash of the settings
    # without device and root (the filter, the label noise and issue 14's settings did not
    # exist then)
    new_keys = ("device", "root", "knn_filter", "label_noise", "label_noise_seed",
                "image_size", "model", "checkpoint", "checkpoint_sha256", "download",
                "workers", "data_sha256", "keep_cache", "metric", "model_args")
    new_keys += ("token",)  # issue 24: --token, in the key only when given
    new_keys += ("el2n_epoch",)  # issue 25: a runtime setting, never in the key
    new_keys += ("noise_kind", "noise_matrix", "noise_matrix_sha256")  # issue 25: --noise-kind
    old = {k: v for k, v in base.to_dict().items() if k not in new_keys}
    old_key = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert base.accepted_keys()[1] == old_key  # still resumed (issue 23: the key of today
    del old["memory_budget"]  # leaves the memory budget out, a runtime setting)
    assert base.protocol_key() == hashlib.sha256(
        json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert "knn_filter" in RUNTIME_KEYS and base.to_dict()["knn_filter"] == "auto"
    # ranks may differ in it (it does not change their models)
    assert "knn_filter" not in rank_settings(base, "out", False)
    with pytest.raises(ValueError, match=r"knn_filter \(--knn-filter\) must be one of auto, "
                                         r"fp32, bf16, bf16x3, tf32, got 'nope'"):
        RunConfig(knn_filter="nope")


def test_cli_bad_knn_filter(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["run", "--knn-filter", "nope", "--out", str(out), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--knn-filter" in err and "'nope'" in err
    assert "auto, fp32, bf16, bf16x3, tf32" in err.replace("'", "")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="tf32 is valid with a GPU")
def test_cli_tf32_on_cpu_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    # checked against the device before the data is even looked for
    assert main(["run", "--knn-filter", "tf32", "--device", "cpu", "--root",
                 str(tmp_path / "nowhere"), "--out", str(out), "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "--knn-filter tf32" in err and "CUDA tensor-core format" in err
    assert not out.exists()


@needs_fmnist
@pytest.mark.slow
def test_cli_knn_filter_same_results_and_resumes_with_another(tiny_run, tmp_path, capsys):
    import pandas as pd

    # a whole run with --knn-filter fp32, the same as the default (auto: bf16 at the wide
    # probes on this CPU)
    fp32 = tmp_path / "fp32"
    pdepth.knn_stats(reset=True)
    assert main(["run", *TINY, "--knn-filter", "fp32", "--out", str(fp32)]) == 0
    if pdepth.backend() == "extension":  # the flag reached the op
        assert pdepth.knn_stats()["pairs_bf16"] == 0
    capsys.readouterr()
    marker = json.loads((fp32 / MARKER).read_text())["protocol_key"]
    assert marker == json.loads((tiny_run / MARKER).read_text())["protocol_key"]
    cfg = json.loads((fp32 / "config.json").read_text())
    assert cfg["config"]["knn_filter"] == "fp32"
    assert cfg["resolved"]["knn_filter"] == ["fp32"] * len(cfg["resolved"]["probe_dims"])
    assert [m["knn_filter"] for m in cfg["models"]] == ["fp32"] * 4
    auto = json.loads((tiny_run / "config.json").read_text())
    assert auto["config"]["knn_filter"] == "auto"
    assert auto["resolved"]["knn_filter"] == [
        pdepth.knn_plan(d)["filter"] for d in auto["resolved"]["probe_dims"]]
    _same_run(fp32, tiny_run, pd)

    # the same directory, unfinished (results and half the models gone), resumed with
    # --knn-filter bf16: the protocol key is the same, so the run resumes; the recomputed
    # models score with bf16 and the results are unchanged
    bf16 = tmp_path / "bf16"
    shutil.copytree(fp32, bf16)
    for name in ("COMPLETE", "results.parquet", "per_model.npz", "report.html"):
        (bf16 / name).unlink()
    for half in (0, 1):
        (bf16 / "models" / f"seed0-half{half}.npz").unlink()
    pdepth.knn_stats(reset=True)
    assert main(["run", *TINY, "--knn-filter", "bf16", "--out", str(bf16)]) == 0
    if pdepth.backend() == "extension":
        assert pdepth.knn_stats()["pairs_bf16"] > 0
    assert json.loads((bf16 / MARKER).read_text())["protocol_key"] == marker
    cfg = json.loads((bf16 / "config.json").read_text())
    assert cfg["config"]["knn_filter"] == "bf16"
    assert [m["knn_filter"] for m in cfg["models"]] == ["bf16", "bf16", "fp32", "fp32"]
    _same_run(bf16, fp32, pd)


def _same_run(a, b, pd) -> None:
    """results.parquet and per_model.npz of two run directories are identical."""
    ra, rb = pd.read_parquet(a / "results.parquet"), pd.read_parquet(b / "results.parquet")
    assert "train_depth" in ra.columns and "held_out_depth" in ra.columns
    pd.testing.assert_frame_equal(ra, rb)
    with np.load(a / "per_model.npz") as za, np.load(b / "per_model.npz") as zb:
        assert sorted(za.files) == sorted(zb.files)
        for name in za.files:
            assert np.array_equal(za[name], zb[name]), name


# ------------------------------------------------------------------------------------------
# compat shims
# ------------------------------------------------------------------------------------------


def _sk_data():
    layers, labels = _layers(n=240, m=50, seed=4)
    x = layers[0].numpy()
    return x[:240], labels[:240].numpy(), x[240:]


def test_sklearn_filter_parameter():
    pytest.importorskip("sklearn")
    from sklearn.base import clone

    from pdepth.compat.sklearn import KNeighborsClassifier

    x, y, xq = _sk_data()
    want = KNeighborsClassifier(7, dtype="float32", filter="fp32").fit(x, y)
    for filter in CPU_FILTERS:
        est = KNeighborsClassifier(7, dtype="float32", filter=filter)
        assert est.get_params()["filter"] == filter
        assert clone(est).filter == filter
        est.fit(x, y)
        assert np.array_equal(est.predict(xq), want.predict(xq))
        assert np.array_equal(est.predict(), want.predict())
        assert np.array_equal(est.predict_proba(xq), want.predict_proba(xq))
        for got, exp in zip(est.kneighbors(xq), want.kneighbors(xq), strict=True):
            assert np.array_equal(got, exp)
    # float64 (the default dtype) takes auto and fp32
    assert np.array_equal(KNeighborsClassifier(7).fit(x, y).predict(xq),
                          KNeighborsClassifier(7, filter="fp32").fit(x, y).predict(xq))
    assert KNeighborsClassifier().get_params()["filter"] == "auto"


def test_sklearn_bad_filter_raises_in_fit():
    pytest.importorskip("sklearn")
    from pdepth.compat.sklearn import KNeighborsClassifier

    x, y, _ = _sk_data()
    est = KNeighborsClassifier(7, filter="nope")  # stored as is
    assert est.filter == "nope"
    with pytest.raises(ValueError, match="filter"):
        est.fit(x, y)
    with pytest.raises(ValueError, match="filter='bf16' needs float32"):
        KNeighborsClassifier(7, filter="bf16").fit(x, y)  # float64 compute
    with pytest.raises(ValueError, match="'tf32' is a CUDA tensor-core format"):
        KNeighborsClassifier(7, dtype="float32", filter="tf32", device="cpu").fit(x, y)


@needs_extension
def test_sklearn_filter_reaches_the_op():
    pytest.importorskip("sklearn")
    from pdepth.compat.sklearn import KNeighborsClassifier

    x, y, xq = _sk_data()
    for filter, used in (("bf16", True), ("fp32", False)):
        est = KNeighborsClassifier(7, dtype="float32", filter=filter).fit(x, y)
        assert (_bf16_pairs(lambda est=est: est.predict(xq)) > 0) == used
        assert (_bf16_pairs(lambda est=est: est.kneighbors(xq)) > 0) == used
        assert (_bf16_pairs(lambda est=est: est.predict_proba(xq)) > 0) == used


def test_difficulty_shim_filter():
    from pdepth.compat.difficulty import prediction_depth

    layers, labels = _layers()
    want = prediction_depth(layers, labels, k=7, device="cpu", return_matches=True,
                            filter="fp32")
    for filter in CPU_FILTERS:
        got = prediction_depth(layers, labels, k=7, device="cpu", return_matches=True,
                               filter=filter)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if pdepth.backend() == "extension":
        assert _bf16_pairs(lambda: prediction_depth(layers, labels, k=7, device="cpu",
                                                    filter="bf16")) > 0
        assert _bf16_pairs(lambda: prediction_depth(layers, labels, k=7, device="cpu",
                                                    filter="fp32")) == 0
    with pytest.raises(ValueError, match=f"filter must be one of {VALID}"):
        prediction_depth(layers, labels, k=7, device="cpu", filter="nope")


def test_knndnn_shim_filter():
    from pdepth.compat.knndnn import knn_predict

    layers, labels = _layers()
    feat, bank = layers[0][:60], layers[0].t()
    for kw in (dict(), dict(rm_top1=False), dict(self_index=torch.arange(60)),
               dict(dist="cosine")):
        want = knn_predict(feat, bank, labels, 4, 7, 0.1, filter="fp32", **kw)
        for filter in CPU_FILTERS:
            got = knn_predict(feat, bank, labels, 4, 7, 0.1, filter=filter, **kw)
            assert torch.equal(got, want), (kw, filter)
    if pdepth.backend() == "extension":
        assert _bf16_pairs(lambda: knn_predict(feat, bank, labels, 4, 7, 0.1,
                                               filter="bf16")) > 0
        assert _bf16_pairs(lambda: knn_predict(feat, bank, labels, 4, 7, 0.1,
                                               filter="fp32")) == 0
    with pytest.raises(ValueError, match=f"filter must be one of {VALID}"):
        knn_predict(feat, bank, labels, 4, 7, 0.1, filter="nope")
