"""Every dataset of the table through its real on-disk format (written here, tiny; no
network): the loaders, both splits, and a one-epoch run through the CLI (results written,
class names, shapes and pixels right). torchvision checks the md5 of CIFAR's and SVHN's
files; the tests get past it with ``no_md5`` (pytest's monkeypatch on torchvision's
``check_integrity``), and one test shows the check is on without it."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
import torch
from data_helpers import write_cifar, write_image_folder, write_mnist, write_svhn
from run_helpers import needs_fmnist, one_error_line

from pdepth import data
from pdepth.cli import main

pytest.importorskip("torchvision")

CLASSES = ("cat", "dog", "emu")  # the image folder's
# name -> (writer, image shape as stored, class names, extra CLI arguments)
CASES = {
    "mnist": (write_mnist, (28, 28), data.DATASETS["mnist"].classes, []),
    "cifar10": (lambda root: write_cifar(root, 10), (32, 32, 3),
                data.DATASETS["cifar10"].classes, []),
    "cifar100": (lambda root: write_cifar(root, 100), (32, 32, 3),
                 data.DATASETS["cifar100"].classes, []),
    "svhn": (write_svhn, (32, 32, 3), tuple("0123456789"), []),
    # at its own size (20) an image is not resampled: the pixels must come through as written
    "imagefolder": (lambda root: write_image_folder(root, CLASSES), (20, 20, 3), CLASSES,
                    ["--image-size", "20", "--workers", "1"]),
}


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision's integrity check of CIFAR and SVHN reduced to "the file exists" (the
    files written here have other md5 sums than the real ones)."""
    import os

    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn

    exists = lambda path, md5=None: os.path.isfile(path)  # noqa: E731
    monkeypatch.setattr(cifar, "check_integrity", exists)
    monkeypatch.setattr(svhn, "check_integrity", exists)


def _as_stored(name: str, split: str, images: np.ndarray) -> np.ndarray:
    """What the loader gives for the written images: the image folder's grey test PNGs
    come back as RGB."""
    if name == "imagefolder" and split == "test":
        return np.repeat(images[..., :1], 3, axis=3)
    return images


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_loader_reads_both_splits_as_written(name, tmp_path, no_md5):
    writer, shape, classes, _ = CASES[name]
    written = writer(tmp_path)
    options = {"image_size": 20} if name == "imagefolder" else {}
    for split, (images, labels) in written.items():
        got, got_labels, index = data.load_subset(name, str(tmp_path), split=split, **options)
        assert got.dtype == torch.uint8 and tuple(got.shape[1:]) == shape
        assert np.array_equal(got.numpy(), _as_stored(name, split, images))
        assert got_labels.dtype == torch.int64 and np.array_equal(got_labels.numpy(), labels)
        assert index.tolist() == list(range(len(labels)))
    info = data.dataset_info(name, str(tmp_path), 20 if name == "imagefolder" else None)
    assert info.classes == classes and info.channels == (1 if len(shape) == 2 else 3)
    assert info.image_size == shape[0]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.slow
def test_each_dataset_runs_through_the_cli(name, tmp_path, no_md5):
    writer, shape, classes, extra = CASES[name]
    images, labels = writer(tmp_path / "data")["train"]
    out = tmp_path / "run"
    assert main(["run", "--dataset", name, "--root", str(tmp_path / "data"), "--subset", "16",
                 "--epochs", "1", "--seeds", "1", "--k", "3", "--quiet", "--out", str(out),
                 *extra]) == 0
    assert (out / "COMPLETE").exists() and (out / "report.html").exists()
    cfg = json.loads((out / "config.json").read_text())
    res = cfg["resolved"]
    assert res["class_names"] == list(classes) and res["num_classes"] == len(classes)
    channels = 1 if len(shape) == 2 else 3
    assert res["image_shape"] == [channels, shape[0], shape[0]]
    assert len(res["normalization"]["mean"]) == channels
    z = np.load(out / "data.npz")
    idx = z["dataset_index"]
    assert len(idx) == 16 and np.array_equal(z["images"], images[idx])
    assert np.array_equal(z["labels"], labels[idx])
    import pandas as pd

    df = pd.read_parquet(out / "results.parquet")
    assert list(df["label_name"]) == [classes[y] for y in labels[idx]]
    assert df["train_depth"].notna().all() and df["held_out_depth"].notna().all()
    with np.load(out / "per_model.npz") as pm:
        assert pm["depth"].shape == (2, 16) and pm["probs"].shape == (2, 16, len(classes))


def test_image_folder_resizes_and_normalises_from_the_data(tmp_path):
    write_image_folder(tmp_path, CLASSES)
    images, _, _ = data.load_subset("imagefolder", str(tmp_path), image_size=12)
    assert images.shape == (24, 12, 12, 3)
    info = data.dataset_info("imagefolder", str(tmp_path), 12).with_stats(images)
    x = data.normalize_images(images, info.mean, info.std)
    assert x.shape == (24, 3, 12, 12)
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)


def test_the_md5_check_stays_on_the_real_path(tmp_path):
    write_cifar(tmp_path, 10)
    write_svhn(tmp_path)
    for name in ("cifar10", "svhn"):
        with pytest.raises(FileNotFoundError, match="not found or damaged"):
            data.load_subset(name, str(tmp_path))


def test_bad_dataset_settings_name_the_flag_and_value(tmp_path, capsys):
    with pytest.raises(ValueError, match="valid datasets: fashion-mnist, mnist, cifar10"):
        data.dataset_info("imagenet")
    with pytest.raises(ValueError, match=r"--image-size\) 64: cifar10 images are 32x32"):
        data.dataset_info("cifar10", image_size=64)
    assert main(["run", "--dataset", "imagefolder", "--out", str(tmp_path / "x")]) == 2
    assert "needs root (--root DIR" in one_error_line(capsys)
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["run", "--dataset", "cifar11", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "--dataset: invalid choice: 'cifar11'" in err and "cifar100" in err


@needs_fmnist
def test_fashion_mnist_torchvision_reader_gives_the_debian_tensors(tmp_path):
    """The Debian files, laid out (decompressed) as torchvision expects them, read by
    torchvision's FashionMNIST: the same tensors as pdepth's IDX reader."""
    from torchvision.datasets import FashionMNIST

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for names in data._FILES.values():
        for name in names:
            with gzip.open(f"{data.FASHION_MNIST_ROOT}/{name}", "rb") as src, \
                    open(raw / name[:-3], "wb") as dst:
                shutil.copyfileobj(src, dst)
    for split in ("train", "test"):
        tv = FashionMNIST(str(tmp_path), train=split == "train")
        images, labels = data.load_fashion_mnist(split=split)
        assert torch.equal(tv.data, images) and torch.equal(tv.targets, labels)


def test_fashion_mnist_in_torchvisions_layout_is_read_without_download(tmp_path):
    """Where ``--download`` once put Fashion-MNIST (``root/FashionMNIST/raw``), a later run
    reads it without downloading; a root with neither layout names the Debian package."""
    from data_helpers import write_idx

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    written = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = np.full((3, 28, 28), 7 if split == "train" else 9, np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.array([1, 2, 3]))
        written[split] = images
    for split, images in written.items():
        got, labels = data.load_fashion_mnist(str(tmp_path), split)
        assert np.array_equal(got.numpy(), images) and labels.tolist() == [1, 2, 3]
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.load_fashion_mnist(str(tmp_path / "nothing"))


def test_image_folder_test_split_keeps_the_training_class_indices(tmp_path):
    write_image_folder(tmp_path, CLASSES)
    shutil.rmtree(tmp_path / "test" / "cat")  # the test split lacks the first class
    _, labels, _ = data.load_subset("imagefolder", str(tmp_path), split="test", image_size=20)
    assert 0 not in labels.tolist() and set(labels.tolist()) == {1, 2}
    (tmp_path / "test" / "yak").mkdir()
    shutil.copy(next((tmp_path / "test" / "dog").iterdir()), tmp_path / "test" / "yak")
    with pytest.raises(ValueError, match=r"classes \['yak'\] that the training split lacks"):
        data.load_subset("imagefolder", str(tmp_path), split="test", image_size=20)


# --------------------------------------------------------------------------------------------
# image folders: links, the train/test layout, too few classes
# --------------------------------------------------------------------------------------------


def _class_folder(tmp_path):
    """An image folder of class folders (cat, dog, emu: 24 images), no split folders."""
    write_image_folder(tmp_path / "w", CLASSES)
    return tmp_path / "w" / "train"


@pytest.mark.parametrize("link, target, message", [
    ("cat/loop", "..", "are the same folder"),         # the loop: 24 images -> 1,000+
    ("cat/dogs", "../dog", "are the same folder"),     # a second way into a class folder
    ("cat/up", "../../..", "which holds the image folder"),  # an ancestor of the folder
    ("cat/again.png", "../dog/001.png", "are the same image file"),  # an image twice
])
def test_image_folder_reads_every_folder_and_image_once(tmp_path, capsys, link, target,
                                                        message):
    root = _class_folder(tmp_path)
    (root / link).symlink_to(target)
    with pytest.raises(ValueError, match=message) as exc:
        data.load_subset("imagefolder", str(root), image_size=20)
    assert str(root / link) in str(exc.value) or str(root / "dog") in str(exc.value)
    out = tmp_path / "run"
    assert main(["run", "--dataset", "imagefolder", "--root", str(root), "--out", str(out),
                 "--quiet"]) == 2
    assert message in one_error_line(capsys) and not out.exists()


def test_image_folder_follows_links_to_folders_and_images_elsewhere(tmp_path):
    """A class folder or an image that is a link to a place outside the folder, reached
    once, is read like any other."""
    root = _class_folder(tmp_path)
    before, labels, _ = data.load_subset("imagefolder", str(root), image_size=20)
    shutil.move(root / "emu", tmp_path / "emus")
    (root / "emu").symlink_to(tmp_path / "emus")
    shutil.move(root / "dog" / "001.png", tmp_path / "dog.png")
    (root / "dog" / "001.png").symlink_to(tmp_path / "dog.png")
    after, labels_after, _ = data.load_subset("imagefolder", str(root), image_size=20)
    assert torch.equal(before, after) and torch.equal(labels, labels_after)


def test_a_class_named_train_is_a_class_not_a_split(tmp_path):
    """The train/test layout is root's only folders train (and test), each holding folders
    and no images of its own; else train and test are class folders."""
    root = _class_folder(tmp_path)
    # the split layout (tmp_path / "w": train/ and test/ holding the class folders)
    assert data.dataset_info("imagefolder", str(tmp_path / "w")).classes == CLASSES
    (root / "cat").rename(root / "train")
    assert data.dataset_info("imagefolder", str(root)).classes == ("dog", "emu", "train")
    images, labels, _ = data.load_subset("imagefolder", str(root), image_size=20)
    assert images.shape[0] == 24 and set(labels.tolist()) == {0, 1, 2}
    (root / "dog").rename(root / "test")
    (root / "emu").rename(tmp_path / "emu")
    assert data.dataset_info("imagefolder", str(root)).classes == ("test", "train")
    with pytest.raises(FileNotFoundError, match="holds one split"):
        data.load_subset("imagefolder", str(root), split="test")


def test_a_one_class_image_folder_needs_two_classes(tmp_path, capsys):
    root = _class_folder(tmp_path)
    for name in ("dog", "emu"):
        shutil.rmtree(root / name)
    with pytest.raises(ValueError, match="needs at least 2 classes"):
        data.dataset_info("imagefolder", str(root))
    out = tmp_path / "run"
    assert main(["run", "--dataset", "imagefolder", "--root", str(root), "--out", str(out),
                 "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "needs at least 2 classes" in err and str(root) in err and not out.exists()
