"""Dataset classes shared by every layout: images listed on disk, or decoded arrays in memory."""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif") + (
    (".avif",) if features.check("avif") else ())
# Image formats Pillow cannot decode (phone HEIC, camera raw, vector): listed so that a folder holding
# them is refused, and `ivpt predict` reports them, instead of skipping them unseen.
UNREADABLE_IMAGE_SUFFIXES = tuple(s for s in (".heic", ".heif", ".avif", ".dng", ".cr2", ".cr3", ".nef",
                                              ".arw", ".orf", ".rw2", ".raf", ".svg") if s not in IMAGE_SUFFIXES)


class DataError(ValueError):
    """A dataset on disk does not follow its layout, or one of its files is unusable."""


# Folders that file systems and tools add beside the user's images: a NAS's thumbnails (Synology's
# @eaDir/<photo>.jpg/SYNOPHOTO_THUMB_*.jpg), a macOS zip's resource forks, Windows' recycle bin
METADATA_FOLDERS = frozenset({"@eaDir", "__MACOSX", "$RECYCLE.BIN", "System Volume Information", "@Recycle",
                              "#recycle", "__pycache__"})


def hidden(name: str) -> bool:
    """Whether a file or folder name is not the user's data: hidden (.x, macOS's ._x.jpg) or metadata."""
    return name.startswith(".") or name in METADATA_FOLDERS


def visible_files(folder: Path) -> list[Path]:
    """Files under ``folder``, sorted, without hidden or metadata ones (.ipynb_checkpoints/, ._x.jpg,
    @eaDir/). Symlinked subfolders are followed (pathlib's rglob does not, before Python 3.13), each
    real folder once, so a link that loops back is not walked forever."""
    found, walked = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in walked:
            dirs[:] = []
            continue
        walked.add(real)
        dirs[:] = [d for d in dirs if not hidden(d)]
        found += [Path(top) / f for f in files if not hidden(f) and (Path(top) / f).is_file()]
    return sorted(found)


def open_rgb(path: str | Path, upright: bool = True) -> Image.Image:
    """Open an image as RGB, naming the file when it is missing or cannot be decoded.

    ``upright`` applies the EXIF Orientation tag, as image viewers do: a phone stores a portrait photo
    as landscape pixels plus that tag, and without it the model trains and predicts on a rotated or
    mirrored picture (heat maps of `ivpt explain` would not line up with what the user sees).
    Benchmark loaders and segmentation pass False: their protocols and label maps use the stored pixels.

    16-bit greyscale (PNG/TIFF, Pillow's modes I;16* and I) is scaled from 0..65535 to 0..255: Pillow's
    own conversion clips every value above 255, turning such an image white. Other high-depth modes
    (32-bit integers beyond 16 bits, floats) have no one meaning of their range, so they are refused.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            if upright:
                img = ImageOps.exif_transpose(img)  # a copy when the tag turns it; itself otherwise
            if img.mode.startswith("I;16") or img.mode in ("I", "F"):
                return _high_depth_to_rgb(img, path)
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise DataError(f"image file not found: {path}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        hint = f" ({path.suffix} is not a format ivpt reads: convert it to JPEG or PNG)" \
            if path.suffix.lower() in UNREADABLE_IMAGE_SUFFIXES else ""
        raise DataError(f"cannot decode image {path}: {err}{hint}") from err


def _high_depth_to_rgb(img: Image.Image, path: Path) -> Image.Image:
    values = np.asarray(img)
    if img.mode == "F" or values.min() < 0 or values.max() > 65535:
        raise DataError(f"cannot read image {path}: mode {img.mode} with values {values.min():g}..{values.max():g} "
                        "has no known range; expected 8- or 16-bit images (save it as 16-bit PNG or 8-bit)")
    if 0 < values.max() <= 4095 and not _WARNED_NARROW:
        # 12-bit sensors (X-ray, microscopy) store 0..4095 in 16-bit files: scaled as 16-bit, nearly black
        _WARNED_NARROW.append(path)
        warnings.warn(f"{path}: a 16-bit image whose values reach only {values.max()} (12-bit data?) is read as "
                      "0..65535 and comes out nearly black; scale such images to the full 16-bit range (or save "
                      "them as 8-bit) first (said once)", stacklevel=2)
    grey = np.round(values.astype(np.float64) * (255 / 65535)).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


_WARNED_NARROW: list[Path] = []


def require_known(what: str, value: str, known) -> None:
    """DataError naming ``what`` and the accepted values when ``value`` is not among them."""
    if value not in known:
        raise DataError(f"unknown {what} {value!r}; expected one of {', '.join(known)}")


def check_labels(labels: Sequence[int], num_classes: int, where: str) -> None:
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise DataError(f"{where}: label {bad} is outside the class range 0..{num_classes - 1}")


@dataclass
class ImageListDataset(Dataset):
    """(image file, label) pairs read lazily from disk."""

    root: Path
    items: list[tuple[str, int]]
    classes: list[str]
    transform: Callable | None = None
    upright: bool = True  # apply EXIF orientation (see open_rgb)

    def __post_init__(self):
        check_labels([label for _, label in self.items], len(self.classes), str(self.root))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        rel, label = self.items[index]
        image = open_rgb(self.root / rel, self.upright)
        return (self.transform(image) if self.transform else image), label

    @property
    def labels(self) -> np.ndarray:
        return np.array([label for _, label in self.items], dtype=np.int64)


class SkipUnreadable(Dataset):
    """A dataset whose unreadable items become None (with a warning line each), recorded in ``skipped``.

    For evaluation on imperfect folders; pair it with ``collate_readable`` and zero loader workers
    (``skipped`` lives in this process).
    """

    def __init__(self, dataset: Dataset, warn=None):
        self.dataset, self.skipped = dataset, []
        self.warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except DataError as err:
            self.skipped.append({"index": int(index), "error": str(err)})
            self.warn(f"warning: skipped: {err}")
            return None


def collate_readable(batch):
    """default_collate over the readable items; (None, None) when a whole batch was unreadable."""
    from torch.utils.data import default_collate

    items = [item for item in batch if item is not None]
    return default_collate(items) if items else (None, None)


@dataclass
class ArrayDataset(Dataset):
    """Decoded images (N, H, W) gray or (N, H, W, 3) RGB uint8, with labels, held in memory."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    transform: Callable | None = None

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
            raise DataError(f"images must be uint8 (N,H,W) or (N,H,W,3), got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        check_labels(self.labels, len(self.classes), "array dataset")

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    def __getitem__(self, index: int):
        image = self.image(index)
        return (self.transform(image) if self.transform else image), int(self.labels[index])

    def subset(self, indices) -> "ArrayDataset":
        indices = np.asarray(indices)
        return ArrayDataset(self.images[indices], self.labels[indices], self.classes, self.transform)
