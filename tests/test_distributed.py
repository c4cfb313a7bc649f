"""Support-set sharding over torch.distributed (pdepth.distributed, docs/design.md section 8).

2 and 3 CPU processes with gloo (spawned here, rendezvous through a file in tmp_path) each
hold a shard of the support set and compute the sharded k-NN, vote and prediction depth; the
parent compares every rank's results with the single-process ops: exact equality of
distances, indices, predictions and depths. Cases: uneven and empty shards, shards smaller
than k, ties across shard borders (duplicate integer-valued rows on both sides of a border),
self matches on another rank's shard, every self-match policy, float64. Plus the failure
protocol: a rank whose local step raises makes every rank raise a RuntimeError naming it, and
a rank that never joins makes the others fail within the process group's timeout.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pdepth
from pdepth import distributed as pdist
from pdepth.pipeline import load_results

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed gloo"
)

# ---------------------------------------------------------------------------------------------
# Cases (built identically in the parent and in every rank)
# ---------------------------------------------------------------------------------------------


def _tie_data(world: int):
    """Integer-valued support with duplicate rows on both sides of every shard border."""
    g = torch.Generator().manual_seed(7)
    base = torch.randint(-3, 4, (6, 4), generator=g).double()
    # Rows repeat with period 6, so every distinct point occurs in every shard of >= 6 rows;
    # 7 copies of each: the k nearest (k up to 12) are cut inside a run of exact ties.
    support = base.repeat(7, 1)
    labels = torch.arange(support.shape[0]) % 3
    queries = torch.cat([base[:3] + 0.5, support[[0, 13, 20, 41]]])  # 3 off-grid, 4 members
    self_index = torch.tensor([-1, -1, -1, 0, 13, 20, 41])
    return queries.float(), support.float(), labels, self_index


def _cases(world: int) -> dict:
    g = torch.Generator().manual_seed(world)
    n = 97
    support = torch.randn(n, 16, generator=g)
    labels = torch.randint(0, 5, (n,), generator=g)
    q_rows = torch.tensor([0, 5, 48, 49, 50, 96, 60, 33])
    queries = torch.cat([support[q_rows], torch.randn(5, 16, generator=g)])
    self_index = torch.cat([q_rows, torch.full((5,), -1)])
    even = [pdist.shard_range(n, r, world) for r in range(world)]
    sizes_even = [b - a for a, b in even]
    # Very uneven: a one-row shard, (for 3 ranks) an empty shard, the rest on the last rank.
    sizes_uneven = [1, n - 1] if world == 2 else [2, 0, n - 2]
    tq, ts, tl, tsi = _tie_data(world)
    tn = ts.shape[0]
    # Borders inside runs of duplicates: at 13 (and 27) rows.
    tie_sizes = [13, tn - 13] if world == 2 else [13, 14, tn - 27]
    cases = {}
    for policy in ("exclude", "include", "drop_nearest"):
        for name, sizes in (("even", sizes_even), ("uneven", sizes_uneven)):
            cases[f"rand-{name}-{policy}"] = dict(
                queries=queries, support=support, labels=labels, k=7, self_index=self_index,
                self_match=policy, sizes=sizes)
        cases[f"ties-{policy}"] = dict(
            queries=tq, support=ts, labels=tl, k=12, self_index=tsi, self_match=policy,
            sizes=tie_sizes)
    cases["float64"] = dict(queries=queries.double(), support=support.double(), labels=labels,
                            k=5, self_index=self_index, self_match="exclude", sizes=sizes_even)
    # k larger than every shard but one; k = N - 1 with exclusion (the whole support set).
    cases["k-large"] = dict(queries=queries, support=support, labels=labels, k=n - 1,
                            self_index=self_index, self_match="exclude", sizes=sizes_even)
    # metric="cosine": each rank normalises its own shard (pdepth.normalize_rows)
    cases["cosine"] = dict(queries=queries * 3, support=support + 0.5, labels=labels, k=7,
                           self_index=self_index, self_match="exclude", sizes=sizes_uneven,
                           metric="cosine")
    return cases


def _shard(case: dict, rank: int):
    sizes = case["sizes"]
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    return case["support"][start:stop], case["labels"][start:stop], start


def _depth_inputs(world: int):
    g = torch.Generator().manual_seed(100 + world)
    n, m = 61, 21
    centers = torch.randn(4, 6, generator=g) * 2
    labels = torch.randint(0, 4, (n,), generator=g)
    layers = [centers[labels] * s + torch.randn(n, 6, generator=g) for s in (0.3, 1.0, 3.0)]
    q_idx = torch.arange(0, n, 3)[:m]  # 21 queries
    query_layers = [x[q_idx] for x in layers]
    pred = torch.randint(0, 4, (m,), generator=g)
    sizes = [pdist.shard_range(n, r, world)[1] - pdist.shard_range(n, r, world)[0]
             for r in range(world)]
    return layers, labels, query_layers, q_idx, pred, sizes


def _stream_inputs():
    torch.manual_seed(0)
    model = pdepth.models.cnn().eval()
    g = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(70, 1, 28, 28, generator=g), torch.randint(0, 10, (70,), generator=g)
    xq = torch.cat([xs[30:45], torch.randn(10, 1, 28, 28, generator=g)])
    self_index = torch.cat([torch.arange(30, 45), torch.full((10,), -1)])
    kw = dict(probes="cnn", k=5, self_index=self_index, num_classes=10, batch_size=16,
              memory_budget=300_000)
    return model, xs, ys, xq, kw


# ---------------------------------------------------------------------------------------------
# Workers (spawned)
# ---------------------------------------------------------------------------------------------


def _init(rank: int, world: int, init_file: str, seconds: float = 60.0) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=seconds))


def _finish() -> None:
    """The end of a worker whose results are saved: every rank meets in a barrier, then exits
    without tearing gloo down. A rank that exits while its peer is still destroying the
    group can make gloo abort the peer (seen once in CI: SIGABRT, "terminate called without
    an active exception"), which is the transport's shutdown, not anything pdepth does."""
    dist.barrier()
    os._exit(0)


def _parity_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    _init(rank, world, init_file)
    results = {}
    try:
        for name, case in _cases(world).items():
            s, lab, off = _shard(case, rank)
            kw = dict(shard_offset=off, self_index=case["self_index"],
                      self_match=case["self_match"], metric=case.get("metric", "euclidean"))
            nb = pdist.knn(case["queries"], s, case["k"], **kw)
            vt = pdist.knn_vote(case["queries"], s, lab, case["k"], 5, **kw)
            vt_auto = pdist.knn_vote(case["queries"], s, lab, case["k"], **kw)
            results[name] = (nb.dist, nb.index, vt.pred, vt.dist, vt.index, vt_auto.pred)
        layers, labels, q_layers, q_idx, pred, sizes = _depth_inputs(world)
        start = sum(sizes[:rank])
        stop = start + sizes[rank]
        res = pdepth.prediction_depth(
            [x[start:stop] for x in layers], labels[start:stop], q_layers, network_pred=pred,
            self_index=q_idx, num_classes=4, k=5, shard_offset=start, vote_counts=True)
        results["depth"] = (res.depth, res.layer_pred, res.vote_counts)
        model, xs, ys, xq, kw = _stream_inputs()
        a, b = pdist.shard_range(xs.shape[0], rank, world)
        res = pdepth.stream_prediction_depth(model, xs[a:b], ys[a:b], xq, shard_offset=a,
                                             vote_counts=True, **kw)
        results["stream"] = (res.result.depth, res.result.layer_pred, res.num_chunks,
                             res.result.vote_counts)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    _finish()


def _failure_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    _init(rank, world, init_file, seconds=10.0)
    log = {}
    q = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))  # same on every rank
    s = torch.randn(5, 3)
    off = 5 * rank
    # (a) the local step raises on rank 1 only (labels out of range).
    lab = torch.zeros(5, dtype=torch.long) + (7 if rank == 1 else 0)
    try:
        pdist.knn_vote(q, s, lab, 3, 2, shard_offset=off)
        log["a"] = "no error"
    except Exception as exc:
        log["a"] = (type(exc).__name__, str(exc), repr(exc.__cause__))
    # (b) inconsistent shards (both ranks claim offset 0): ValueError everywhere.
    try:
        pdist.knn(q, s, 3, shard_offset=0)
        log["b"] = "no error"
    except Exception as exc:
        log["b"] = (type(exc).__name__, str(exc))
    # (c) the pg still works after (a) and (b).
    log["c"] = pdist.knn(q, s, 3, shard_offset=off).index
    torch.save(log, os.path.join(out_dir, f"rank{rank}.pt"))
    # (d) rank 1 hangs (alive, never calls): rank 0 fails at the process group's timeout.
    done = os.path.join(out_dir, "d_done")
    if rank == 1:
        deadline = time.monotonic() + 40
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.1)
        os._exit(0)
    t0 = time.monotonic()
    try:
        pdist.knn(q, s, 3, shard_offset=off)
        log["d"] = "no error"
    except Exception as exc:
        log["d"] = (type(exc).__name__, str(exc)[:300])
    log["d_seconds"] = time.monotonic() - t0
    torch.save(log, os.path.join(out_dir, f"rank{rank}.pt"))
    open(done, "w").close()
    os._exit(0)  # skip destroy_process_group with a hung peer


def _mismatch_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Inputs that agree in shape and range but not in value across the ranks."""
    _init(rank, world, init_file)
    log = {}
    q = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    s = torch.randn(5, 3, generator=torch.Generator().manual_seed(1 + rank))
    off = 5 * rank
    cases = {
        # (a) one query value differs on rank 1
        "queries": dict(queries=q + (q == q[2, 1]) * 1e-3 * rank),
        # (b) two queries swapped on rank 1 (same values, other order)
        "order": dict(queries=q[[0, 2, 1, 3]] if rank else q),
        # (c) self_index with the same shape, min and max, one value different
        "self_index": dict(queries=q, self_index=torch.tensor([0, 3 + rank, -1, 9])),
    }
    for name, kw in cases.items():
        try:
            pdist.knn(kw.pop("queries"), s, 3, shard_offset=off, **kw)
            log[name] = "no error"
        except Exception as exc:
            log[name] = (type(exc).__name__, str(exc))
    ok = pdist.knn(q, s, 3, shard_offset=off, self_index=torch.tensor([0, 3, -1, 9]))
    log["ok"] = ok.index  # the group still works
    # (d) pdepth.run with different settings per rank: refused before any work
    if os.path.exists(_FMNIST):
        try:
            pdepth.run(pdepth.RunConfig(**{**_SMALL_RUN, "k": 5 + rank}),
                       os.path.join(out_dir, "run"), progress=False,
                       process_group=dist.group.WORLD)
            log["run"] = "no error"
        except Exception as exc:
            log["run"] = (type(exc).__name__, str(exc))
    torch.save(log, os.path.join(out_dir, f"rank{rank}.pt"))
    _finish()


@pytest.mark.slow
def test_ranks_with_different_values_fail_every_rank(tmp_path):
    per_rank = _spawn(_mismatch_worker, 2, tmp_path)
    for rank, log in enumerate(per_rank):
        for name, what in (("queries", "queries"), ("order", "queries"),
                           ("self_index", "self_index")):
            assert log[name][0] == "ValueError", (rank, name, log[name])
            assert f"the {what} (checksum" in log[name][1], (rank, name, log[name])
        assert log["ok"].shape == (4, 3)
        if os.path.exists(_FMNIST):
            assert log["run"][0] == "ValueError", (rank, log["run"])
            assert "settings differ (k: rank 0 5, rank 1 6)" in log["run"][1], log["run"]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _spawn(fn, world: int, tmp_path) -> list[dict]:
    init_file = str(tmp_path / "rdzv")
    try:
        mp.start_processes(fn, args=(world, init_file, str(tmp_path)), nprocs=world,
                           join=True, start_method="spawn")
    except Exception:
        traceback.print_exc()
        raise
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_shard_range():
    for n in (0, 1, 7, 97, 100):
        for world in (1, 2, 3, 8):
            ranges = [pdist.shard_range(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        pdist.shard_range(5, 2, 2)


def test_needs_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        pdist.knn(torch.zeros(2, 2), torch.zeros(3, 2), 1, shard_offset=0)


def _expected(case: dict):
    kw = dict(self_index=case["self_index"], self_match=case["self_match"],
              metric=case.get("metric", "euclidean"))
    nb = pdepth.knn(case["queries"], case["support"], case["k"], **kw)
    vt = pdepth.knn_vote(case["queries"], case["support"], case["labels"], case["k"], 5, **kw)
    vt_auto = pdepth.knn_vote(case["queries"], case["support"], case["labels"], case["k"], **kw)
    return (nb.dist, nb.index, vt.pred, vt.dist, vt.index, vt_auto.pred)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.slow
def test_sharded_equals_single_process(world, tmp_path):
    per_rank = _spawn(_parity_worker, world, tmp_path)
    cases = _cases(world)
    names = ("dist", "index", "vote pred", "vote dist", "vote index", "vote pred (auto C)")
    for name, case in cases.items():
        want = _expected(case)
        for rank, results in enumerate(per_rank):
            assert name in results, f"rank {rank} did not finish case {name}"
            for what, got, exp in zip(names, results[name], want, strict=True):
                assert got.dtype == exp.dtype, (name, rank, what)
                assert torch.equal(got, exp), f"case {name}, rank {rank}: {what} differs"
    # The tie cases really cut through runs of equal distances that cross shard borders.
    tie = cases["ties-include"]
    d = _expected(tie)[0]
    assert (d[:, -1:] == d[:, :-1]).any()
    layers, labels, q_layers, q_idx, pred, _ = _depth_inputs(world)
    want = pdepth.prediction_depth(layers, labels, q_layers, network_pred=pred,
                                   self_index=q_idx, num_classes=4, k=5, vote_counts=True)
    for rank, results in enumerate(per_rank):
        depth, layer_pred, counts = results["depth"]
        assert torch.equal(depth, want.depth), rank
        assert torch.equal(layer_pred, want.layer_pred), rank
        assert torch.equal(counts, want.vote_counts), rank
    model, xs, ys, xq, kw = _stream_inputs()
    want = pdepth.stream_prediction_depth(model, xs, ys, xq, vote_counts=True, **kw)
    assert want.num_chunks > 1
    for rank, results in enumerate(per_rank):
        depth, layer_pred, chunks, counts = results["stream"]
        assert torch.equal(depth, want.result.depth), rank
        assert torch.equal(layer_pred, want.result.layer_pred), rank
        assert torch.equal(counts, want.result.vote_counts), rank
        assert chunks == want.num_chunks


@pytest.mark.slow
def test_failing_rank_fails_every_rank(tmp_path):
    t0 = time.monotonic()
    log0, log1 = _spawn(_failure_worker, 2, tmp_path)
    for rank, log in enumerate((log0, log1)):
        kind, msg = log["a"][:2]
        assert kind == "RuntimeError", (rank, log["a"])
        assert "failed on rank(s) 1 of 2" in msg and "labels_shard must lie in" in msg, msg
        assert log["b"][0] == "ValueError" and "do not tile" in log["b"][1], (rank, log["b"])
        assert log["c"].shape == (4, 3)
    assert "ValueError" in log1["a"][2]  # the failing rank chains its own exception
    assert "ValueError" not in log0["a"][2]
    # The gloo timeout (10 s here) ends the wait; no rank waits forever.
    assert log0["d"][0] == "RuntimeError" and "handshake failed on rank 0" in log0["d"][1]
    assert 5 < log0["d_seconds"] < 30, log0
    assert time.monotonic() - t0 < 55


def test_sharded_argument_errors_before_any_collective():
    """Argument errors that every rank sees alike are raised before any collective."""
    x = [torch.zeros(4, 2)]
    with pytest.raises(ValueError, match="needs shard_offset"):
        pdepth.prediction_depth(x, torch.zeros(4, dtype=torch.long), x, reference="labels",
                                query_labels=torch.zeros(4, dtype=torch.long),
                                process_group=object())
    with pytest.raises(ValueError, match="query_layers= and num_classes="):
        pdepth.prediction_depth(x, torch.zeros(4, dtype=torch.long), reference="labels",
                                shard_offset=0, num_classes=2)
    with pytest.raises(ValueError, match="query_layers= and num_classes="):
        pdepth.prediction_depth(x, torch.zeros(4, dtype=torch.long), x, reference="labels",
                                query_labels=torch.zeros(4, dtype=torch.long), shard_offset=0)
    with pytest.raises(ValueError, match="needs queries= and num_classes="):
        pdepth.stream_prediction_depth(torch.nn.Linear(2, 2), torch.zeros(4, 2),
                                       torch.zeros(4, dtype=torch.long), shard_offset=0)


# ---------------------------------------------------------------------------------------------
# The protocol with its models spread over ranks
# ---------------------------------------------------------------------------------------------

_FMNIST = os.path.join(pdepth.data.FASHION_MNIST_ROOT, "train-labels-idx1-ubyte.gz")
_SMALL_RUN = dict(subset=400, epochs=1, k=5, seeds=[0, 1])


def _pipeline_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    _init(rank, world, init_file)
    log = []
    pdepth.run(pdepth.RunConfig(**_SMALL_RUN), os.path.join(out_dir, "dist"), progress=False,
               log=log.append, process_group=dist.group.WORLD)
    try:  # results exist now: rank 0's OutputExistsError must reach every rank
        pdepth.run(pdepth.RunConfig(**_SMALL_RUN), os.path.join(out_dir, "dist"),
                   progress=False, process_group=dist.group.WORLD)
        again = "no error"
    except Exception as exc:
        again = (type(exc).__name__, str(exc))
    torch.save({"log": log, "again": again}, os.path.join(out_dir, f"rank{rank}.pt"))
    _finish()


@pytest.mark.skipif(not os.path.exists(_FMNIST), reason="Fashion-MNIST not installed")
@pytest.mark.slow
def test_run_spreads_models_over_ranks(tmp_path, restore_num_threads):
    per_rank = _spawn(_pipeline_worker, 2, tmp_path)
    torch.set_num_threads(1)  # as in the ranks: training is then bit-reproducible
    pdepth.run(pdepth.RunConfig(**_SMALL_RUN), tmp_path / "single", progress=False)
    _, got, _ = load_results(tmp_path / "dist")
    _, want, _ = load_results(tmp_path / "single")
    assert sorted(got) == sorted(want)
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    # 4 models (2 seeds x 2 halves, job j = 2 * seed + half): rank r trained jobs r and r + 2,
    # i.e. half r of both seeds.
    for rank, res in enumerate(per_rank):
        trained = sorted(m.split(":")[0].strip() for m in res["log"] if ": train " in m)
        assert trained == [f"seed 0 half {rank}", f"seed 1 half {rank}"], res["log"]
        kind, msg = res["again"]
        assert kind == "RuntimeError" and "failed on rank(s) 0 of 2" in msg, res["again"]
        assert "already holds" in msg or "OutputExistsError" in msg, msg
    assert (tmp_path / "dist" / "COMPLETE").exists()
