"""Datasets: the table :data:`DATASETS` (name -> :class:`DatasetInfo`: default folder, class
names, channels, image size, per-channel normalisation, loader), their loaders, subsets and
normalisation.

* ``fashion-mnist`` -- from the Debian package ``dataset-fashion-mnist`` (IDX files, gzip,
  read by :func:`load_fashion_mnist`); with ``download=True`` and no Debian files,
  torchvision fetches them into ``root``.
* ``mnist``, ``cifar10``, ``cifar100``, ``svhn`` -- torchvision's readers on the files in
  ``root`` (laid out as torchvision expects them: ``MNIST/raw/``, ``cifar-10-batches-py/``,
  ``cifar-100-python/``, ``train_32x32.mat``); ``download=True`` lets torchvision fetch them.
  torchvision checks the md5 of the CIFAR and SVHN files.
* ``imagefolder`` -- torchvision's ``ImageFolder`` rules on ``root`` (one folder per class,
  at least 2; or ``root/train`` and ``root/test`` holding such folders, :func:`_split_layout`
  says which), decoded by a DataLoader with ``workers`` processes, converted to RGB and
  resized to ``image_size`` x ``image_size``; the class names are the folder names
  (:func:`dataset_info` with ``root``) and the normalisation is computed from the run's
  images (:meth:`DatasetInfo.with_stats`). Symbolic links are followed, but a folder or an
  image reached twice is refused (:func:`_image_files`).

Images are ``uint8``: ``[n, H, W]`` for one channel, ``[n, H, W, C]`` (channel last, as
CIFAR stores them and matplotlib shows them) for colour; :func:`normalize_images` turns them
into the models' float32 ``[n, C, H, W]`` input. Only ``download=True`` touches the network.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "DATASETS", "DatasetInfo", "FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN", "FASHION_MNIST_ROOT",
    "FASHION_MNIST_STD", "IMAGE_FOLDER_SIZE", "channel_stats", "dataset_info", "decode_dataset",
    "load_fashion_mnist", "load_subset", "normalize_images", "subset_index",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLITS = ("train", "test")
# IDX type codes (third byte of the magic number) -> numpy dtype (big endian).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGE_FOLDER_SIZE = 32  # the default --image-size of imagefolder: the paper's CIFAR size
IMAGE_FOLDER_ROOT = "dataset imagefolder needs root (--root DIR: one folder of images per class)"


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({count * dtype.itemsize} bytes) but the "
            f"file holds {len(data) - header} bytes of data"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def load_fashion_mnist(
    root: str = FASHION_MNIST_ROOT, split: str = "train", *, download: bool = False, **_
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads Fashion-MNIST from IDX gzip files (the Debian package's layout).

    Args:
        root: folder holding ``train-images-idx3-ubyte.gz`` etc.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        download: where the files are missing, let torchvision fetch them into ``root``
            (``root/FashionMNIST/raw``, which later calls read without ``download``) instead
            of raising.

    Returns:
        ``(images, labels)``: ``uint8 [n, 28, 28]`` and ``int64 [n]`` tensors.

    Raises:
        FileNotFoundError: naming the Debian package when the files are missing.
    """
    _check_split(split)
    paths = [os.path.join(root, name) for name in _FILES[split]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing and (download or os.path.isdir(os.path.join(root, "FashionMNIST", "raw"))):
        return _torchvision("FashionMNIST", root, split, download=download)
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), pass root= (--root) a "
            "folder holding the IDX gzip files, or download=True (--download)."
        )
    images = _read_idx(paths[0])
    labels = _read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST {split}: unexpected shapes images {images.shape}, labels {labels.shape}"
        )
    return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))


def _torchvision(name: str, root: str, split: str, *, download: bool = False,
                 **_) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision dataset's split as ``(uint8 [n, H, W] or [n, H, W, C], int64 [n])``.

    torchvision checks the files (the md5 of CIFAR's and SVHN's) and raises RuntimeError
    when they are missing or damaged: re-raised as FileNotFoundError naming the folder."""
    _check_split(split)
    import torchvision.datasets as tvd

    cls = getattr(tvd, name)
    try:
        ds = (cls(root, split=split, download=download) if name == "SVHN"
              else cls(root, train=split == "train", download=download))
    except RuntimeError as exc:
        raise FileNotFoundError(
            f"{name} {split} split not found or damaged under --root {root} ({exc}); put the "
            f"files there as torchvision lays them out, or pass --download") from None
    images = torch.as_tensor(np.asarray(ds.data))
    if name == "SVHN":  # stored [n, C, H, W]
        images = images.permute(0, 2, 3, 1).contiguous()
    labels = getattr(ds, "targets", None)
    labels = ds.labels if labels is None else labels
    return images.to(torch.uint8), torch.as_tensor(np.asarray(labels), dtype=torch.int64)


def _image_folder_dir(root: str, split: str) -> str:
    """``root/<split>`` in the split layout (:func:`_split_layout`), else ``root`` itself
    (the training split; such a root has no test split)."""
    _check_split(split)
    if _split_layout(root):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"imagefolder: no {split} split: {folder} is not a folder")
        return folder
    if split == "test":
        raise FileNotFoundError(
            f"imagefolder: --root {root} holds one split (class folders); put the images in "
            f"{os.path.join(root, 'train')} and {os.path.join(root, 'test')} for a test split")
    return root


def _split_layout(root: str) -> bool:
    """Whether ``root`` holds splits (``train/`` and optionally ``test/``, each holding the
    class folders) rather than class folders: its only folders are ``train`` and
    ``test`` (or ``train`` alone), and each of them holds at least one folder and no image
    file of its own. Otherwise its folders are the classes, a folder named ``train`` or
    ``test`` included."""
    folders = {e.name: e.path for e in os.scandir(root) if e.is_dir()}
    if "train" not in folders or set(folders) - set(SPLITS):
        return False
    for path in folders.values():
        entries = list(os.scandir(path))
        if not any(e.is_dir() for e in entries) or any(
                not e.is_dir() and _is_image(e.name) for e in entries):
            return False
    return True


def _is_image(name: str) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return name.lower().endswith(IMG_EXTENSIONS)


def _image_files(folder: str, classes: Sequence[str]) -> list[tuple[str, int]]:
    """``(path, class index)`` of every image under ``folder/<class>`` for each of
    ``classes``, in torchvision ``ImageFolder``'s order (class, then folder path, then file
    name).

    Symbolic links are followed, but every folder and every image file is read once: a
    link that leads to a folder already read (a loop such as ``a/loop -> ..``, or a second
    way into a folder), to a folder that holds ``folder`` itself, or to an image file already
    listed is refused with a ValueError naming the link, so that no image is counted (or
    labelled) twice. Classes without images raise FileNotFoundError."""
    top = os.path.realpath(folder)
    seen_dirs, seen_files = {top: folder}, {}
    samples, empty = [], []
    for index, name in enumerate(classes):
        listing: list[tuple[str, list[str]]] = []
        _walk(os.path.join(folder, name), top, seen_dirs, seen_files, listing)
        found = [(os.path.join(d, f), index) for d, files in sorted(listing)
                 for f in sorted(files)]
        empty += [] if found else [name]
        samples += found
    if empty:
        raise FileNotFoundError(f"imagefolder: no image in the class folder(s) {empty} of "
                                f"{folder} (images end in .png, .jpg, ...)")
    return samples


def _walk(path: str, top: str, seen_dirs: dict, seen_files: dict, listing: list) -> None:
    """Appends ``(folder, image file names)`` for ``path`` and every folder under it
    (:func:`_image_files`'s rules on links)."""
    real = os.path.realpath(path)
    if real in seen_dirs:
        raise ValueError(f"imagefolder: {path} and {seen_dirs[real]} are the same folder {real} "
                         "(a symbolic link loop or a second link to it); every folder is read "
                         "once: remove the link")
    if top.startswith(real.rstrip(os.sep) + os.sep):
        raise ValueError(f"imagefolder: {path} leads to {real}, which holds the image folder "
                         f"{top} (a symbolic link loop): remove the link")
    seen_dirs[real] = path
    files = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_dir():
            _walk(entry.path, top, seen_dirs, seen_files, listing)
        elif _is_image(entry.name):
            target = os.path.realpath(entry.path)
            if target in seen_files:
                raise ValueError(f"imagefolder: {entry.path} and {seen_files[target]} are the "
                                 f"same image file {target} (through a symbolic link); every "
                                 "image is read once: remove the link")
            seen_files[target] = entry.path
            files.append(entry.name)
    listing.append((path, files))


class _ImageFiles(torch.utils.data.Dataset):
    """``(image, label)`` of listed image files, each read by torchvision's loader and
    ``transform`` (module level: DataLoader workers pickle it)."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[i]
        return self.transform(default_loader(path)), label


def _rgb(image):
    """A PIL image in RGB (a module-level function: DataLoader workers pickle it)."""
    return image.convert("RGB")


def load_image_folder(root: str, split: str = "train", *, image_size: int | None = None,
                      workers: int = 0, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """An image folder's split (``root/<class>/<image>``, or ``root/train/<class>/...`` and
    ``root/test/<class>/...``: :func:`_split_layout` says which), decoded by a DataLoader
    with ``workers`` processes. Links are followed, each folder and image once
    (:func:`_image_files`).

    Returns ``(uint8 [n, S, S, 3], int64 [n])`` with S = ``image_size`` (default
    :data:`IMAGE_FOLDER_SIZE`): every image converted to RGB and resized to S x S (bilinear,
    antialiased; the aspect ratio is not kept). Labels are the indices of the *training*
    split's class folders in sorted order (torchvision's rule; a test split lacking a class
    keeps the others' indices)."""
    from torchvision import transforms
    from torchvision.datasets.folder import find_classes

    size = int(image_size or IMAGE_FOLDER_SIZE)
    tf = transforms.Compose([transforms.Lambda(_rgb), transforms.Resize((size, size)),
                             transforms.PILToTensor()])
    folder = _image_folder_dir(root, split)
    names = find_classes(folder)[0]
    classes = image_folder_classes(root)
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"imagefolder: the {split} split has classes {unknown} that the "
                         f"training split lacks (training classes: {', '.join(classes)})")
    to_train = [classes.index(c) for c in names]
    samples = [(path, to_train[label]) for path, label in _image_files(folder, names)]
    images, labels = _read_all(_ImageFiles(samples, tf), workers)
    return images.permute(0, 2, 3, 1).contiguous(), labels


def image_folder_classes(root: str) -> tuple[str, ...]:
    """The class names of an image folder's training split: its sorted sub-folders; at
    least 2 (prediction depth compares classes)."""
    from torchvision.datasets.folder import find_classes

    folder = _image_folder_dir(root, "train")
    classes = tuple(find_classes(folder)[0])
    if len(classes) < 2:
        raise ValueError(f"imagefolder: --root {root} holds {len(classes)} class folder "
                         f"({', '.join(classes)} in {folder}); prediction depth needs at least "
                         "2 classes, one folder of images each")
    return classes


# Per-pixel statistics of the Fashion-MNIST training images (scaled to [0, 1]).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset: its default folder, class names, channels, image size (square), the
    per-channel mean and std of its training images scaled to [0, 1] (None: computed from
    the run's images, :meth:`with_stats`) and its loader ``load(root, split, *,
    download=False, workers=0, image_size=None) -> (images uint8, labels int64)``."""

    name: str
    root: str | None
    classes: tuple[str, ...]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    load: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    channels: int = 1
    image_size: int = 28

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def with_stats(self, images: torch.Tensor) -> DatasetInfo:
        """This entry with ``mean`` / ``std`` computed from ``images`` where the table has
        none (imagefolder); else itself."""
        if self.mean is not None:
            return self
        mean, std = channel_stats(images)
        return dataclasses.replace(self, mean=mean, std=std)


def _tv(name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def load(root: str, split: str = "train", **options):
        return _torchvision(name, root, split, **options)
    load.__name__ = f"load_{name.lower()}"
    return load


_DIGITS = tuple(str(i) for i in range(10))
_CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
            "truck")
_CIFAR100 = tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy
bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach
couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house
kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain
mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate
poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper
snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television
tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())
_DATA_HOME = os.path.join(os.path.expanduser("~"), ".cache", "pdepth", "data")

# The dataset table: everything the protocol needs to know about a dataset, by name. The
# statistics are the per-channel mean and std of each training split, scaled to [0, 1].
#: The datasets ``pdepth run --dataset`` knows: name -> :class:`DatasetInfo`.
DATASETS = {
    "fashion-mnist": DatasetInfo("fashion-mnist", FASHION_MNIST_ROOT, FASHION_MNIST_CLASSES,
                                 (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,),
                                 load_fashion_mnist),
    "mnist": DatasetInfo("mnist", _DATA_HOME, _DIGITS, (0.1307,), (0.3081,), _tv("MNIST")),
    "cifar10": DatasetInfo("cifar10", _DATA_HOME, _CIFAR10, (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616), _tv("CIFAR10"), 3, 32),
    "cifar100": DatasetInfo("cifar100", _DATA_HOME, _CIFAR100, (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762), _tv("CIFAR100"), 3, 32),
    "svhn": DatasetInfo("svhn", _DATA_HOME, _DIGITS, (0.4377, 0.4438, 0.4728),
                        (0.1980, 0.2010, 0.1970), _tv("SVHN"), 3, 32),
    "imagefolder": DatasetInfo("imagefolder", None, (), None, None, load_image_folder, 3,
                               IMAGE_FOLDER_SIZE),
}


def dataset_info(dataset: str, root: str | None = None,
                 image_size: int | None = None) -> DatasetInfo:
    """The table entry of ``dataset``; ValueError naming the valid ones for another name.

    For ``imagefolder`` the entry is resolved against ``root`` (its class folders give the
    class names; without a root they are unknown, ``()``) and ``image_size`` (default
    :data:`IMAGE_FOLDER_SIZE`); the other datasets have a fixed size, so ``image_size`` must
    be None or theirs."""
    try:
        info = DATASETS[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: "
                         f"{', '.join(DATASETS)}") from None
    if image_size is not None and (int(image_size) < 8 or (
            info.name != "imagefolder" and int(image_size) != info.image_size)):
        raise ValueError(f"image_size (--image-size) {image_size!r}: "
                         + ("must be at least 8" if int(image_size) < 8 else
                            f"{info.name} images are {info.image_size}x{info.image_size}; "
                            "only imagefolder is resized"))
    if info.name != "imagefolder":
        return info
    if root is None:  # the class names come with the folder
        return dataclasses.replace(info, image_size=int(image_size or info.image_size))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"imagefolder: --root {root} is not a folder")
    return dataclasses.replace(info, root=root, classes=image_folder_classes(root),
                               image_size=int(image_size or info.image_size))


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``uint8`` images (``[n, H, W]`` or ``[n, H, W, C]``)
    scaled to [0, 1], in float64."""
    x = images.reshape(images.shape[0], images.shape[1], images.shape[2], -1)
    x = x.to(torch.float64).div_(255.0)
    mean = x.mean(dim=(0, 1, 2))
    std = x.std(dim=(0, 1, 2), unbiased=False).clamp_min(1e-6)  # a constant channel: no /0
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def normalize_images(images: torch.Tensor, mean: float | Sequence[float] = FASHION_MNIST_MEAN,
                     std: float | Sequence[float] = FASHION_MNIST_STD) -> torch.Tensor:
    """``uint8 [n, H, W]`` (one channel) or ``[n, H, W, C]`` (channel last) -> float32
    ``[n, C, H, W]``, scaled to [0, 1] and standardised per channel (``mean`` / ``std``: one
    value, or one per channel)."""
    x = images.to(torch.float32).div_(255.0)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()
    shape = (1, -1, 1, 1)
    return x.sub_(torch.tensor(mean, dtype=torch.float32).reshape(shape)).div_(
        torch.tensor(std, dtype=torch.float32).reshape(shape))


def load_subset(
    dataset: str = "fashion-mnist",
    root: str | None = None,
    subset: int | None = None,
    seed: int = 0,
    split: str = "train",
    **options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random subset of a dataset's split, without replacement, in a fixed order.

    ``options`` go to the loader (``download``, ``workers``, ``image_size``). Returns
    ``(images uint8 [n, H, W] or [n, H, W, C], labels int64 [n], dataset_index int64 [n])``,
    where ``dataset_index`` are the examples' indices in the full split (sorted ascending).
    ``subset`` None (or >= the split size) takes the whole split.
    """
    info = dataset_info(dataset)
    if info.name == "imagefolder" and root is None:
        raise ValueError("dataset imagefolder needs root (--root DIR: one folder per class)")
    # only the options that are set: a loader may take (root, split) alone
    images, labels = info.load(root or info.root, split,
                               **{k: v for k, v in options.items() if v})
    index = subset_index(labels.shape[0], subset, seed)
    return images[index], labels[index], index


def subset_index(total: int, subset: int | None, seed: int) -> torch.Tensor:
    """``int64 [n]``: a seeded random subset of ``range(total)`` without replacement, sorted
    ascending; every index when ``subset`` is None or >= ``total``."""
    if subset is None or subset >= total:
        return torch.arange(total)
    if subset < 2:
        raise ValueError(f"subset must be at least 2, got {subset}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(total, generator=gen)[:subset].sort().values


def _as_image(item) -> torch.Tensor:
    """One image of a user Dataset as a tensor ``[C, H, W]`` (uint8 or float)."""
    if hasattr(item, "convert") and hasattr(item, "mode"):  # a PIL image
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(item if item.mode in ("L", "RGB") else item.convert("RGB"))
    t = torch.as_tensor(np.asarray(item) if not isinstance(item, torch.Tensor) else item)
    return t.unsqueeze(0) if t.dim() == 2 else t


def _collate(batch):
    """``(images [B, C, H, W], labels [B])`` of a batch of ``(image, label, ...)`` items."""
    bad = [type(item).__name__ for item in batch if not isinstance(item, (tuple, list))
           or len(item) < 2]
    if bad:
        raise ValueError(f"dataset items must be (image, label) pairs, got a {bad[0]}")
    images = [_as_image(item[0]) for item in batch]
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"dataset images must share one shape [C, H, W] (or be PIL images of "
                         f"one size), got shapes {sorted(shapes)[:3]}")
    return torch.stack(images), torch.as_tensor([int(item[1]) for item in batch])


def _read_all(dataset, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``(image, label)`` of a map-style Dataset, in order, through a DataLoader with
    ``workers`` processes: ``(images [n, C, H, W] as they come, labels int64 [n])``."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=int(workers),
                                         collate_fn=_collate)
    batches = list(loader)
    return (torch.cat([b[0] for b in batches]),
            torch.cat([b[1] for b in batches]).to(torch.int64))


def decode_dataset(dataset, workers: int = 0):
    """Reads every ``(image, label)`` of a map-style ``torch.utils.data.Dataset`` through a
    DataLoader with ``workers`` processes.

    Images: PIL images (grey or RGB; others converted to RGB) or tensors / arrays
    ``[C, H, W]`` (or ``[H, W]``), all of one square size. ``uint8`` images are normalised
    like imagefolder's (per-channel statistics of the run's examples); float images are the
    models' input as they are (the report shows them min-max scaled).

    Returns ``(images uint8 [n, H, W] or [n, H, W, C], labels int64 [n], x float32
    [n, C, H, W] or None for uint8 images, classes)``: the class names are the dataset's
    ``classes`` attribute where it names every label, else ``"0"``, ``"1"``, ...
    """
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError(f"dataset must be a map-style torch.utils.data.Dataset (with "
                         f"__len__ and __getitem__), got {type(dataset).__name__}")
    if len(dataset) < 4:
        raise ValueError(f"dataset holds {len(dataset)} examples; a run needs at least 4")
    x, labels = _read_all(dataset, workers)
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"dataset images must be square (the models take image_size x "
                         f"image_size), got {x.shape[2]}x{x.shape[3]}")
    if x.dtype == torch.uint8:
        images, x = x, None
    else:
        x = x.to(torch.float32)
        lo, hi = float(x.min()), float(x.max())
        images = ((x - lo) * (255.0 / max(hi - lo, 1e-12))).round_().to(torch.uint8)
    images = images[:, 0] if images.shape[1] == 1 else images.permute(0, 2, 3, 1).contiguous()
    names = getattr(dataset, "classes", None)
    count = int(labels.max()) + 1 if labels.numel() else 0
    classes = (tuple(str(c) for c in names) if names is not None and len(names) >= count
               else tuple(str(i) for i in range(count)))
    return images, labels, x, classes
