"""Decode once: a split's images, resized to the model's input, kept as one memory-mapped uint8 array.

VTAB-1k's protocol trains some 45 runs x 100 epochs on the same 1,000 images with no augmentation,
so the decoded, resized pixels of a split are the same in every epoch and every run. For a split
whose transform is deterministic (geometry steps, then ToTensor and Normalize), the geometry is
applied once per image and the uint8 result stored under ``$IVPT_CACHE`` (default
~/.cache/ivpt) as ``tensors/<key>.npy``, memory-mapped, so every process and run shares one copy
and memory stays bounded. The key is a sha256 over every file's content, the decoder's version, the
geometry steps and the output size, so a changed file, decoding, size or transform never reuses a stale
cache. ToTensor's /255 and Normalize run on the device, on the batch (``normalize_batch``), exactly
as the uncached transform computes them. A cache is built under an OS file lock (one builder; others
wait and reuse it), written to a temporary name and renamed; a corrupt file (its recorded sha256 no
longer matches) is rebuilt with a warning.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset
from torchvision import transforms as T

from .datasets import ImageListDataset, open_rgb
from .paths import sha256_file

RANDOM_STEPS = (T.RandomCrop, T.RandomResizedCrop, T.RandomHorizontalFlip, T.RandomVerticalFlip,
                T.RandomRotation, T.RandomAffine, T.ColorJitter, T.RandomApply, T.RandomChoice, T.RandomOrder)


def cache_root() -> Path:
    return Path(os.environ.get("IVPT_CACHE") or Path.home() / ".cache" / "ivpt")


# augmentation steps that act on a decoded uint8 tensor exactly as on the PIL image (pure indexing, the same
# random draws): a split whose transform ends with them caches what comes before and applies them per access
EXACT_ON_TENSORS = (T.RandomCrop, T.RandomHorizontalFlip)


def split_transform(transform) -> tuple[list, list, tuple, tuple] | None:
    """(deterministic geometry, exact random steps, mean, std) of ``Compose([..., ToTensor(), Normalize()])``.

    None where caching would change the pixels: other random steps (RandomResizedCrop resamples), a
    padded crop, or anything but Resize / CenterCrop before them."""
    steps = getattr(transform, "transforms", None)
    if not steps or len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return None
    body = steps[:-2]
    cut = next((i for i, step in enumerate(body) if isinstance(step, RANDOM_STEPS)), len(body))
    geometry, augment = body[:cut], body[cut:]
    if any(not isinstance(step, (T.Resize, T.CenterCrop)) for step in geometry):
        return None
    if any(type(step) not in EXACT_ON_TENSORS or getattr(step, "padding", None) for step in augment):
        return None
    return geometry, augment, tuple(float(m) for m in steps[-1].mean), tuple(float(s) for s in steps[-1].std)


class NormalizeBatch:
    """ToTensor's /255 and Normalize on a uint8 batch (N, 3, H, W), wherever the batch is."""

    def __init__(self, mean, std):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype != torch.uint8:
            return batch  # an uncached split's batches are normalised already
        mean = torch.tensor(self.mean, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, -1, 1, 1)
        # ToTensor's and Normalize's own operations in their order (bit for bit), in place on one new tensor
        return batch.float().div_(255).sub_(mean).div_(std)


class CachedImages(Dataset):
    """A cached split: uint8 images (memory-mapped, or on a device) and labels; normalise with ``normalize_batch``.

    Images of one size are one (N, 3, H, W) array; images of varying sizes (a resize that keeps the
    aspect ratio, before random crops) are one flat array with each image's offset and shape, and the
    split's random crop and flip act on each decoded tensor per access."""

    def __init__(self, images, labels: np.ndarray, classes: list[str], normalize_batch: NormalizeBatch,
                 path: Path | None, source: ImageListDataset, shapes: list | None = None, augment=None):
        self.images, self.labels_array, self.classes = images, labels, classes
        self.normalize_batch, self.path, self.source = normalize_batch, path, source
        self.root, self.items = source.root, source.items  # what reports of skipped files look up
        self.shapes, self.augment = shapes, T.Compose(augment) if augment else None
        if shapes is not None:
            sizes = [int(np.prod(shape)) for shape in shapes]
            self.offsets = np.concatenate([[0], np.cumsum(sizes)])

    def __len__(self) -> int:
        return len(self.labels_array)

    def __getitem__(self, index: int):
        if self.shapes is not None:
            start, stop = self.offsets[index], self.offsets[index + 1]
            image = torch.from_numpy(np.array(self.images[start:stop])).view(*self.shapes[index])
        else:
            image = self.images[index]
            if isinstance(image, np.ndarray):
                image = torch.from_numpy(np.array(image))  # a copy: the memory map is read-only
        if self.augment is not None:
            image = self.augment(image)
        return image, int(self.labels_array[index])

    @property
    def labels(self) -> np.ndarray:
        return self.labels_array

    def to_device(self, device: torch.device) -> "CachedImages":
        """The whole split as one tensor on ``device`` (small splits: no copies per step at all)."""
        if self.shapes is not None or self.augment is not None:  # random crops and flips act per access, on the host
            return self
        images = torch.from_numpy(np.array(self.images)).to(device)
        return CachedImages(images, self.labels_array, self.classes, self.normalize_batch, self.path, self.source)


# Bumped whenever open_rgb decodes some file differently (2: 16-bit greyscale scaled, not clipped white), so
# that a cache built by an older ivpt is never served as this one's reading of the same files
DECODER_VERSION = 2


def cache_key(dataset: ImageListDataset, geometry: list) -> str:
    digest = hashlib.sha256()
    digest.update(f"decoder {DECODER_VERSION}\n".encode())
    digest.update(repr([repr(step) for step in geometry]).encode())
    if dataset.upright:  # decoded with EXIF orientation applied; caches built before that stay keyed as they were
        digest.update(b"upright\n")
    for rel, label in dataset.items:
        digest.update(f"{rel}|{label}|{sha256_file(Path(dataset.root) / rel)}\n".encode())
    return digest.hexdigest()


def cached(dataset: Dataset, root: Path | None = None, warn=warnings.warn) -> Dataset:
    """The dataset served from the tensor cache where its transform allows; otherwise itself."""
    if isinstance(dataset, ConcatDataset):  # e.g. trainval: cached only if every part is, alike
        parts = [cached(part, root, warn) for part in dataset.datasets]
        norms = {(p.normalize_batch.mean, p.normalize_batch.std) if isinstance(p, CachedImages) else None
                 for p in parts}
        if len(norms) != 1 or None in norms:
            return dataset
        joined = ConcatDataset(parts)
        joined.normalize_batch = parts[0].normalize_batch
        return joined
    if not isinstance(dataset, ImageListDataset):
        return dataset
    pieces = split_transform(dataset.transform)
    if pieces is None:
        return dataset
    geometry, augment, mean, std = pieces
    folder = (root or cache_root()) / "tensors"
    folder.mkdir(parents=True, exist_ok=True)
    key = cache_key(dataset, geometry)
    data, meta = folder / f"{key}.npy", folder / f"{key}.json"
    with open(folder / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; a second process waits, then finds it built
        if not _valid(data, meta, len(dataset), warn):
            _build(dataset, geometry, data, meta)
    images = np.load(data, mmap_mode="r")
    shapes = json.loads(meta.read_text()).get("shapes")
    return CachedImages(images, dataset.labels, dataset.classes, NormalizeBatch(mean, std), data, dataset,
                        shapes=shapes, augment=augment)


def _valid(data: Path, meta: Path, count: int, warn) -> bool:
    if not data.is_file() and not meta.is_file():
        return False
    try:
        record = json.loads(meta.read_text())
        ok = record["count"] == count and sha256_file(data) == record["sha256"]
    except (OSError, ValueError, KeyError):
        ok = False
    if not ok:
        warn(f"tensor cache {data} is damaged or incomplete; rebuilding it")
    return ok


def _build(dataset: ImageListDataset, geometry: list, data: Path, meta: Path) -> None:
    """Decode every image once; one (N, 3, H, W) array if they share a size, else one flat array and shapes."""
    compose = T.Compose([*geometry, T.PILToTensor()])
    raw = data.with_name(f".{data.stem}.raw-{os.getpid()}")
    shapes = []
    with open(raw, "wb") as stream:  # decoded pixels streamed to disk: memory stays bounded for large splits
        for rel, _ in dataset.items:
            image = compose(open_rgb(Path(dataset.root) / rel, dataset.upright)).numpy()
            shapes.append(list(image.shape))
            stream.write(image.tobytes())
    ragged = any(shape != shapes[0] for shape in shapes)
    pixels = np.memmap(raw, dtype=np.uint8, mode="r")
    tmp = data.with_name(f".{data.stem}.tmp-{os.getpid()}.npy")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                      shape=(len(pixels),) if ragged else (len(shapes), *shapes[0]))
    flat = array.reshape(-1)
    for start in range(0, len(pixels), 1 << 26):
        flat[start:start + (1 << 26)] = pixels[start:start + (1 << 26)]
    array.flush()
    del array, flat, pixels
    raw.unlink()
    os.replace(tmp, data)
    record = {"count": len(dataset), "shape": None if ragged else shapes[0], "shapes": shapes if ragged else None,
              "sha256": sha256_file(data), "root": str(dataset.root), "geometry": [repr(s) for s in geometry]}
    tmp_meta = meta.with_name(f".{meta.name}.tmp-{os.getpid()}")
    tmp_meta.write_text(json.dumps(record))
    os.replace(tmp_meta, meta)


def normalizer_of(dataset) -> NormalizeBatch | None:
    while dataset is not None:
        norm = getattr(dataset, "normalize_batch", None)
        if norm is not None:
            return norm
        dataset = getattr(dataset, "dataset", None)  # through wrappers such as SkipUnreadable
    return None


def to_device(images: torch.Tensor, dataset, device: torch.device) -> torch.Tensor:
    """A batch on ``device`` (non-blocking from pinned memory), normalised there if it came from the cache."""
    images = images.to(device, non_blocking=images.is_pinned())
    norm = normalizer_of(dataset)
    return norm(images) if norm is not None else images
