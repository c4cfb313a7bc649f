"""Prediction depth of a model trained elsewhere (pdepth.score, `pdepth score`;
pdepth.model_score): both splits against the training split's support, equal to
prediction_depth over embeddings extracted by hand; models by name, Hugging Face folders;
bad input as one line, exit 2, nothing written. Builders alone: tests/test_builders.py."""

from __future__ import annotations

import json

import pytest
import torch
from run_helpers import needs_fmnist, one_error_line

import pdepth
from pdepth import model_score
from pdepth.cli import main


def _net(seed=0, classes=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, classes)).eval()


def _data(n, seed, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def _by_hand(model, probes, x_tr, y_tr, x_te, y_te, k, reference="network",
             metric="euclidean"):
    """prediction_depth over pdepth.extract's embeddings: train (self excluded), test."""
    sup = pdepth.extract(model, x_tr, probes)
    qry = pdepth.extract(model, x_te, probes)
    kw = dict(k=k, num_classes=3, reference=reference, metric=metric)
    train = pdepth.prediction_depth(sup.layers, y_tr, network_pred=sup.logits.argmax(1),
                                    **kw)
    test = pdepth.prediction_depth(sup.layers, y_tr, qry.layers, query_labels=y_te,
                                   network_pred=qry.logits.argmax(1), **kw)
    return train, test


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("reference", ["network", "labels", "last-probe"])
def test_score_equals_prediction_depth_by_hand(reference, metric):
    model = _net()
    (x_tr, y_tr), (x_te, y_te) = _data(50, 1), _data(20, 2)
    probes = ["1", "4", "5"]
    res = pdepth.score(model, (x_tr, y_tr), (x_te, y_te), probes=probes, k=3,
                       reference=reference, memory_budget=None, metric=metric)
    train, test = _by_hand(model, probes, x_tr, y_tr, x_te, y_te, 3,
                           reference.replace("-", "_"), metric)
    assert res.train.self_match == "exclude"  # each training example's own row
    for got, want in ((res.train, train), (res.test, test)):
        assert torch.equal(got.depth, want.depth)
        assert torch.equal(got.layer_pred, want.layer_pred)
        assert torch.equal(got.reference, want.reference)
        assert got.reference_mode == want.reference_mode
    assert torch.equal(res.train.example_index, torch.arange(50))
    assert torch.equal(res.test_pred, model(x_te).argmax(1))
    assert torch.equal(res.train_logits, model(x_tr))
    assert res.probes == ["input", "1", "4", "5", "softmax"]
    assert res.stats["store"] == "memory" and res.stats["passes"] == 1
    st = res.stats
    assert 0 < st["extract_seconds"] and 0 < st["knn_seconds"]
    assert st["extract_seconds"] + st["knn_seconds"] <= st["seconds"]


def test_score_on_the_device_equals_by_hand(device, tmp_path, monkeypatch):
    """device=: the model's forward and the k-NN on that device (on CUDA, the path the CPU
    suite cannot run), in RAM and through the disk store, equal prediction_depth over
    embeddings extracted by hand on the same device and scored there."""
    import tempfile

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    model = _net().to(device)
    (x_tr, y_tr), (x_te, y_te) = _data(50, 1), _data(20, 2)
    probes = ["1", "4", "5"]
    sup = pdepth.extract(model, x_tr, probes, device=device, storage=device)
    qry = pdepth.extract(model, x_te, probes, device=device, storage=device)
    kw = dict(k=3, num_classes=3)
    ys = y_tr.to(device)
    train = pdepth.prediction_depth(sup.layers, ys, network_pred=sup.logits.argmax(1), **kw)
    test = pdepth.prediction_depth(sup.layers, ys, qry.layers, query_labels=y_te.to(device),
                                   network_pred=qry.logits.argmax(1), **kw)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for budget in (None, 3000):  # everything in RAM; blocks of a few rows on disk
        res = pdepth.score(model, (x_tr, y_tr), (x_te, y_te), probes=probes, k=3,
                           device=device, memory_budget=budget)
        assert res.stats["store"] == ("memory" if budget is None else "disk")
        for got, want in ((res.train, train), (res.test, test)):
            assert torch.equal(got.depth.cpu(), want.depth.cpu()), budget
            assert torch.equal(got.layer_pred.cpu(), want.layer_pred.cpu()), budget
        assert torch.equal(res.train_logits.cpu(), sup.logits.cpu())
    assert list(tmp_path.iterdir()) == []


def _counting(model):
    """``(model, calls)``: every forward call's input is appended to ``calls`` (a pre-hook,
    so a forward truncated after its last probe counts too)."""
    calls = []
    model.register_forward_pre_hook(lambda mod, inputs: calls.append(inputs[0].clone()))
    return model, calls


def test_score_runs_each_example_through_the_model_once():
    # one example alone for the widths, then every training row and every test row once,
    # in that order (the old score ran the training split twice: 2N + M rows)
    model, calls = _counting(_net())
    (x_tr, y_tr), (x_te, y_te) = _data(40, 3), _data(12, 4)
    res = pdepth.score(model, (x_tr, y_tr), (x_te, y_te), probes=["1", "4"], k=3,
                       batch_size=16)
    assert [c.shape[0] for c in calls] == [1, 16, 16, 8, 12]
    assert torch.equal(calls[0], x_tr[:1])
    assert torch.equal(torch.cat(calls[1:]), torch.cat([x_tr, x_te]))
    assert res.stats["store"] == "memory" and res.stats["passes"] == 1


@pytest.mark.slow
def test_score_disk_store_equals_ram_and_leaves_no_files(tmp_path, monkeypatch):
    import tempfile

    from torch.utils.data import DataLoader, TensorDataset

    (x_tr, y_tr), (x_te, y_te) = _data(40, 5), _data(12, 6)
    kw = dict(probes=["1", "4"], k=3, batch_size=16)
    ram = pdepth.score(_net(), (x_tr, y_tr), (x_te, y_te), **kw)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for metric in ("euclidean", "cosine"):
        want = pdepth.score(_net(), (x_tr, y_tr), (x_te, y_te), metric=metric, **kw)
        model, calls = _counting(_net())
        got = pdepth.score(model, (x_tr, y_tr), (x_te, y_te), metric=metric,
                           memory_budget=3000, **kw)  # blocks of a few rows
        assert got.stats["store"] == "disk" and got.stats["passes"] == 1
        assert got.train.equals(want.train) and got.test.equals(want.test)
        assert torch.equal(got.train_logits, want.train_logits)
        assert torch.equal(got.test_logits, want.test_logits)
        assert sum(c.shape[0] for c in calls) == 1 + 52
        assert list(tmp_path.iterdir()) == []
    # a disk that holds the widest probe (conv "1": 4 x 6 x 6 features of 52 rows) alone:
    # passes input | 1 | 4 + softmax, each example once per pass (the first records the
    # inputs alone: no forward call), the same result
    monkeypatch.setattr(model_score, "disk_budget", lambda folder: 52 * 144 * 4)
    model, calls = _counting(_net())
    got = pdepth.score(model, TensorDataset(x_tr, y_tr),
                       DataLoader(TensorDataset(x_te, y_te), batch_size=16), memory_budget=3000,
                       **kw)
    assert got.stats["passes"] == 3
    assert torch.equal(torch.cat(calls[1:]), torch.cat([x_tr, x_te] * 2))
    assert got.train.equals(ram.train) and got.test.equals(ram.test)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="k=50"):  # an error: the folder is removed too
        pdepth.score(_net(), (x_tr, y_tr), (x_te, y_te), probes=["1"], k=50,
                     memory_budget=3000)
    assert list(tmp_path.iterdir()) == []


def test_score_takes_datasets_and_loaders_and_no_test_split():
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    class Items(Dataset):  # no targets: the labels are read item by item
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i], int(self.y[i])

    model = _net()
    (x_tr, y_tr), (x_te, y_te) = _data(40, 3), _data(12, 4)
    want = pdepth.score(model, (x_tr, y_tr), (x_te, y_te), probes=["1"], k=3)
    for train, test in ((TensorDataset(x_tr, y_tr),
                         DataLoader(TensorDataset(x_te, y_te), batch_size=5)),
                        (DataLoader(TensorDataset(x_tr, y_tr), batch_size=7),
                         Items(x_te, y_te))):
        got = pdepth.score(model, train, test, probes=["1"], k=3)
        assert got.train.equals(want.train) and got.test.equals(want.test)
        # (the same model outputs; the loaders' batches may differ from batch_size's)
        assert torch.allclose(got.train_logits, want.train_logits, atol=1e-6)
        assert torch.allclose(got.test_logits, want.test_logits, atol=1e-6)
    alone = pdepth.score(model, (x_tr, y_tr), probes=["1"], k=3)
    assert alone.test is None and alone.train.equals(want.train)
    with pytest.raises(ValueError, match="train is a DataLoader with a shuffling sampler"):
        pdepth.score(model, DataLoader(TensorDataset(x_tr, y_tr), shuffle=True), probes=["1"])


def test_score_passes_token_and_metric_on(monkeypatch):
    # token= reaches resolve_probes (None: the probes' default), metric= the embedding store
    # (None: euclidean)
    seen = {"token": [], "metric": []}
    real_resolve, real_store = model_score.resolve_probes, model_score.LayerStore

    def resolve(model, probes=None, **kw):
        seen["token"].append(kw["token"])
        return real_resolve(model, probes, **kw)

    def store(*args, **kw):
        seen["metric"].append(kw["metric"])
        return real_store(*args, **kw)

    monkeypatch.setattr(model_score, "resolve_probes", resolve)
    monkeypatch.setattr(model_score, "LayerStore", store)
    model, (x, y) = _net(), _data(30, 5)
    pdepth.score(model, (x, y), (x[:5], y[:5]), probes=["1"], k=3)
    assert seen == {"token": [None], "metric": ["euclidean"]}
    pdepth.score(model, (x, y), (x[:5], y[:5]), probes=["1"], k=3, token="mean",
                 metric="cosine")
    assert seen == {"token": [None, "mean"], "metric": ["euclidean", "cosine"]}


def test_score_refuses_network_reference_for_a_head_of_other_classes():
    model, (x, y) = _net(classes=7), _data(30, 6)  # 7 outputs, 3 classes
    with pytest.raises(ValueError, match="head has 7 outputs but the data has 3 classes.*"
                                         "--reference labels"):
        pdepth.score(model, (x, y), probes=["1"], k=3)
    res = pdepth.score(model, (x, y), probes=["1"], k=3, reference="labels")
    assert res.train.reference_mode == "labels"
    with pytest.raises(ValueError, match="reference"):
        pdepth.score(model, (x, y), probes=["1"], k=3, reference="consensus")


# --------------------------------------------------------------------------------------------
# pdepth score
# --------------------------------------------------------------------------------------------

VIT = ["--model", "timm:vit_tiny_patch16_224", "--model-arg", "img_size=32",
       "--model-arg", "patch_size=8", "--model-arg", "num_classes=10", "--model-arg", "depth=2",
       "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2"]
SMALL = ["--subset", "40", "--test-subset", "16", "--k", "3", "--quiet"]


@needs_fmnist
def test_cli_score_equals_extract_by_hand(tmp_path, capsys):
    pytest.importorskip("timm")
    pd = pytest.importorskip("pandas")
    from pdepth.builders import build_named_model, parse_model_args, preprocess

    args = parse_model_args(VIT[3::2])
    torch.manual_seed(7)
    ckpt = tmp_path / "vit.pt"
    torch.save(build_named_model(VIT[1], args).model.state_dict(), ckpt)
    out = tmp_path / "out"
    probes = "blocks.0,blocks.1"
    assert main(["score", *VIT, "--checkpoint", str(ckpt), "--probes", probes, *SMALL,
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    df = pd.read_parquet(out / "results.parquet")
    cfg = json.loads((out / "config.json").read_text())
    assert (out / "COMPLETE").exists() and cfg["status"] == "complete"
    assert df.split.tolist() == ["train"] * 40 + ["test"] * 16
    pre = cfg["resolved"]["preprocessing"]
    assert pre["source"] == "timm.data.resolve_data_config" and pre["input_shape"] == [3, 32, 32]
    assert cfg["resolved"]["probes"] == ["input", "blocks.0", "blocks.1", "softmax"]
    # by hand: the same model, data and preprocessing, pdepth.extract, prediction_depth
    built = build_named_model(VIT[1], args, checkpoint=str(ckpt))
    split = {s: pdepth.data.load_subset("fashion-mnist", None, n, 0, split=s)
             for s, n in (("train", 40), ("test", 16))}
    x = {s: preprocess(v[0], built.model, built.preprocessing, pdepth.data.DATASETS[
        "fashion-mnist"].mean, pdepth.data.DATASETS["fashion-mnist"].std)[0]
        for s, v in split.items()}
    sup = pdepth.extract(built.model, x["train"], probes.split(","))
    qry = pdepth.extract(built.model, x["test"], probes.split(","))
    y_tr, y_te = split["train"][1], split["test"][1]
    train = pdepth.prediction_depth(sup.layers, y_tr, network_pred=sup.logits.argmax(1), k=3,
                                    num_classes=10)
    test = pdepth.prediction_depth(sup.layers, y_tr, qry.layers, query_labels=y_te,
                                   network_pred=qry.logits.argmax(1), k=3, num_classes=10)
    for name, want, index in (("train", train, split["train"][2]),
                              ("test", test, split["test"][2])):
        rows = df[df.split == name]
        assert rows.depth.tolist() == want.depth.tolist()
        assert rows.dataset_index.tolist() == index.tolist()
        assert rows.pred_1.tolist() == want.layer_pred[1].tolist()
        assert rows.prediction.tolist() == want.reference.tolist()


@needs_fmnist
def test_cli_score_torchvision_model_by_name(tmp_path):
    pytest.importorskip("torchvision")
    pd = pytest.importorskip("pandas")
    out = tmp_path / "out"
    assert main(["score", "--model", "torchvision:resnet18", "--model-arg", "num_classes=10",
                 "--probes", "layer1,layer4", "--subset", "24", "--test-subset", "8",
                 "--k", "3", "--quiet", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["preprocessing"]["input_shape"] == [3, 28, 28]  # grey repeated
    first = pd.read_parquet(out / "results.parquet")
    assert len(first) == 32
    # random weights (no --checkpoint) are seeded: a second run gives the same table
    torch.manual_seed(123)
    assert main(["score", "--model", "torchvision:resnet18", "--model-arg", "num_classes=10",
                 "--probes", "layer1,layer4", "--subset", "24", "--test-subset", "8",
                 "--k", "3", "--quiet", "--out", str(out), "--overwrite"]) == 0
    assert pd.read_parquet(out / "results.parquet").equals(first)


def _hf_folders(tmp_path, columns=("image", "label")):
    """A tiny ViT image classifier (save_pretrained) and a datasets folder (save_to_disk)."""
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    import numpy as np
    from PIL import Image

    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, num_channels=3, num_labels=4)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    rng = np.random.default_rng(0)

    def split(n):
        images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
                  for _ in range(n)]
        return datasets.Dataset.from_dict(
            {columns[0]: images, columns[1]: [i % 4 for i in range(n)]},
            features=datasets.Features({columns[0]: datasets.Image(),
                                        columns[1]: datasets.ClassLabel(num_classes=4)}))

    datasets.DatasetDict({"train": split(24), "test": split(8)}).save_to_disk(tmp_path / "data")
    return tmp_path / "vit", tmp_path / "data"


def test_cli_score_hf_model_and_hf_dataset(tmp_path, capsys):
    pd = pytest.importorskip("pandas")
    model, data = _hf_folders(tmp_path, ("img", "y"))
    capsys.readouterr()  # the progress bars of save_pretrained / save_to_disk
    out = tmp_path / "out"
    base = ["score", "--model", f"hf:{model}", "--dataset", f"hf:{data}", "--k", "3",
            "--probes", "vit.layers.0,vit.layers.1", "--quiet"]
    # the folder's columns are img / y: without naming them, one line and nothing written
    assert main([*base, "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert "'image' (--image-column)" in err and "img, y" in err and not out.exists()
    assert main([*base, "--image-column", "img", "--label-column", "y",
                 "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""  # --quiet: no progress bar of transformers either
    df = pd.read_parquet(out / "results.parquet")
    assert df.split.value_counts().to_dict() == {"train": 24, "test": 8}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["model"]["kind"] == "hf" and cfg["resolved"]["num_classes"] == 4


@needs_fmnist
@pytest.mark.parametrize("args, message", [
    (["--model", "timm:no_such_net"], "timm has no model 'no_such_net'"),
    (["--model", "timm:resnet10t", "--model-arg", "img_size=32"],
     "rejects --model-arg img_size=32"),
    (["--model", "timm:resnet10t"],  # 1000 ImageNet outputs, 10 classes
     "head has 1000 outputs but the data has 10 classes"),
    (["--model", "torchvision:no_such_net"], "torchvision has no model"),
    (["--model", "timm:resnet10t", "--model-arg", "num_classes"], "--model-arg takes KEY=VALUE"),
])
def test_cli_score_bad_input_one_line_nothing_written(tmp_path, capsys, args, message):
    pytest.importorskip("timm")
    out = tmp_path / "out"
    assert main(["score", *args, *SMALL, "--out", str(out)]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


def test_cli_score_missing_optional_dependency(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm fails
    out = tmp_path / "out"
    assert main(["score", *VIT, *SMALL, "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert "needs timm" in err and 'pdepth[models]' in err and not out.exists()


@needs_fmnist
def test_cli_score_output_folder_rules(tmp_path, capsys):
    pytest.importorskip("timm")
    out = tmp_path / "out"
    cmd = ["score", *VIT, "--probes", "blocks.0,blocks.1", *SMALL, "--out", str(out)]
    assert main(cmd) == 0
    capsys.readouterr()
    assert main(cmd) == 2  # a finished score: --overwrite replaces it
    assert "--overwrite" in one_error_line(capsys)
    assert main([*cmd, "--overwrite"]) == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main([*cmd[:-1], str(foreign), "--overwrite"]) == 2
    assert "not a pdepth run directory" in one_error_line(capsys)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_cli_score_passes_token_and_metric_on(tmp_path, monkeypatch):
    # --token / --metric reach resolve_probes / the embedding store (None / euclidean when
    # not given: the library's defaults)
    from pathlib import Path

    import pdepth.probes as probes_mod

    pytest.importorskip("pandas")
    seen = {"resolve": [], "store": []}
    real_resolve, real_store = probes_mod.resolve_probes, model_score.LayerStore

    def resolve(model, probes=None, **kw):
        seen["resolve"].append(kw.get("token", "absent"))
        return real_resolve(model, probes, **kw)

    def store(*args, **kw):
        seen["store"].append(kw["metric"])
        return real_store(*args, **kw)

    monkeypatch.setattr(probes_mod, "resolve_probes", resolve)  # prepare_score's
    monkeypatch.setattr(model_score, "resolve_probes", resolve)  # score's
    monkeypatch.setattr(model_score, "LayerStore", store)
    _, data = _hf_folders(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    base = ["score", "--model", "test_score:_hf_head", "--dataset", f"hf:{data}", "--k", "3",
            "--probes", "1,3", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert seen == {"resolve": [None, None], "store": ["euclidean"]}
    assert main([*base, "--token", "mean", "--metric", "cosine",
                 "--out", str(tmp_path / "b")]) == 0
    assert seen["resolve"][2:] == ["mean", "mean"] and seen["store"][1:] == ["cosine"]
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["settings"]["token"] == "mean" and cfg["resolved"]["metric"] == "cosine"
    assert cfg["stats"]["store"] == "memory" and cfg["stats"]["passes"] == 1


def _hf_head(num_classes, in_channels, image_size):
    """A factory for the test above (imported by name as test_score:_hf_head)."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(
        in_channels * image_size ** 2, 8), torch.nn.ReLU(), torch.nn.Linear(8, num_classes))
