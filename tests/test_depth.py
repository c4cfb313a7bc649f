"""Prediction depth: the rule, the layer loop, reference modes, self-match policies, results
I/O, ensembles and bad input. The k-NN itself is tested elsewhere; here the oracle is
``pdepth.reference`` (float64) where an oracle is needed."""

from __future__ import annotations

import dataclasses
import gc
import weakref
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pdepth
from pdepth import DepthResult, aggregate, depth_from_predictions, prediction_depth
from pdepth import reference as ref_impl

# ---------------------------------------------------------------------------------------------
# Hand-built 1-D cases
# ---------------------------------------------------------------------------------------------

LABELS = torch.tensor([0, 0, 0, 1, 1, 1])
GOOD = torch.tensor([[0.0], [1.0], [2.0], [10.0], [10.25], [10.5]])
# Point 2 sits next to class 1's cluster: its nearest other point has label 1, while every
# other point's nearest other point keeps its own label.
BAD = torch.tensor([[0.0], [1.0], [9.5], [10.0], [10.25], [10.5]])


@pytest.mark.parametrize(
    "layers, expected_depth_of_point_2",
    [
        ([GOOD, GOOD, GOOD], 0),
        ([BAD, GOOD, GOOD], 1),
        ([GOOD, BAD, GOOD], 2),
        ([BAD, BAD, GOOD], 2),
        ([GOOD, GOOD, BAD], 3),  # the last probe disagrees: depth L
        ([BAD, GOOD, BAD], 3),
    ],
)
def test_hand_built_depths(layers, expected_depth_of_point_2):
    res = prediction_depth(layers, LABELS, reference="labels", k=1)
    expected = torch.zeros(6, dtype=torch.int64)
    expected[2] = expected_depth_of_point_2
    assert torch.equal(res.depth, expected)
    assert res.depth.dtype == torch.int64
    assert res.num_layers == 3 and res.layer_pred.shape == (3, 6)
    assert res.reference_mode == "labels" and res.k == 1 and res.self_match == "exclude"
    assert torch.equal(res.reference, LABELS)
    # point 2's probe prediction is 1 exactly on the BAD layers
    bad = torch.tensor([layer is BAD for layer in layers])
    assert torch.equal(res.layer_pred[:, 2] == 1, bad)
    assert torch.allclose(res.layer_accuracy, 1.0 - bad.double() / 6)
    assert torch.equal(res.layer_agreement, res.layer_accuracy)
    assert torch.equal(res.example_index, torch.arange(6))


def test_depth_is_num_layers_when_only_last_probe_disagrees():
    layers = [GOOD] * 5 + [BAD]
    res = prediction_depth(layers, LABELS, reference="labels", k=1)
    assert int(res.depth[2]) == 6 == res.num_layers


# Duplicates make the three self-match policies differ (k = 1):
# points 0 and 1 sit at the same place with different labels.
DUP_X = torch.tensor([[5.0], [5.0], [0.0], [20.0]])
DUP_Y = torch.tensor([0, 1, 0, 1])


@pytest.mark.parametrize(
    "self_match, expected_pred",
    [
        # exclude: each point skips its own index; 0 and 1 see each other.
        ("exclude", [1, 0, 0, 0]),
        # include: each point is its own nearest (ties to the lower index: 1 sees 0 first).
        ("include", [0, 0, 0, 1]),
        # drop_nearest: take 2, drop the first. Point 1's two nearest are (0, 1): it drops 0
        # and keeps itself -- the legacy failure mode.
        ("drop_nearest", [1, 1, 0, 0]),
    ],
)
def test_self_match_policies(self_match, expected_pred):
    res = prediction_depth([DUP_X], DUP_Y, reference="labels", k=1, self_match=self_match)
    assert res.layer_pred[0].tolist() == expected_pred
    assert res.self_match == self_match
    expected_depth = [0 if p == y else 1 for p, y in zip(expected_pred, DUP_Y.tolist(), strict=True)]
    assert res.depth.tolist() == expected_depth


def test_self_index_minus_one_means_no_self_match():
    res = prediction_depth([DUP_X], DUP_Y, reference="labels", k=1,
                           self_index=torch.full((4,), -1))
    inc = prediction_depth([DUP_X], DUP_Y, reference="labels", k=1, self_match="include")
    assert torch.equal(res.layer_pred, inc.layer_pred)


def test_query_layers_and_self_index():
    queries = torch.tensor([[0.4], [10.4], [6.1]])
    q_labels = torch.tensor([0, 1, 1])
    res = prediction_depth([GOOD, GOOD], LABELS, [queries, queries], reference="labels",
                           query_labels=q_labels, k=1)
    assert res.layer_pred.tolist() == [[0, 1, 1], [0, 1, 1]]  # 6.1 is nearest to 10 (label 1)
    assert res.depth.tolist() == [0, 0, 0]
    assert res.example_index is None
    # the same query carrying support index 3 (the point at 10) as its self index
    res = prediction_depth([GOOD], LABELS, [queries], reference="labels", query_labels=q_labels,
                           k=1, self_index=torch.tensor([-1, -1, 3]))
    assert res.layer_pred.tolist() == [[0, 1, 0]]  # 6.1 -> 2.0 (label 0) once 10 is skipped
    assert res.depth.tolist() == [0, 0, 1]


# ---------------------------------------------------------------------------------------------
# Reference modes
# ---------------------------------------------------------------------------------------------


def test_reference_network():
    net = torch.tensor([0, 0, 1, 1, 1, 1])  # the network calls point 2 class 1
    res = prediction_depth([BAD, GOOD, BAD], LABELS, reference="network", network_pred=net, k=1)
    # point 2 predictions per layer: 1, 0, 1 -> agrees with net at the last layer only
    assert res.depth.tolist() == [0, 0, 2, 0, 0, 0]
    assert res.reference_mode == "network"
    assert torch.equal(res.reference, net)
    assert res.layer_accuracy is not None  # labels are known when scoring the support itself
    logits = torch.nn.functional.one_hot(net, 2).double() * 3.0
    res2 = prediction_depth([BAD, GOOD, BAD], LABELS, network_pred=logits, k=1)
    assert torch.equal(res2.depth, res.depth)


def test_reference_network_needs_network_pred():
    with pytest.raises(ValueError, match="network_pred"):
        prediction_depth([GOOD], LABELS, k=1)


def test_reference_labels_needs_query_labels_for_queries():
    with pytest.raises(ValueError, match="query_labels"):
        prediction_depth([GOOD], LABELS, [GOOD], reference="labels", k=1)


def test_reference_last_probe():
    res = prediction_depth([BAD, GOOD, BAD], LABELS, reference="last_probe", k=1)
    assert torch.equal(res.reference, res.layer_pred[-1])
    assert res.depth.tolist() == [0, 0, 2, 0, 0, 0]
    assert int(res.depth.max()) < res.num_layers
    assert float(res.layer_agreement[-1]) == 1.0
    assert res.reference_mode == "last_probe"


def test_reference_tensor_and_numpy():
    target = torch.tensor([1, 1, 1, 1, 1, 1])
    res = prediction_depth([GOOD, GOOD], LABELS, reference=target, k=1)
    assert res.reference_mode == "tensor"
    assert res.depth.tolist() == [2, 2, 2, 0, 0, 0]
    res2 = prediction_depth([GOOD.numpy(), GOOD.numpy()], LABELS.numpy(),
                            reference=target.numpy(), k=1)
    assert res2.equals(res)


def test_no_labels_no_accuracy():
    q = torch.tensor([[0.1], [11.0]])  # predicted 0 and 1
    res = prediction_depth([GOOD], LABELS, [q], network_pred=torch.tensor([0, 0]), k=1)
    assert res.layer_accuracy is None and res.labels is None
    assert res.layer_agreement.tolist() == [0.5]
    assert res.depth.tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------
# Against the float64 oracle on random data
# ---------------------------------------------------------------------------------------------


def _oracle(support_layers, labels, query_layers, reference, k, self_match, self_index, c):
    preds = []
    for s, q in zip(support_layers, query_layers, strict=True):
        s = s.reshape(s.shape[0], -1).double()
        q = q.reshape(q.shape[0], -1).double()
        preds.append(ref_impl.knn_vote(q, s, labels, k, c, self_index=self_index,
                                       self_match=self_match)[0])
    layer_pred = torch.stack(preds)
    agree = layer_pred == reference
    depth = torch.full_like(reference, len(preds))
    for j in range(reference.shape[0]):
        for layer in range(len(preds), -1, -1):
            if layer == 0 or not agree[layer - 1, j]:
                depth[j] = layer
                break
    return layer_pred, depth


@pytest.mark.parametrize("self_match", ["exclude", "include", "drop_nearest"])
@pytest.mark.parametrize("scoring_support", [True, False])
def test_random_against_oracle(self_match, scoring_support):
    g = torch.Generator().manual_seed(7)
    n, m, c, k = 120, 40, 4, 7
    shapes = [(3, 2, 2), (16,), (8,), (4,)]
    support = [torch.randn(n, *s, generator=g, dtype=torch.float64) for s in shapes]
    labels = torch.randint(0, c, (n,), generator=g)
    if scoring_support:
        queries, self_index, q_labels = support, torch.arange(n), labels
    else:
        queries = [torch.randn(m, *s, generator=g, dtype=torch.float64) for s in shapes]
        # some queries are support points with their own index, others are new
        self_index = torch.full((m,), -1)
        for j in range(0, m, 3):
            for layer in range(len(shapes)):
                queries[layer][j] = support[layer][2 * j]
            self_index[j] = 2 * j
        q_labels = torch.randint(0, c, (m,), generator=g)
    net = torch.randint(0, c, (q_labels.shape[0],), generator=g)
    res = prediction_depth(
        support, labels, None if scoring_support else queries, network_pred=net,
        query_labels=None if scoring_support else q_labels, k=k, self_match=self_match,
        self_index=None if scoring_support else self_index, num_classes=c,
    )
    layer_pred, depth = _oracle(support, labels, queries, net, k, self_match, self_index, c)
    assert torch.equal(res.layer_pred, layer_pred)
    assert torch.equal(res.depth, depth)
    assert torch.equal(res.layer_accuracy, (layer_pred == q_labels).double().mean(1))
    assert res.num_classes == c


def test_float32_and_integer_embeddings():
    g = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (80, 6, 6), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (80,), generator=g)
    res = prediction_depth([pixels, pixels.float() / 255], labels, reference="labels", k=5)
    exact = _oracle([pixels.double(), pixels.double() / 255], labels,
                    [pixels.double(), pixels.double() / 255], labels, 5, "exclude",
                    torch.arange(80), 3)
    assert torch.equal(res.layer_pred, exact[0])


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


def _layers(n, seed, widths=(5, 9, 3, 7)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, w, generator=g) for w in widths]


@pytest.mark.slow
def test_generator_equals_list_and_keeps_one_layer_resident():
    support, queries = _layers(90, 0), _layers(30, 1)
    labels = torch.randint(0, 3, (90,), generator=torch.Generator().manual_seed(2))
    q_labels = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(3))
    expected = prediction_depth(support, labels, queries, reference="labels",
                                query_labels=q_labels, k=5)
    support_alive: list[weakref.ref] = []
    query_alive: list[weakref.ref] = []

    def stream(layers, alive, also_released):
        # When a stream makes layer i, its own earlier layers have been released (this
        # generator drops its reference on resuming), and since the support stream is advanced
        # first, the query stream also sees every earlier support layer released.
        for layer in layers:
            gc.collect()
            assert all(r() is None for r in alive)
            assert all(r() is None for r in also_released[:len(alive)])
            t = layer.clone()
            alive.append(weakref.ref(t))
            yield t
            del t  # runs when the caller asks for the next layer

    got = prediction_depth(stream(support, support_alive, []), labels,
                           stream(queries, query_alive, support_alive), reference="labels",
                           query_labels=q_labels, k=5)
    assert got.equals(expected)
    support_alive.clear()
    self_scored = prediction_depth(stream(support, support_alive, []), labels,
                                   reference="labels", k=5)
    assert self_scored.equals(prediction_depth(support, labels, reference="labels", k=5))


def test_ordered_dict_names_and_stacked_tensor():
    support = _layers(50, 4, widths=(6, 6, 6))
    labels = torch.arange(50) % 3
    named = OrderedDict([("stem", support[0]), ("block1", support[1]), ("softmax", support[2])])
    res = prediction_depth(named, labels, reference="labels", k=3)
    assert res.layer_names == ["stem", "block1", "softmax"]
    plain = prediction_depth(support, labels, reference="labels", k=3)
    assert torch.equal(res.depth, plain.depth) and plain.layer_names is None
    stacked = prediction_depth(torch.stack(support), labels, reference="labels", k=3)
    assert torch.equal(stacked.depth, plain.depth)


def test_progress_bar_runs(capsys):
    res = prediction_depth(_layers(30, 5), torch.arange(30) % 2, reference="labels", k=3,
                           progress=True)
    assert res.num_layers == 4
    assert "prediction depth" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# depth_from_predictions
# ---------------------------------------------------------------------------------------------


def test_depth_from_predictions_examples():
    layer_pred = torch.tensor([[1, 0, 1, 2], [1, 1, 1, 2], [1, 1, 0, 2]])
    reference = torch.tensor([1, 1, 1, 0])
    assert depth_from_predictions(layer_pred, reference).tolist() == [0, 1, 3, 3]
    out = depth_from_predictions(layer_pred.numpy(), reference.numpy())
    assert isinstance(out, np.ndarray) and out.dtype == np.int64
    assert out.tolist() == [0, 1, 3, 3]
    assert depth_from_predictions(torch.empty(0, 3, dtype=torch.long),
                                  torch.zeros(3, dtype=torch.long)).tolist() == [0, 0, 0]


def test_depth_from_predictions_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        depth_from_predictions(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="reference has 2 entries"):
        depth_from_predictions(torch.zeros(2, 3, dtype=torch.long),
                               torch.zeros(2, dtype=torch.long))


@st.composite
def _predictions(draw):
    num_layers = draw(st.integers(0, 8))
    m = draw(st.integers(0, 12))
    c = draw(st.integers(1, 4))
    flat = draw(st.lists(st.integers(0, c - 1), min_size=num_layers * m,
                         max_size=num_layers * m))
    ref = draw(st.lists(st.integers(0, c - 1), min_size=m, max_size=m))
    return (torch.tensor(flat, dtype=torch.int64).reshape(num_layers, m),
            torch.tensor(ref, dtype=torch.int64).reshape(m))


@settings(max_examples=200, deadline=None)
@given(_predictions())
def test_depth_from_predictions_properties(case):
    layer_pred, reference = case
    num_layers = layer_pred.shape[0]
    depth = depth_from_predictions(layer_pred, reference)
    assert depth.dtype == torch.int64 and depth.shape == reference.shape
    for j, d in enumerate(depth.tolist()):
        assert 0 <= d <= num_layers
        assert all(int(layer_pred[i, j]) == int(reference[j]) for i in range(d, num_layers))
        if d > 0:
            assert int(layer_pred[d - 1, j]) != int(reference[j])


# ---------------------------------------------------------------------------------------------
# Results: pandas, save / load
# ---------------------------------------------------------------------------------------------


def _result(**kw) -> DepthResult:
    support = _layers(40, 6, widths=(4, 5, 6))
    labels = torch.arange(40) % 3
    named = OrderedDict(zip(["a", "b", "c"], support, strict=True))
    return prediction_depth(named, labels, reference="labels", k=4, **kw)


@pytest.mark.parametrize("counts", [False, True])
@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_save_load_round_trip(tmp_path, suffix, counts):
    res = _result(vote_counts=counts)
    path = res.save(tmp_path / f"depth{suffix}")
    back = DepthResult.load(path)
    assert back.equals(res)
    assert (back.vote_counts is not None) == counts
    if counts:
        assert back.vote_counts.dtype == torch.int16 and back.vote_counts.shape == (3, 40, 3)
    assert back.layer_names == ["a", "b", "c"] and back.version == pdepth.__version__
    for name in ("depth", "layer_pred", "reference", "labels", "example_index"):
        assert getattr(back, name).dtype == torch.int64
    assert back.layer_accuracy.dtype == torch.float64
    if suffix == ".parquet":
        assert (tmp_path / "depth.parquet.json").exists()


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_save_load_without_labels_and_empty(tmp_path, suffix):
    q = _layers(0, 1, widths=(4, 5, 6))
    support = _layers(40, 6, widths=(4, 5, 6))
    res = prediction_depth(support, torch.arange(40) % 3, q,
                           network_pred=torch.zeros(0, dtype=torch.long), k=4)
    assert res.layer_accuracy is None and res.layer_agreement.isnan().all()
    back = DepthResult.load(res.save(tmp_path / f"empty{suffix}"))
    assert back.equals(res) and back.layer_accuracy is None and back.labels is None


def test_save_bad_suffix(tmp_path):
    with pytest.raises(ValueError, match="npz"):
        _result().save(tmp_path / "depth.csv")


def _edit_sidecar(path, sign=True, **changes):
    """Edits the parquet sidecar of ``path`` (a None value deletes the field); ``sign``
    recomputes its checksum, as a forger would, so that the other checks are reached."""
    import json

    from pdepth.depth import result as depth_mod

    sidecar = path.with_name(path.name + ".json")
    meta = json.loads(sidecar.read_text())
    meta.update(changes)
    for key in [key for key, value in changes.items() if value is None]:
        del meta[key]
    if sign and "sha256" in meta:
        meta["sha256"] = depth_mod._digest(meta)
    sidecar.write_text(json.dumps(meta))


def _arrays(res) -> dict:
    return {name: getattr(res, name).numpy() for name in
            ("depth", "layer_pred", "reference", "layer_agreement", "layer_accuracy",
             "labels", "example_index", "vote_counts") if getattr(res, name) is not None}


def _write_npz(path, arrays, meta, sign=True):
    """An npz as DepthResult.save writes it, from ``arrays`` and ``meta`` (signed with the
    format's checksum unless ``sign`` is False: a forger's file, to reach the other checks)."""
    import json

    from pdepth.depth import result as depth_mod

    meta = dict(meta)
    if sign:
        meta["sha256"] = depth_mod._digest(meta, arrays)
    np.savez(path, **arrays, meta=np.array(json.dumps(meta)))
    return path


def test_load_parquet_refuses_a_sidecar_from_another_save(tmp_path):
    # Regression: a stale sidecar (other query count) loaded silently as an inconsistent result.
    big, small = _result(), prediction_depth(_layers(10, 3, widths=(4, 5, 6)),
                                             torch.arange(10) % 3, reference="labels", k=2)
    path = big.save(tmp_path / "a.parquet")
    stale = (tmp_path / "a.parquet.json").read_text()
    small.save(path)
    (tmp_path / "a.parquet.json").write_text(stale)
    with pytest.raises(ValueError, match=r"a.parquet: the sidecar a.parquet.json does not "
                                         r"belong to this table"):
        DepthResult.load(path)
    # a version-1 sidecar (pdepth before the checksum) is still checked against the table
    _edit_sidecar(path, table_sha256=None, sha256=None, metric=None, format_version=1)
    with pytest.raises(ValueError, match=r"table has 10 rows but its sidecar .* "
                                         r"num_examples=40"):
        DepthResult.load(path)


def test_load_parquet_refuses_an_edited_sidecar(tmp_path):
    path = _result().save(tmp_path / "r.parquet")
    _edit_sidecar(path, num_layers=2)
    with pytest.raises(ValueError, match=r"num_layers=2 but the table has the prediction "
                                         r"columns \['pred_0', 'pred_1', 'pred_2'\]"):
        DepthResult.load(path)
    path = _result().save(tmp_path / "r.parquet")
    _edit_sidecar(path, layer_agreement=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"layer_agreement has shape \(2,\), expected \(3,\)"):
        DepthResult.load(path)
    (tmp_path / "r.parquet.json").unlink()
    with pytest.raises(ValueError, match="sidecar r.parquet.json is missing"):
        DepthResult.load(path)


def test_load_npz_refuses_inconsistent_arrays(tmp_path):
    # Regression: an npz whose depth is shorter than layer_pred loaded.
    res = _result()
    arrays, meta = _arrays(res), res._meta()
    _write_npz(tmp_path / "short.npz", {**arrays, "depth": arrays["depth"][:30]}, meta)
    with pytest.raises(ValueError, match=r"short.npz is not a consistent DepthResult "
                                         r"\(num_layers=3, 30 entries in depth\): layer_pred "
                                         r"has shape \(3, 40\), expected \(3, 30\)"):
        DepthResult.load(tmp_path / "short.npz")
    wrong = arrays["depth"].copy()
    wrong[0] = (wrong[0] + 1) % 4
    _write_npz(tmp_path / "wrong.npz", {**arrays, "depth": wrong}, meta)
    with pytest.raises(ValueError, match="depth does not follow from layer_pred and reference"):
        DepthResult.load(tmp_path / "wrong.npz")
    _write_npz(tmp_path / "layers.npz", arrays, {**meta, "num_layers": 4})
    with pytest.raises(ValueError, match=r"layer_pred has shape \(3, 40\), expected \(4, 40\)"):
        DepthResult.load(tmp_path / "layers.npz")
    _write_npz(tmp_path / "missing.npz", {"depth": arrays["depth"]}, meta)
    with pytest.raises(ValueError, match=r"missing arrays \['layer_agreement', 'layer_pred', "
                                         r"'reference'\]"):
        DepthResult.load(tmp_path / "missing.npz")


def _one_line_error(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


# Hostile edits of an npz as saved: (id, arrays -> arrays, meta -> meta, sign, message).
# Unsigned, each edit is caught by the checksum or a field's rule; signed (a forger
# recomputing the checksum), by the rule that the edited value breaks.


def _set(a, i, v):
    a = a.copy()
    a[i] = v
    return a


NPZ_EDITS = [
    ("labels", lambda a: {**a, "labels": _set(a["labels"], 0, 1)}, None, False,
     r"x.npz: its arrays or settings do not match the SHA-256 its meta records"),
    ("labels-signed", lambda a: {**a, "labels": _set(a["labels"], 0, 1)}, None, True,
     r"layer_accuracy is not the fraction of layer_pred equal to the labels"),
    ("labels-out-of-range", lambda a: {**a, "labels": _set(a["labels"], 0, 7)}, None, True,
     r"labels must lie in \[0, num_classes=3\), got values in \[0, 7\]"),
    ("accuracy", lambda a: {**a, "layer_accuracy": a["layer_accuracy"] * 0 + 1}, None, False,
     r"do not match the SHA-256"),
    ("accuracy-signed", lambda a: {**a, "layer_accuracy": a["layer_accuracy"] * 0 + 1}, None,
     True, r"layer_accuracy is not the fraction of layer_pred equal to the labels"),
    ("agreement-signed", lambda a: {**a, "layer_agreement": a["layer_agreement"] / 2}, None,
     True, r"layer_agreement is not the fraction of layer_pred equal to the reference"),
    ("accuracy-without-labels",
     lambda a: {k: v for k, v in a.items() if k != "labels"}, None, True,
     r"labels and layer_accuracy must be both present or both absent"),
    ("reference-not-labels", lambda a: {**a, "reference": _set(a["reference"], 0, 2),
                                        "depth": _set(a["depth"], 0, 3)}, None, True,
     r'reference_mode "labels" needs a reference equal to the labels'),
    ("float-depth", lambda a: {**a, "depth": a["depth"].astype(np.float64)}, None, True,
     r"x.npz: array depth has dtype float64, expected int64"),
    ("big-endian", lambda a: {**a, "depth": a["depth"].astype(">i8")}, None, True,
     r"array depth has dtype >i8, expected int64"),
    ("k", None, lambda m: {**m, "k": -4}, False,
     r"^\S*x.npz: k must be a positive integer, got -4$"),
    ("k-string", None, lambda m: {**m, "k": "4"}, True, r"k must be a positive integer, got '4'"),
    ("self-match", None, lambda m: {**m, "self_match": "bogus"}, False,
     r"self_match must be one of \('exclude', 'include', 'drop_nearest'\), got 'bogus'"),
    ("reference-mode", None, lambda m: {**m, "reference_mode": 3}, True,
     r"reference_mode must be one of"),
    ("num-classes", None, lambda m: {**m, "num_classes": 2**40}, True,
     r"num_classes must be an integer in 1..MAX_CLASSES=16777216, got 1099511627776"),
    ("num-classes-small", None, lambda m: {**m, "num_classes": 2}, True,
     r"vote_counts has shape \(3, 40, 3\), expected \(3, 40, 2\)"),
    ("pred-out-of-range", lambda a: {**a, "layer_pred": _set(a["layer_pred"], (0, 0), 5)},
     None, True, r"layer_pred must lie in \[0, num_classes=3\), got values in \[0, 5\]"),
    ("layer-names", None, lambda m: {**m, "layer_names": 5}, True,
     r"layer_names must be null or a list of strings, got 5"),
    ("version", None, lambda m: {**m, "format_version": "3"}, True,
     r"format_version must be a positive integer, got '3'"),
    ("future-version", None, lambda m: {**m, "format_version": 99}, True,
     r"has format version 99; this pdepth .* reads up to 4"),
    ("unknown-field", None, lambda m: {**m, "extra": 1}, True,
     r"meta of format version 4 has unknown fields \['extra'\]"),
    ("missing-field", None, lambda m: {k: v for k, v in m.items() if k != "k"}, True,
     r"meta of format version 4 lacks the fields \['k'\]"),
    ("no-checksum", None, lambda m: {k: v for k, v in m.items() if k != "sha256"}, False,
     r"meta of format version 4 lacks the fields \['sha256'\]"),
    ("v1-with-counts", None,
     lambda m: {**{k: v for k, v in m.items() if k not in ("sha256", "metric")},
                "format_version": 1}, False,
     r"a file of format version 1 holds no vote counts"),
    ("counts-signed", lambda a: {**a, "vote_counts": a["vote_counts"].astype(np.int32)}, None,
     True, r"vote_counts has dtype torch.int32, expected torch.int16 for k=4"),
]


@pytest.mark.parametrize("edit_arrays, edit_meta, sign, match", [e[1:] for e in NPZ_EDITS],
                         ids=[e[0] for e in NPZ_EDITS])
def test_load_npz_refuses_hostile_edits(tmp_path, edit_arrays, edit_meta, sign, match):
    # Regression: edited labels, accuracy, k=-4 or self_match="bogus" loaded; a bad field
    # raised KeyError / TypeError / AttributeError.
    from pdepth.depth import result as depth_mod

    res = _result(vote_counts=True)
    arrays = _arrays(res)
    meta = {**res._meta(), "sha256": depth_mod._digest(res._meta(), arrays)}  # as saved
    arrays = edit_arrays(arrays) if edit_arrays else arrays
    meta = edit_meta(meta) if edit_meta else meta
    _write_npz(tmp_path / "x.npz", arrays, meta, sign=sign)
    _one_line_error(lambda: DepthResult.load(tmp_path / "x.npz"), match)


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[:len(b) // 2], r"x.npz: not a readable .npz file \(BadZipFile: "),
    (lambda b: b"", r"x.npz: not a readable .npz file"),
    (lambda b: b"hello", r"x.npz: not a readable .npz file"),
])
def test_load_npz_refuses_a_damaged_file(tmp_path, damage, match):
    # Regression: a truncated npz raised zipfile.BadZipFile.
    path = _result().save(tmp_path / "x.npz")
    path.write_bytes(damage(path.read_bytes()))
    _one_line_error(lambda: DepthResult.load(path), match)
    np.save(tmp_path / "y.npz", np.arange(3))  # an .npy array under an .npz name
    (tmp_path / "y.npz.npy").rename(tmp_path / "y.npz")
    _one_line_error(lambda: DepthResult.load(tmp_path / "y.npz"), "not a readable .npz file")
    with pytest.raises(FileNotFoundError):
        DepthResult.load(tmp_path / "absent.npz")


def test_load_npz_of_format_2_without_a_checksum_still_loads(tmp_path):
    # pdepth before format 3 wrote no checksum into an npz: such a file loads, every other
    # rule applied; a checksum it does carry must match.
    res = _result(vote_counts=True)
    old = {**{k: v for k, v in res._meta().items() if k != "metric"}, "format_version": 2}
    back = DepthResult.load(_write_npz(tmp_path / "old.npz", _arrays(res), old, sign=False))
    assert back.equals(res)
    labels = _set(_arrays(res)["labels"], 0, 1)
    _write_npz(tmp_path / "old.npz", {**_arrays(res), "labels": labels}, old, sign=False)
    _one_line_error(lambda: DepthResult.load(tmp_path / "old.npz"),
                    r"layer_accuracy is not the fraction")


# Hostile edits of a parquet sidecar: (id, sidecar text or edit of its fields, sign, message)
SIDECAR_EDITS = [
    ("not-json", "{", False, r"r.parquet.json: not a JSON document \(JSONDecodeError: "),
    ("binary", b"\xff\xfe", False, r"r.parquet.json: not a JSON document"),
    ("list", "[1, 2]", False, r"r.parquet.json was not written by DepthResult.save"),
    ("missing", {"num_examples": None}, True, r"lacks the fields \['num_examples'\]"),
    ("agreement-type", {"layer_agreement": "x"}, True,
     r"layer_agreement must be a list of numbers, got 'x'"),
    ("num-layers-type", {"num_layers": "3"}, True,
     r"num_layers must be an integer >= 0, got '3'"),
    ("names-type", {"layer_names": 5}, True, r"layer_names must be null or a list of strings"),
    ("k", {"k": -4}, True, r"r.parquet.json: k must be a positive integer, got -4"),
    ("k-unsigned", {"k": 5}, False,
     r"r.parquet.json: its fields do not match the SHA-256 it records"),
    ("self-match", {"self_match": "bogus"}, True, r"self_match must be one of"),
    ("accuracy", {"layer_accuracy": [1.0, 1.0, 1.0]}, True,
     r"layer_accuracy is not the fraction of layer_pred equal to the labels"),
    ("no-table-checksum", {"table_sha256": None}, True,
     r"sidecar of format version 4 lacks the fields \['table_sha256'\]"),
    ("no-table-checksum-v2", {"table_sha256": None, "sha256": None, "metric": None,
                             "format_version": 2},
     False, r"sidecar of format version 2 lacks the fields \['table_sha256'\]"),
    ("no-checksum", {"sha256": None}, False,
     r"sidecar of format version 4 lacks the fields \['sha256'\]"),
    ("bad-checksum", {"table_sha256": "0" * 64}, True, r"does not belong to this table"),
    ("checksum-type", {"table_sha256": 7}, True, r"table_sha256 must be a SHA-256 in hex"),
    ("num-examples", {"num_examples": -1}, True, r"num_examples must be an integer >= 0"),
]


@pytest.mark.parametrize("edit, sign, match", [e[1:] for e in SIDECAR_EDITS],
                         ids=[e[0] for e in SIDECAR_EDITS])
def test_load_parquet_refuses_hostile_sidecars(tmp_path, edit, sign, match):
    # Regression: a malformed sidecar raised KeyError / TypeError / AttributeError, and
    # deleting table_sha256 switched the checksum off.
    path = _result().save(tmp_path / "r.parquet")
    sidecar = tmp_path / "r.parquet.json"
    if isinstance(edit, bytes):
        sidecar.write_bytes(edit)
    elif isinstance(edit, str):
        sidecar.write_text(edit)
    else:
        _edit_sidecar(path, sign=sign, **edit)
    _one_line_error(lambda: DepthResult.load(path), match)


def test_load_parquet_refuses_a_damaged_or_foreign_table(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = _result().save(tmp_path / "r.parquet")
    good = path.read_bytes()
    path.write_bytes(good[:100])
    _one_line_error(lambda: DepthResult.load(path), "does not belong to this table")
    # the same damage to a version-1 pair (no checksum): the table itself is unreadable
    _edit_sidecar(path, table_sha256=None, sha256=None, metric=None, format_version=1)
    _one_line_error(lambda: DepthResult.load(path), r"r.parquet: not a readable parquet table")
    # a table of the wrong column types, signed by a forger
    df = _result().to_pandas()
    for column, value in (("label", df["label"].astype("float64")), ("extra", df["depth"])):
        pq.write_table(pa.table(df.assign(**{column: value})), path)
        _edit_sidecar(path, table_sha256=__import__("hashlib").sha256(
            path.read_bytes()).hexdigest(), format_version=1, sha256=None, metric=None)
        _one_line_error(lambda: DepthResult.load(path),
                        r"column 'label' has type double, expected int64"
                        if column == "label" else r"columns a DepthResult does not write: "
                                                  r"\['extra'\]")


_CHILD = """
import os, sys
import pyarrow as pa
pa.set_cpu_count(32)  # the pool size of a large machine: the abort was frequent there
import torch
from pdepth.depth.result import DepthResult, build_result
labels = torch.arange(60) % 3
path = sys.argv[1]
build_result(torch.stack([labels] * 3), labels, query_labels=labels, example_index=None, k=3,
             self_match="exclude", reference_mode="labels", num_classes=3,
             layer_names=None).save(path)
threads = len(os.listdir("/proc/self/task"))
DepthResult.load(path)
print(len(os.listdir("/proc/self/task")) - threads)
"""


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="Linux only")
@pytest.mark.slow
def test_a_process_that_loaded_a_parquet_result_exits_cleanly(tmp_path):
    # Regression: reading the table from an io.BytesIO with pyarrow's threads aborted the
    # process at exit ("terminate called without an active exception", exit 134) in about
    # one run of five. load now starts no thread (checked in every run: deterministic), so
    # nothing of pyarrow's runs at exit; ten processes must all exit 0.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(pdepth.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / f"r{i}.parquet")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(10)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert (p.returncode, out.strip()) == (0, "0"), err[-500:]


@pytest.mark.parametrize("self_match", ["exclude", "include", "drop_nearest"])
def test_vote_counts_equal_a_direct_count_of_the_neighbours(self_match):
    support, queries = _layers(60, 4), _layers(25, 5)
    labels = torch.randint(0, 4, (60,), generator=torch.Generator().manual_seed(6))
    q_idx = torch.cat([torch.arange(10), torch.full((15,), -1)])
    queries = [torch.cat([s[:10], q[10:]]) for s, q in zip(support, queries, strict=True)]
    kw = dict(reference="last_probe", k=5, self_match=self_match, self_index=q_idx,
              num_classes=6)  # classes 4 and 5: no support label, zero counts
    plain = prediction_depth(support, labels, queries, **kw)
    res = prediction_depth(support, labels, queries, vote_counts=True, **kw)
    assert plain.vote_counts is None
    assert torch.equal(res.depth, plain.depth) and torch.equal(res.layer_pred, plain.layer_pred)
    assert res.vote_counts.dtype == torch.int16 and res.vote_counts.shape == (4, 25, 6)
    for layer, (s, q) in enumerate(zip(support, queries, strict=True)):
        # the oracle's neighbour indices, counted by hand
        _, index = ref_impl.knn(q.double(), s.double(), 5, self_index=q_idx,
                                self_match=self_match)
        direct = np.zeros((25, 6), np.int64)
        for i, row in enumerate(index.numpy()):
            for j in row:
                direct[i, labels[j]] += 1
        np.testing.assert_array_equal(res.vote_counts[layer].numpy(), direct)
    assert torch.equal(res.vote_counts.argmax(-1), res.layer_pred)  # first largest count


def test_vote_counts_helper_skips_empty_slots_and_checks_its_input():
    counts = pdepth.topk.vote_counts(torch.tensor([[2, 0, 2, -1], [-1, -1, -1, -1]]), 3)
    assert counts.tolist() == [[1, 0, 2], [0, 0, 0]] and counts.dtype == torch.int16
    with pytest.raises(ValueError, match=r"vote_counts\(\): neighbor_labels must lie in "
                                         r"\[-1, num_classes=3\), got values in \[0, 3\]"):
        pdepth.topk.vote_counts(torch.tensor([[0, 3]]), 3)


def test_load_refuses_vote_counts_that_disagree_with_the_votes(tmp_path):
    res = _result(vote_counts=True)
    arrays, meta = _arrays(res), res._meta()
    assert res._meta()["format_version"] == 4 and _result()._meta()["format_version"] == 4
    swapped = arrays["vote_counts"][..., ::-1].copy()  # another winner, still k votes
    _write_npz(tmp_path / "swapped.npz", {**arrays, "vote_counts": swapped}, meta)
    with pytest.raises(ValueError, match="layer_pred is not the first class of largest count"):
        DepthResult.load(tmp_path / "swapped.npz")
    short = arrays["vote_counts"].copy()
    short[0, 0, :] = 0
    _write_npz(tmp_path / "short.npz", {**arrays, "vote_counts": short}, meta)
    with pytest.raises(ValueError, match="do not sum to k=4"):
        DepthResult.load(tmp_path / "short.npz")
    negative = arrays["vote_counts"].copy()
    negative[0, 0, :2] += np.array([5, -5], np.int16)
    _write_npz(tmp_path / "negative.npz", {**arrays, "vote_counts": negative}, meta)
    with pytest.raises(ValueError, match="vote_counts has negative counts"):
        DepthResult.load(tmp_path / "negative.npz")


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_save_is_atomic(tmp_path, suffix, monkeypatch):
    from pdepth.depth import result as depth_mod  # DepthResult.save lives there

    old, new = _result(), prediction_depth(_layers(10, 3, widths=(4, 5, 6)),
                                           torch.arange(10) % 3, reference="labels", k=2)
    path = old.save(tmp_path / f"r{suffix}")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    # a write that fails half-way leaves the previous file in place and no temporary file
    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(depth_mod.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        new.save(path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert DepthResult.load(path).equals(old)
    if suffix == ".parquet":
        # interrupted between the table and its sidecar: the pair no longer matches, and
        # load says so instead of mixing the two saves
        calls = []
        real = depth_mod._atomic_write

        def second_fails(p, data):
            calls.append(p)
            if len(calls) == 2:
                raise KeyboardInterrupt
            real(p, data)

        monkeypatch.setattr(depth_mod, "_atomic_write", second_fails)
        with pytest.raises(KeyboardInterrupt):
            new.save(path)
        monkeypatch.undo()
        with pytest.raises(ValueError, match="does not belong to this table"):
            DepthResult.load(path)
    new.save(path)
    assert DepthResult.load(path).equals(new)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _umask():
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_to_pandas():
    res = _result()
    df = res.to_pandas()
    assert list(df.columns) == ["example_index", "depth", "reference", "label", "pred_0",
                                "pred_1", "pred_2"]
    assert len(df) == 40
    assert df["depth"].tolist() == res.depth.tolist()
    assert df.attrs["layer_names"] == ["a", "b", "c"] and df.attrs["k"] == 4
    assert df.attrs["layer_accuracy"] == res.layer_accuracy.tolist()


# ---------------------------------------------------------------------------------------------
# Ensembles
# ---------------------------------------------------------------------------------------------


def test_aggregate_arrays():
    nan = float("nan")
    depths = [
        torch.tensor([1.0, 2.0, 3.0, nan, 0.0]),
        torch.tensor([3, 2, -1, 4, 2]),  # -1: not scored
        np.array([2.0, 5.0, 1.0, 0.0, nan]),
    ]
    train = [
        np.array([True, True, False, False, True]),
        torch.tensor([0, 3]),  # indices of the training split
        {"train": [True, False, False, True, False], "held_out": [False, True, True, False, False]},
    ]
    ens = aggregate(depths, train)
    assert ens.num_models == 3 and ens.per_model.shape == (3, 5)
    # example 0: train in models 0, 1, 2 -> (1, 3, 2)
    assert ens.train_count.tolist() == [3, 1, 0, 2, 1]
    assert ens.train_mean[0] == 2.0 and ens.train_std[0] == pytest.approx(np.std([1, 3, 2]))
    # example 1: train in 0 (2), held out in 1 (2) and 2 (5)
    assert ens.train_mean[1] == 2.0 and ens.held_out_count[1] == 2
    assert ens.held_out_mean[1] == 3.5 and ens.held_out_std[1] == 1.5
    # example 2: held out in 0 (3) and 2 (1); model 1 did not score it
    assert ens.train_mean[2].isnan() and ens.held_out_count[2] == 2
    assert ens.held_out_mean[2] == 2.0
    # example 3: train in models 1 (4) and 2 (0); model 0 did not score it
    assert ens.train_mean[3] == 2.0 and ens.held_out_count[3] == 0
    assert ens.held_out_mean[3].isnan() and ens.held_out_std[3].isnan()
    # example 4: train in model 0 (0), held out in model 1 (2); model 2's explicit held_out
    # split leaves it out
    assert ens.train_mean[4] == 0.0 and ens.train_std[4] == 0.0
    assert ens.held_out_mean[4] == 2.0 and ens.held_out_count[4] == 1
    df = ens.to_pandas(per_model=True)
    assert len(df) == 5 and "depth_2" in df.columns and df.attrs["num_models"] == 3
    ens1 = aggregate(depths, train, ddof=1)
    assert ens1.train_std[4].isnan() and ens1.held_out_std[1] == pytest.approx(np.std([2, 5],
                                                                                  ddof=1))


def test_aggregate_depth_results():
    n = 30
    g = torch.Generator().manual_seed(11)
    layers = _layers(n, 12)
    labels = torch.randint(0, 3, (n,), generator=g)
    results, masks = [], []
    for _ in range(3):
        perm = torch.randperm(n, generator=g)
        tr, ho = perm[:20], perm[20:]
        tr_layers = [x[tr] for x in layers]
        on_train = prediction_depth(tr_layers, labels[tr], reference="labels", k=3,
                                    example_index=tr)
        held = prediction_depth(tr_layers, labels[tr], [x[ho] for x in layers],
                                reference="labels", query_labels=labels[ho], k=3,
                                example_index=ho)
        results += [on_train, held]
        masks += [tr, tr]
        assert torch.equal(on_train.example_index, tr)
    ens = aggregate(results, masks, num_examples=n)
    assert ens.per_model.shape == (6, n)
    total = ens.train_count + ens.held_out_count
    assert torch.equal(total, torch.full((n,), 3))
    # recompute one example by hand
    j = 0
    train_vals = [float(res.depth[res.example_index == j][0]) for res, mask in
                  zip(results, masks, strict=True) if j in mask.tolist()
                  and j in res.example_index.tolist()]
    assert ens.train_count[j] == len(train_vals)
    if train_vals:
        assert float(ens.train_mean[j]) == pytest.approx(np.mean(train_vals))


def test_aggregate_bad_input():
    with pytest.raises(ValueError, match="split mask"):
        aggregate([np.zeros(3)], [])
    with pytest.raises(ValueError, match="expected n=3"):
        aggregate([np.zeros(3), np.zeros(4)], [np.ones(3, bool), np.ones(3, bool)])
    with pytest.raises(ValueError, match="both"):
        aggregate([np.zeros(2)], [{"train": [0], "held_out": [0, 1]}])
    with pytest.raises(ValueError, match="'train' key"):
        aggregate([np.zeros(2)], [{"test": [0]}])
    res = _result()
    masks = [np.ones(res.num_examples, bool)] * 2
    with pytest.raises(ValueError, match=r"different k-NN metrics \['cosine', 'euclidean'\]"):
        aggregate([res, dataclasses.replace(res, metric="cosine")], masks)
    assert aggregate([res, res], masks).per_model.shape == (2, res.num_examples)


# ---------------------------------------------------------------------------------------------
# Bad input: each a ValueError naming the layer and the problem
# ---------------------------------------------------------------------------------------------


def test_bad_rows_between_layers():
    support = [GOOD, GOOD[:5], GOOD]
    with pytest.raises(ValueError, match=r"layer 1: support_layers has 5 rows but support_labels has 6"):
        prediction_depth(support, LABELS, reference="labels", k=1)
    q = torch.zeros(3, 1)
    with pytest.raises(ValueError, match=r"layer 2: query_layers has 2 rows but layer 0 had 3"):
        prediction_depth([GOOD] * 3, LABELS, [q, q, q[:2]], reference="labels",
                         query_labels=torch.zeros(3, dtype=torch.long), k=1)


def test_bad_label_length():
    with pytest.raises(ValueError, match=r"layer 0: support_layers has 6 rows but support_labels has 5"):
        prediction_depth([GOOD], LABELS[:5], reference="labels", k=1)
    with pytest.raises(ValueError, match=r"query_labels has 2 entries but there are 3 queries"):
        prediction_depth([GOOD], LABELS, [torch.zeros(3, 1)], reference="labels",
                         query_labels=torch.zeros(2, dtype=torch.long), k=1)


def test_bad_labels_out_of_range():
    # class ids are checked up front, naming the argument (not a layer: labels are per example)
    with pytest.raises(ValueError, match=r"^support_labels must lie in \[0, num_classes=2\)"):
        prediction_depth([GOOD], LABELS + 1, reference="labels", k=1, num_classes=2)
    with pytest.raises(ValueError, match=r"^support_labels must hold class ids >= 0"):
        prediction_depth([GOOD], LABELS - 1, reference="labels", k=1)
    with pytest.raises(ValueError, match=r"network_pred"):
        prediction_depth([GOOD], LABELS, network_pred=LABELS - 1, k=1)
    with pytest.raises(ValueError, match="integer"):
        prediction_depth([GOOD], LABELS.float(), reference="labels", k=1)
    with pytest.raises(ValueError, match=r"^query_labels must lie in \[0, num_classes=2\)"):
        prediction_depth([GOOD], LABELS, [GOOD], reference="labels", query_labels=LABELS + 1,
                         k=1, num_classes=2)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        prediction_depth([GOOD], LABELS, reference="labels", k=1, num_classes=0)


def test_class_ids_above_the_limit_name_the_labels():
    # Regression: a label such as 2**40 sized the vote's counts by it: std::bad_alloc.
    from pdepth.ops import MAX_CLASSES

    huge = LABELS.clone()
    huge[-1] = 2**40
    with pytest.raises(ValueError, match=r"^support_labels holds class ids up to "
                                         r"1099511627776, above the limit MAX_CLASSES="):
        prediction_depth([GOOD], huge, reference="labels", k=1)
    with pytest.raises(ValueError, match=r"^query_labels holds class ids up to 1099511627776"):
        prediction_depth([GOOD], LABELS, [GOOD], reference="labels", query_labels=huge, k=1)
    with pytest.raises(ValueError, match=r"^network_pred .*holds class ids up to"):
        prediction_depth([GOOD], LABELS, network_pred=huge, k=1)
    with pytest.raises(ValueError, match=rf"^num_classes={2**40} exceeds the limit of "
                                         rf"MAX_CLASSES={MAX_CLASSES}"):
        prediction_depth([GOOD], LABELS, reference="labels", k=1, num_classes=2**40)
    edge = LABELS.clone()
    edge[-1] = MAX_CLASSES - 1  # the largest id allowed still works
    assert prediction_depth([GOOD], edge, reference="labels", k=1).num_classes == MAX_CLASSES


def test_negative_support_labels_blame_support_labels():
    # Regression: support labels in {-1, 0} inferred num_classes=1 and the error blamed the
    # network's (correct) predictions: "reference (network) must lie in [0, num_classes=1)".
    with pytest.raises(ValueError, match=r"^support_labels must hold class ids >= 0, got "
                                         r"values in \[-1, 0\]") as info:
        prediction_depth([GOOD], LABELS - 1, network_pred=LABELS, k=1)
    assert "network" not in str(info.value)


def test_self_index_out_of_range_names_self_index():
    with pytest.raises(ValueError, match=r"^self_index must hold -1 .* \[0, N=6\), got values "
                                         r"in \[0, 6\]"):
        prediction_depth([GOOD], LABELS, [GOOD], reference="labels", query_labels=LABELS, k=1,
                         self_index=torch.tensor([0, 1, 2, 3, 4, 6]))
    with pytest.raises(ValueError, match=r"^self_index must hold -1"):
        prediction_depth([GOOD], LABELS, [GOOD], reference="labels", query_labels=LABELS, k=1,
                         self_index=torch.full((6,), -2))


@pytest.mark.parametrize("container", ["numpy", "tensor"])
def test_extra_query_layers_numpy(container):
    # Regression: a numpy query layer left over after the support layers ran out was compared
    # with `in (None, _MISSING)`: "truth value of an array is ambiguous".
    conv = (lambda t: t.numpy()) if container == "numpy" else (lambda t: t)
    with pytest.raises(ValueError, match=r"different numbers of layers: query_layers has at "
                                         r"least 2, support_layers has 1"):
        prediction_depth([conv(GOOD)], LABELS, [conv(GOOD), conv(GOOD)], reference="labels",
                         query_labels=LABELS, k=1)
    with pytest.raises(ValueError, match=r"support_layers has at least 3, query_layers has 2"):
        prediction_depth([conv(GOOD)] * 3, LABELS, [conv(GOOD)] * 2, reference="labels",
                         query_labels=LABELS, k=1)


def test_classes_absent_from_the_support_set():
    # A support split that holds class 0 only, queries labelled 0 and 1: the number of classes
    # comes from every label the call sees; the probes never predict class 1.
    support = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    queries = torch.tensor([[0.5], [2.5], [9.0]])
    q_labels = torch.tensor([0, 1, 1])
    res = prediction_depth([support, support], torch.zeros(4, dtype=torch.long),
                           [queries, queries], reference="labels", query_labels=q_labels, k=3)
    assert res.depth.tolist() == [0, 2, 2]
    assert res.layer_pred.eq(0).all() and res.num_classes == 2
    # the network's prediction may name a class no label has
    res = prediction_depth([support], torch.zeros(4, dtype=torch.long), [queries],
                           network_pred=torch.tensor([0, 4, 0]), k=3)
    assert res.depth.tolist() == [0, 1, 0] and res.num_classes == 5
    # an explicit num_classes still bounds every label
    with pytest.raises(ValueError, match=r"^query_labels must lie in \[0, num_classes=1\)"):
        prediction_depth([support], torch.zeros(4, dtype=torch.long), [queries],
                         reference="labels", query_labels=q_labels, k=3, num_classes=1)


def test_bad_reference_length():
    with pytest.raises(ValueError, match=r"reference \(tensor\).*5 entries.*6 queries"):
        prediction_depth([GOOD], LABELS, reference=LABELS[:5], k=1)
    with pytest.raises(ValueError, match=r"network_pred has 7 entries"):
        prediction_depth([GOOD], LABELS, network_pred=torch.zeros(7, dtype=torch.long), k=1)


def test_bad_k():
    with pytest.raises(ValueError, match=r"layer 0: .*k=6 is larger than the usable support"):
        prediction_depth([GOOD, GOOD], LABELS, reference="labels", k=6)  # 5 usable (self out)
    with pytest.raises(ValueError, match=r"layer 0: .*k=7 is larger"):
        prediction_depth([GOOD], LABELS, [GOOD], reference="labels", query_labels=LABELS, k=7)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        prediction_depth([GOOD], LABELS, reference="labels", k=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_bad_nonfinite_embeddings(bad):
    broken = GOOD.clone()
    broken[4, 0] = bad
    with pytest.raises(ValueError, match=r"layer 2.*NaN or Inf"):
        prediction_depth([GOOD, GOOD, broken], LABELS, reference="labels", k=1)
    with pytest.raises(ValueError, match=r"layer 1 \('b'\).*queries contains NaN or Inf"):
        prediction_depth(OrderedDict(a=GOOD, b=GOOD), LABELS,
                         OrderedDict(a=GOOD, b=broken), reference="labels",
                         query_labels=LABELS, k=1)


def test_bad_layer_containers():
    with pytest.raises(ValueError, match="different numbers of layers"):
        prediction_depth([GOOD, GOOD], LABELS, [GOOD], reference="labels", query_labels=LABELS,
                         k=1)
    with pytest.raises(ValueError, match="different numbers of layers"):
        prediction_depth(iter([GOOD]), LABELS, iter([GOOD, GOOD]), reference="labels",
                         query_labels=LABELS, k=1)
    with pytest.raises(ValueError, match="no layers"):
        prediction_depth([], LABELS, reference="labels", k=1)
    with pytest.raises(ValueError, match="wrap one layer in a list"):
        prediction_depth(GOOD, LABELS, reference="labels", k=1)
    with pytest.raises(ValueError, match="name different layers"):
        prediction_depth(OrderedDict(a=GOOD), LABELS, OrderedDict(b=GOOD), reference="labels",
                         query_labels=LABELS, k=1)
    with pytest.raises(ValueError, match="self_match"):
        prediction_depth([GOOD], LABELS, reference="labels", k=1, self_match="skip")
    with pytest.raises(ValueError, match="reference must be one of"):
        prediction_depth([GOOD], LABELS, reference="consensus", k=1)


# ---------------------------------------------------------------------------------------------
# Devices (the CUDA case is reported as skipped without a GPU)
# ---------------------------------------------------------------------------------------------


def test_device_matches_cpu(device):
    # small integers: every distance is exact, so CPU and CUDA must agree exactly
    # (docs/design.md section 9), ties included
    g = torch.Generator().manual_seed(9)
    widths = (8, 16, 4)
    support = [torch.randint(-4, 5, (300, w), generator=g).float() for w in widths]
    labels = torch.randint(0, 5, (300,), generator=g)
    queries = [torch.randint(-4, 5, (70, w), generator=g).float() for w in widths]
    q_labels = torch.randint(0, 5, (70,), generator=g)
    cpu = prediction_depth(support, labels, queries, reference="labels", query_labels=q_labels,
                           k=9)
    on_device = prediction_depth(
        [s.to(device) for s in support], labels.to(device), (q.to(device) for q in queries),
        reference="labels", query_labels=q_labels.to(device), k=9,
    )
    assert on_device.equals(cpu) and on_device.depth.device.type == "cpu"
    moved = prediction_depth(support, labels, queries, reference="labels",
                             query_labels=q_labels, k=9, device=device)
    assert moved.equals(cpu)
    self_cpu = prediction_depth(support, labels, network_pred=labels.flip(0), k=9)
    self_dev = prediction_depth([s.to(device) for s in support], labels.to(device),
                                network_pred=labels.flip(0).to(device), k=9)
    assert self_dev.equals(self_cpu)


def test_shard_keyword_local_equals_default_and_rejects_mixed_spellings():
    from pdepth import LocalSupport, ShardedSupport

    gen = torch.Generator().manual_seed(7)
    layers = [torch.randn(40, 5, generator=gen), torch.randn(40, 3, generator=gen)]
    labels = torch.randint(0, 3, (40,), generator=gen)
    base = prediction_depth(layers, labels, k=5, reference="labels")
    local = prediction_depth(layers, labels, k=5, reference="labels", shard=LocalSupport())
    assert torch.equal(base.depth, local.depth)
    assert torch.equal(base.layer_pred, local.layer_pred)
    with pytest.raises(ValueError, match="not both"):
        prediction_depth(layers, labels, k=5, shard=LocalSupport(), shard_offset=0)
    with pytest.raises(ValueError, match="shard= must be"):
        prediction_depth(layers, labels, k=5, shard="rank0")
    with pytest.raises(ValueError, match="needs query_layers= and num_classes="):
        prediction_depth(layers, labels, k=5, reference="labels", shard=ShardedSupport(0))
    with pytest.raises((ValueError, RuntimeError), match="process group"):
        prediction_depth(layers, labels, k=5, reference="labels", shard=ShardedSupport(0),
                         query_layers=layers, query_labels=labels, num_classes=3)


# ---------------------------------------------------------------------------------------------
# metric="cosine" (docs/design.md section 2, "The cosine metric")
# ---------------------------------------------------------------------------------------------


def _normalised(layers):
    return [pdepth.normalize_rows(torch.as_tensor(t).reshape(t.shape[0], -1).float())
            for t in layers]


@pytest.mark.parametrize("scoring_support", [True, False])
def test_cosine_equals_prediction_depth_over_hand_normalised_embeddings(scoring_support):
    """metric="cosine" is prediction_depth over rows normalised by pdepth.normalize_rows
    (conv-shaped, integer and zero rows included), and differs from the Euclidean depth."""
    g = torch.Generator().manual_seed(11)
    n, m = 150, 50
    support = [torch.randn(n, 3, 2, 2, generator=g) * 4 + 1,
               torch.randint(0, 5, (n, 7), generator=g), torch.rand(n, 5, generator=g)]
    support[2][::17] = 0  # zero rows stay zero
    labels = torch.randint(0, 4, (n,), generator=g)
    queries = None if scoring_support else [torch.randn(m, *t.shape[1:], generator=g).to(
        t.dtype) for t in support]
    net = torch.randint(0, 4, (n if scoring_support else m,), generator=g)
    kw = dict(network_pred=net, k=6, num_classes=4, vote_counts=True)
    got = prediction_depth(support, labels, queries, metric="cosine", **kw)
    want = prediction_depth(_normalised(support), labels,
                            None if queries is None else _normalised(queries), **kw)
    assert got.metric == "cosine" and want.metric == "euclidean"
    assert got.equals(dataclasses.replace(want, metric="cosine"))
    assert not torch.equal(got.layer_pred, prediction_depth(support, labels, queries,
                                                            **kw).layer_pred)


@pytest.mark.parametrize("suffix", ["npz", "parquet"])
def test_the_metric_is_recorded_and_older_files_load_as_euclidean(tmp_path, suffix):
    """Format version 4 records the k-NN metric; a file of version 3 (every one of them
    Euclidean) loads as "euclidean"; a metric the format does not know is refused."""
    res = dataclasses.replace(_result(vote_counts=True), metric="cosine")
    path = res.save(tmp_path / f"r.{suffix}")
    back = DepthResult.load(path)
    assert back.metric == "cosine" and back.equals(res)
    assert not back.equals(dataclasses.replace(res, metric="euclidean"))
    if suffix == "npz":
        v3 = {k: v for k, v in res._meta().items() if k != "metric"}
        _write_npz(path, _arrays(res), {**v3, "format_version": 3})
        hostile = _write_npz(tmp_path / "h.npz", _arrays(res), {**res._meta(), "metric": "l1"})
    else:
        _edit_sidecar(path, metric=None, format_version=3)
        hostile = res.save(tmp_path / "h.parquet")
        _edit_sidecar(hostile, metric="l1")
    assert DepthResult.load(path).metric == "euclidean"
    _one_line_error(lambda: DepthResult.load(hostile),
                    r"metric must be one of \('euclidean', 'cosine'\), got 'l1'")


def test_bad_metric_refused_before_any_layer_is_read():
    read = []

    def layers():
        read.append(1)
        yield torch.zeros(4, 2)

    with pytest.raises(ValueError, match="prediction_depth\\(\\): metric .* got 'dot'"):
        prediction_depth(layers(), torch.zeros(4, dtype=torch.long), k=1, metric="dot")
    assert not read
