"""The embedding store and the run's disk cache (pdepth.depth.cache, pdepth.protocol.scoring;
docs/design.md section 12): the same results in RAM, on disk, in blocks and in several
passes; a truncated forward pass; resuming per probe; the disk check; the clean-up."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from run_helpers import needs_fmnist, real_run
from torch import nn

import pdepth
from pdepth.cli import main
from pdepth.depth.cache import (
    LayerStore,
    block_rows,
    extract_to_store,
    layer_knn,
    plan_passes,
    self_block_rows,
    sub_spec,
)
from pdepth.depth.result import build_result
from pdepth.models import build_model
from pdepth.probes import ProbeRecorder, ProbeSpec, extract, resolve_probes
from pdepth.protocol import scoring

# --------------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------------


def _model_and_data(n=160, seed=0):
    torch.manual_seed(seed)
    model = build_model("cnn").eval()
    x = torch.randn(n, 1, 28, 28)
    rows = np.random.default_rng(seed).permutation(n)  # query order: support rows first
    return model, x, rows


@pytest.mark.parametrize("on_disk", [False, True])
def test_store_holds_what_one_extraction_pass_gives(tmp_path, on_disk):
    model, x, rows = _model_and_data()
    spec = resolve_probes(model, "cnn")
    dims = [t.shape[1] for t in extract(model, x[:1], spec).layers.values()]
    store = LayerStore(len(rows), dims, tmp_path if on_disk else None, "m")
    # two passes, the first truncated after block2, the second with the logits (the same
    # batches as extract(): a conv's float bits may depend on the batch it runs in)
    assert extract_to_store(model, x, rows, spec, [0, 1, 2], store, logits=False,
                            batch_size=64, device="cpu") is None
    logits = extract_to_store(model, x, rows, spec, [3, 4, 5], store, logits=True,
                              batch_size=64, device="cpu")
    want = extract(model, x[torch.as_tensor(rows)], spec, batch_size=64)
    assert torch.equal(logits, want.logits)
    for layer, t in enumerate(want.layers.values()):
        assert store.has(layer)
        assert torch.equal(store.rows(layer, 0, len(rows)), t)
        assert torch.equal(store.rows(layer, 7, 93), t[7:93])
    if on_disk:  # real .npy files, readable without pdepth
        a = np.load(tmp_path / "m.emb03.npy")
        assert a.dtype == np.float32 and np.array_equal(a, want.layers["block3"].numpy())
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"m.emb{i:02d}.npy"
                                                               for i in range(6)]


def _tied_store(folder):
    """A one-probe store of 150 integer rows (many tied distances), its first 90 the support
    set: ``(store, emb, labels, self_index)``."""
    g = torch.Generator().manual_seed(1)
    n, n_support, d = 150, 90, 40
    emb = torch.randint(-3, 4, (n, d), generator=g).float()
    labels = torch.randint(0, 4, (n_support,), generator=g)
    self_index = torch.cat([torch.arange(n_support), torch.full((n - n_support,), -1)])
    store = LayerStore(n, [d], folder, "m")
    store.open(0)
    store.write(0, emb[:61])
    store.write(0, emb[61:])
    store.commit(0)
    return store, emb, labels, self_index


@pytest.mark.parametrize("budget", [None, 10**9, 200_000, 40_000, 20_000])
@pytest.mark.parametrize("on_disk", [False, True])
def test_layer_knn_blocks_give_the_one_call_result(tmp_path, on_disk, budget):
    """A disk store is read in query x support blocks of half the budget each (40,000 bytes:
    one support block, four query blocks; 20,000: blocks of a few rows); the op's streaming
    merge makes them exact."""
    store, emb, labels, self_index = _tied_store(tmp_path if on_disk else None)
    n_support, k = len(labels), 7
    want = pdepth.knn_vote(emb, emb[:n_support], labels, k, 4, self_index=self_index).pred
    got = layer_knn(store, 0, labels, k=k, num_classes=4, self_index=self_index,
                    memory_budget=budget, counts=True)
    assert torch.equal(got.pred, want)
    neighbours = pdepth.knn(emb, emb[:n_support], k, self_index=self_index).index
    assert torch.equal(got.counts.long(), torch.nn.functional.one_hot(
        labels[neighbours], 4).sum(1))


def test_layer_knn_reads_a_one_block_support_set_once(tmp_path, monkeypatch):
    """The training rows (the support set against itself, symmetric path) are read block by
    block, each block once (the second of two stays held); then, for the held-out rows, a
    support set that fits one block is read once, not once per query block."""
    store, emb, labels, self_index = _tied_store(tmp_path)
    n_support = len(labels)
    q_rows, s_rows = block_rows(store, 0, n_support, 7, 40_000)
    t_rows = self_block_rows(store, 0, n_support, 7, 40_000)
    assert s_rows >= n_support and q_rows < store.n - n_support  # the case under test
    assert -(-n_support // t_rows) == 2
    reads = []
    rows = store.rows
    monkeypatch.setattr(store, "rows", lambda *a: reads.append(a[1:3]) or rows(*a))
    layer_knn(store, 0, labels, k=7, num_classes=4, self_index=self_index,
              memory_budget=40_000)
    assert reads[:2] == [(0, t_rows), (t_rows, n_support)], reads
    assert reads.count((0, n_support)) == 1
    assert len(reads) == 2 + 1 + -(-(store.n - n_support) // q_rows), reads


@pytest.mark.parametrize("budget", [None, 40_000])
def test_layer_knn_scores_the_training_rows_symmetrically(tmp_path, budget, monkeypatch):
    """The protocol's self index (the support rows' own, -1 after) takes the symmetric op
    for the support rows: each pair's keys once per direction, N (N - 1) pairs, plus the
    held-out rows' (n - N) N; the votes are the general path's. Any other self index takes
    the general path (n N pairs)."""
    monkeypatch.setattr(pdepth.ops, "SYMMETRIC_FILTERS", pdepth.ops.FILTERS)
    monkeypatch.setattr(pdepth.ops, "SYMMETRIC_MIN_D", 0)  # at this store's narrow rows
    store, emb, labels, self_index = _tied_store(tmp_path if budget else None)
    n, n_support = store.n, len(labels)
    want = torch.ops.pdepth.knn_vote(emb, emb[:n_support], labels, 7, 4, self_index, 0,
                                     "fp32")[0]
    pdepth.knn_stats(reset=True)
    got = layer_knn(store, 0, labels, k=7, num_classes=4, self_index=self_index,
                    memory_budget=budget)
    assert torch.equal(got.pred, want)
    assert pdepth.knn_stats()["pairs"] == n_support * (n_support - 1) + (n - n_support) * n_support
    other = self_index.clone()
    other[n_support] = 3  # a held-out row with a self match: not the protocol's form
    want = torch.ops.pdepth.knn_vote(emb, emb[:n_support], labels, 7, 4, other, 0, "fp32")[0]
    pdepth.knn_stats(reset=True)
    got = layer_knn(store, 0, labels, k=7, num_classes=4, self_index=other,
                    memory_budget=budget)
    assert torch.equal(got.pred, want)
    assert pdepth.knn_stats()["pairs"] == n * n_support


def test_store_engine_equals_stream_prediction_depth():
    """The store's path (extract, k-NN per probe, build_result) and the streaming driver give
    the same DepthResult (the support set is a whole number of batches, so that both compute
    every embedding in the same batch)."""
    model, x, rows = _model_and_data(n=140, seed=2)
    spec = resolve_probes(model, "cnn")
    n_s = 64
    labels = torch.randint(0, 10, (140,), generator=torch.Generator().manual_seed(3))
    support_labels = labels[torch.as_tensor(rows[:n_s])]
    self_index = torch.cat([torch.arange(n_s), torch.full((140 - n_s,), -1)])
    rt = torch.as_tensor(rows)
    want = pdepth.stream_prediction_depth(
        model, x[rt[:n_s]], support_labels, x[rt], probes=spec, k=5, self_index=self_index,
        query_labels=labels[rt], num_classes=10, example_index=rt, batch_size=32,
        memory_budget=None).result
    dims = [t.shape[1] for t in extract(model, x[:1], spec).layers.values()]
    store = LayerStore(140, dims)
    logits = extract_to_store(model, x, rows, spec, range(6), store, logits=True,
                              batch_size=32, device="cpu")
    layer_pred = torch.stack([layer_knn(store, layer, support_labels, k=5, num_classes=10,
                                        self_index=self_index, memory_budget=None).pred
                              for layer in range(6)])
    got = build_result(layer_pred, logits.argmax(1), query_labels=labels[rt], example_index=rt,
                       k=5, self_match="exclude", reference_mode="network", num_classes=10,
                       layer_names=spec.names)
    assert got.equals(want)


def test_plan_passes_fills_each_pass_and_refuses_a_probe_too_wide():
    # bytes per probe (n = 1): 40, 80, 120, 20; budget 160
    assert plan_passes([0, 1, 2, 3], [10, 20, 30, 5], 1, 160) == [[0, 1], [2, 3]]
    assert plan_passes([1, 3], [10, 20, 30, 5], 1, 160) == [[1, 3]]
    assert plan_passes([], [10], 1, 160) == []
    with pytest.raises(ValueError, match=r"probe 2 needs .* more than the"):
        plan_passes([0, 1, 2], [10, 20, 50], 1, 160)


class _Boom(nn.Module):
    def forward(self, x):
        raise AssertionError("the forward pass went past the last probe")


def test_truncated_forward_stops_after_the_last_probe(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), _Boom())
    spec = ProbeSpec(modules=["1", "2", "3"])
    part = sub_spec(spec, [0, 1])  # input and the Linear: no softmax, no logits
    assert part.names == ["input", "1"]
    with ProbeRecorder(model, part, truncate=True) as rec:
        layers, logits = rec.run(torch.randn(5, 12))
    assert logits is None and [t.shape for t in layers] == [(5, 12), (5, 6)]
    with ProbeRecorder(model, sub_spec(spec, [0]), truncate=True) as rec:  # no forward at all
        assert rec.run(torch.randn(5, 12))[1] is None
    with ProbeRecorder(model, part) as rec, pytest.raises(AssertionError, match="went past"):
        rec.run(torch.randn(5, 12))


# --------------------------------------------------------------------------------------------
# the run's disk cache
# --------------------------------------------------------------------------------------------

ONE_SEED = ["--subset", "200", "--epochs", "1", "--k", "3", "--seeds", "1", "--quiet"]
DISK = ["--memory-budget", "1"]  # 1 MiB: the 200 images' 6 probes (4.7 MiB) go to disk


@pytest.fixture(scope="module")
def ram_run(tmp_path_factory):
    return real_run(tmp_path_factory, "ram", ONE_SEED)


def _per_model(out):
    with np.load(out / "per_model.npz") as z:
        return {k: z[k] for k in z.files}


def _same_results(a, b):
    pa, pb = _per_model(a), _per_model(b)
    assert sorted(pa) == sorted(pb)
    for key in pa:
        assert np.array_equal(pa[key], pb[key]), key


@needs_fmnist
@pytest.mark.slow
def test_disk_cache_in_several_passes_equals_the_in_memory_run(ram_run, tmp_path,
                                                                monkeypatch):
    monkeypatch.setattr(scoring, "disk_budget", lambda folder: 200 * 3136 * 4 + 1)
    out = tmp_path / "run"
    assert main(["run", *ONE_SEED, *DISK, "--out", str(out)]) == 0
    _same_results(ram_run, out)
    assert not (out / "cache").exists()  # removed after use
    cfg = json.loads((out / "config.json").read_text())
    for meta in cfg["models"]:
        stages = meta["stages"]
        assert meta["memory"]["cache"] == "disk"
        assert len(stages["extract"]) >= 3  # block1 alone fills a pass
        assert [r["probe"] for r in stages["knn"]] == cfg["resolved"]["probes"]
        assert all(r["seconds"] >= 0 and r["peak_rss_bytes"] > 0 for r in stages["knn"])
        assert stages["train"]["seconds"] > 0
    ram = json.loads((ram_run / "config.json").read_text())["models"][0]
    assert ram["memory"]["cache"] == "memory" and len(ram["stages"]["extract"]) == 1
    page = (out / "report.html").read_text()
    assert "Time and memory per stage" in page and "3 pass(es)" in page and "on disk" in page


@needs_fmnist
@pytest.mark.slow
def test_interrupted_run_resumes_per_probe(ram_run, tmp_path, monkeypatch):
    from pdepth.protocol import model_run

    calls, trained = [], []
    real_knn, real_train = scoring.layer_knn, model_run.train_model

    def knn_then_stop(store, layer, *args, **kwargs):
        if len(calls) == 3 and not resumed:
            raise KeyboardInterrupt
        calls.append((store.prefix, layer))
        return real_knn(store, layer, *args, **kwargs)

    def counting_train(*args, **kwargs):
        trained.append(kwargs["desc"])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(scoring, "layer_knn", knn_then_stop)
    monkeypatch.setattr(model_run, "train_model", counting_train)
    out = tmp_path / "run"
    resumed = False
    assert main(["run", *ONE_SEED, *DISK, "--out", str(out)]) == 130
    cache = sorted(p.name for p in (out / "cache").iterdir())
    files = ["seed0-half0.emb03.npy", "seed0-half0.emb04.npy", "seed0-half0.emb05.npy",
             "seed0-half0.logits.npy", "seed0-half0.pred00.npy", "seed0-half0.pred01.npy",
             "seed0-half0.pred02.npy", "seed0-half0.train.pt", "seed0-half0.votes00.npy",
             "seed0-half0.votes01.npy", "seed0-half0.votes02.npy"]
    assert cache == sorted(files + [f + ".json" for f in files])  # each with its record
    resumed, calls[:], trained[:] = True, [], []
    assert main(["run", *ONE_SEED, *DISK, "--out", str(out)]) == 0
    # the first model: not trained again, only its last three probes scored
    assert trained == ["train seed 0 half 1"]
    assert calls == [("seed0-half0", 3), ("seed0-half0", 4), ("seed0-half0", 5)] + [
        ("seed0-half1", layer) for layer in range(6)]
    _same_results(ram_run, out)
    assert not (out / "cache").exists()


@needs_fmnist
def test_run_refused_before_training_when_the_cache_cannot_fit(tmp_path, monkeypatch,
                                                                capsys):
    from pdepth.protocol import model_run

    monkeypatch.setattr(scoring, "disk_budget", lambda folder: 200 * 3136 * 4 - 1)
    monkeypatch.setattr(model_run, "train_model", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "run"
    assert main(["run", *ONE_SEED, *DISK, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "widest probe alone needs" in err and "--memory-budget" in err, err
    assert not out.exists()  # refused before the output directory was touched


@needs_fmnist
@pytest.mark.slow
def test_keep_cache_leaves_readable_embeddings_in_query_order(tmp_path):
    from pdepth.data import load_subset, normalize_images
    from pdepth.protocol.config import split_halves

    out = tmp_path / "run"
    assert main(["run", *ONE_SEED, *DISK, "--keep-cache", "--out", str(out)]) == 0
    emb = np.load(out / "cache" / "seed0-half1.emb00.npy")  # the input probe
    images, _, _ = load_subset(subset=200, seed=0)
    x = normalize_images(images).reshape(200, -1).numpy()
    train, held = split_halves(200, 0)[1], split_halves(200, 0)[0]
    assert np.array_equal(emb, x[np.concatenate([train, held])])
    # a rerun with --overwrite deletes the cache with the rest of pdepth's files
    assert main(["run", *ONE_SEED, "--overwrite", "--out", str(out)]) == 0
    assert not (out / "cache").exists()


def test_layer_knn_progress_bar(tmp_path, capsys):
    """``progress`` draws a bar over the (query, support) blocks of the probe."""
    store, emb, labels, self_index = _tied_store(tmp_path)
    n_support = len(labels)
    q_rows, s_rows = block_rows(store, 0, n_support, 7, 20_000)
    blocks = -(-n_support // self_block_rows(store, 0, n_support, 7, 20_000))
    layer_knn(store, 0, labels, k=7, num_classes=4, self_index=self_index,
              memory_budget=20_000, progress=True, desc="k-NN probe0")
    steps = blocks * (blocks + 1) // 2 + -(-(store.n - n_support) // q_rows) * -(
        -n_support // s_rows)
    err = capsys.readouterr().err
    assert "k-NN probe0" in err and f"/{steps} " in err and "block" in err, err


def test_cache_space_message_names_the_folder_and_keeps_small_sizes(tmp_path, monkeypatch):
    # Regression: a small run's sizes printed as "0.0 GiB".
    from pdepth.protocol.errors import DiskSpaceError

    monkeypatch.setattr(scoring, "disk_budget", lambda folder: 1000)
    with pytest.raises(DiskSpaceError) as info:
        scoring.check_cache_space(tmp_path / "run", 200, [784, 3136], memory_budget=0)
    msg = str(info.value)
    assert f"they go to {tmp_path / 'run' / 'cache'};" in msg and "\n" not in msg
    assert "(2.99 MiB over 2 probes)" in msg and "needs 2.39 MiB" in msg, msg
    assert "has 1000 B to spare" in msg, msg


def test_a_full_disk_names_the_cache_file(tmp_path, monkeypatch):
    # Regression: reserving a probe's file on a full disk said only "No space left on device".
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    store = LayerStore(10, [4], tmp_path, "seed0-half0")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"No space left on device: '.*seed0-half0\.emb00\.npy'"):
        store.open(0)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# a resume trusts no cache file unchecked (issue 23)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kept_cache_run(tmp_path_factory):
    """A finished disk-cache run that kept its cache (both models' trained weights, logits,
    predictions, votes and embeddings, each with its record)."""
    return real_run(tmp_path_factory, "kept", [*ONE_SEED, *DISK, "--keep-cache"])


def _rewrite_npy(path, change):
    np.save(path, change(np.load(path)), allow_pickle=False)


DAMAGE = {
    # the same size, other predictions
    "edited pred": lambda c: _rewrite_npy(c / "seed0-half0.pred02.npy", lambda a: (a + 1) % 10),
    "truncated pred": lambda c: (c / "seed0-half0.pred02.npy").write_bytes(
        (c / "seed0-half0.pred02.npy").read_bytes()[:300]),
    "wrong-shape votes": lambda c: _rewrite_npy(c / "seed0-half0.votes02.npy",
                                                lambda a: a[:, :3].copy()),
    "zeroed emb": lambda c: _zero_embeddings(c / "seed0-half0.emb03.npy"),
    "garbage train.pt": lambda c: (c / "seed0-half0.train.pt").write_bytes(b"garbage" * 99),
    # another model's weights, with its record
    "another model's train.pt": lambda c: [
        (c / f"seed0-half0.train.pt{ext}").write_bytes(
            (c / f"seed0-half1.train.pt{ext}").read_bytes()) for ext in ("", ".json")
        if (c / f"seed0-half1.train.pt{ext}").exists()],
    "another model's logits": lambda c: (c / "seed0-half0.logits.npy").write_bytes(
        (c / "seed0-half1.logits.npy").read_bytes()),
}


def _zero_embeddings(path):
    """Zeroes the embeddings of the .npy file ``path``, header kept; its predictions go, so
    that a resume must read the embeddings again."""
    data = bytearray(path.read_bytes())
    header = len(data) - np.load(path).nbytes
    data[header:] = bytes(len(data) - header)
    path.write_bytes(bytes(data))
    layer = path.name[-6:-4]
    for what in ("pred", "votes"):
        (path.parent / f"seed0-half0.{what}{layer}.npy").unlink()


@needs_fmnist
@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.slow
def test_resume_recomputes_a_damaged_or_foreign_cache_file(kept_cache_run, ram_run, tmp_path,
                                                           capsys, damage):
    """Every cache file a resume reads is checked against its record (owner, size, sha256)
    and its shape; one that fails is logged, deleted and computed again: the results are
    those of an uninterrupted run, never the damaged file's, and no traceback."""
    from run_helpers import copy_run

    out = copy_run(kept_cache_run, tmp_path)
    (out / "COMPLETE").unlink()
    (out / "models" / "seed0-half0.npz").unlink()
    DAMAGE[damage](out / "cache")
    stale = out / "cache" / ".pdepth.tmp-99999.seed0-half0.emb03.npy"  # left by a kill -9
    stale.write_bytes(b"half an embedding")
    capsys.readouterr()
    assert main(["run", *ONE_SEED[:-1], *DISK, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    _same_results(ram_run, out)
    assert "computing it again" in err or "extracting it again" in err, err
    assert "removed 1 temporary file(s)" in err and not stale.exists()


def test_a_store_file_is_trusted_only_as_its_record_says(tmp_path):
    """LayerStore with an owner: a file whose record is missing, another owner's, or whose
    content changed is not taken as stored (and is deleted)."""
    from pdepth.depth.cache import record_path

    model, x, rows = _model_and_data(n=40)
    spec = resolve_probes(model, "cnn")
    dims = [t.shape[1] for t in extract(model, x[:1], spec).layers.values()]
    owner = {"run": "a"}
    store = LayerStore(40, dims, tmp_path, "m", owner=owner)
    extract_to_store(model, x, rows, spec, [0, 1], store, logits=False, batch_size=16,
                     device="cpu")
    assert store.has(0) and store.has(1)
    lines = []
    assert LayerStore(40, dims, tmp_path, "m", owner=owner, log=lines.append).has(1)
    assert not LayerStore(40, dims, tmp_path, "m", owner={"run": "b"},
                          log=lines.append).has(1)
    assert not store.path(1).exists()  # deleted: extracted again
    data = bytearray(store.path(0).read_bytes())
    data[-1] ^= 1
    store.path(0).write_bytes(bytes(data))
    assert not LayerStore(40, dims, tmp_path, "m", owner=owner, log=lines.append).has(0)
    assert "belongs to something else (run differ)" in lines[0]
    assert "was changed after it was written" in lines[1]
    assert not store.path(0).exists() and not record_path(store.path(0)).exists()


def test_sub_spec_keeps_the_token_rule():
    from pdepth.families import TokenLayout

    spec = ProbeSpec(("a", "b"), token="mean", layout=TokenLayout(0, 2), max_dim=64,
                     preset="vit")
    sub = sub_spec(spec, [2, 3])  # input, a, b, softmax
    assert sub.modules == ("b",) and not sub.input and sub.softmax
    assert (sub.token, sub.layout, sub.max_dim, sub.preset) == ("mean", TokenLayout(0, 2), 64,
                                                                 "vit")


@pytest.mark.parametrize("budget", [None, 20_000])
def test_cosine_store_normalises_rows_as_written(tmp_path, budget):
    """metric="cosine": each row is stored normalised (written in two batches, read in
    blocks of a tiny budget), so the k-NN over the store is the vote over hand-normalised
    rows; the records say which metric a file holds."""
    g = torch.Generator().manual_seed(5)
    n, n_support, d, k = 150, 90, 40, 7
    emb = torch.randn(n, d, generator=g) * 3 + 1
    emb[10] = 0
    labels = torch.randint(0, 4, (n_support,), generator=g)
    self_index = torch.cat([torch.arange(n_support), torch.full((n - n_support,), -1)])
    store = LayerStore(n, [d], tmp_path, "m", owner={"run": "x"}, metric="cosine")
    store.open(0)
    store.write(0, emb[:61])
    store.write(0, emb[61:])
    store.commit(0)
    unit = pdepth.normalize_rows(emb)
    assert torch.equal(store.rows(0, 0, n), unit)
    got = layer_knn(store, 0, labels, k=k, num_classes=4, self_index=self_index,
                    memory_budget=budget)
    want = pdepth.knn_vote(unit, unit[:n_support], labels, k, 4, self_index=self_index).pred
    assert torch.equal(got.pred, want)
    assert json.loads((tmp_path / "m.emb00.npy.json").read_text())["owner"]["metric"] == "cosine"
    # a Euclidean store does not take the cosine file as its own
    assert not LayerStore(n, [d], tmp_path, "m", owner={"run": "x"}).has(0)
    with pytest.raises(ValueError, match="metric .* got 'cos'"):
        LayerStore(n, [d], metric="cos")
