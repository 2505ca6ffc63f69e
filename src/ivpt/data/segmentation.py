"""Segmentation data: ADE20K in its released layout, CamVid from the shared tar, and the joint
image/mask transforms of common segmentation recipes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from .datasets import DataError, open_rgb, require_known
from .sources import CAMVID_CLASSES, CAMVID_IGNORE, camvid

IGNORE_INDEX = 255
ADE20K_CLASSES = 150
ADE20K_SPLITS = {"train": "training", "val": "validation"}


def _open_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            mask = np.asarray(img)
    except FileNotFoundError as err:
        raise DataError(f"annotation file not found: {path}") from err
    except Exception as err:
        raise DataError(f"cannot decode annotation {path}: {err}") from err
    if mask.ndim != 2:
        raise DataError(f"annotation {path} is not a single-channel label map (shape {mask.shape})")
    return mask


def ade20k_pairs(root, split: str) -> list[tuple[Path, Path]]:
    """(image, annotation) pairs of ``ADEChallengeData2016/{images,annotations}/{training,validation}``."""
    require_known("ADE20K split", split, ADE20K_SPLITS)
    base = Path(root)
    if (base / "ADEChallengeData2016").is_dir():
        base = base / "ADEChallengeData2016"
    images, annotations = base / "images" / ADE20K_SPLITS[split], base / "annotations" / ADE20K_SPLITS[split]
    for folder in (images, annotations):
        if not folder.is_dir():
            raise DataError(f"ADE20K folder not found: {folder} (expected ADEChallengeData2016/images|annotations/"
                            "training|validation)")
    pairs = []
    for image in sorted(images.glob("*.jpg")):
        mask = annotations / f"{image.stem}.png"
        if not mask.is_file():
            raise DataError(f"ADE20K image {image.name} has no annotation {mask}")
        pairs.append((image, mask))
    if not pairs:
        raise DataError(f"no .jpg images in {images}")
    return pairs


def ade20k_labels(mask: np.ndarray) -> np.ndarray:
    """ADE20K: 0 is 'other' and ignored; classes 1..150 become 0..149."""
    out = mask.astype(np.int64) - 1
    out[mask == 0] = IGNORE_INDEX
    if out[out != IGNORE_INDEX].max(initial=0) >= ADE20K_CLASSES:
        raise DataError(f"ADE20K label {int(mask.max())} is outside 0..{ADE20K_CLASSES}")
    return out


def camvid_labels(mask: np.ndarray) -> np.ndarray:
    out = mask.astype(np.int64)
    out[mask == CAMVID_IGNORE] = IGNORE_INDEX
    return out


class SegmentationDataset(Dataset):
    """Images and label maps, from files (ADE20K) or arrays (CamVid), through a joint transform."""

    def __init__(self, items, classes: list[str], transform=None, remap=None, names=None):
        self.items, self.classes, self.transform, self.remap = items, classes, transform, remap
        self.names = names

    def __len__(self):
        return len(self.items)

    def _where(self, index) -> str:
        image, mask = self.items[index]
        if isinstance(image, (str, Path)):
            return f"{image} and {mask}"
        return self.names[index] if self.names else f"item {index}"

    def load(self, index) -> tuple[Image.Image, np.ndarray]:
        image, mask = self.items[index]
        if isinstance(image, (str, Path)):
            # label maps annotate the stored pixel grid, so EXIF orientation is not applied to the image
            image, mask = open_rgb(image, upright=False), _open_mask(Path(mask))
        else:
            image = Image.fromarray(image)
        if image.size != (mask.shape[1], mask.shape[0]):
            raise DataError(f"image and annotation sizes differ for {self._where(index)}: "
                            f"{image.size} vs {mask.shape[::-1]}")
        return image, self.remap(mask) if self.remap else mask.astype(np.int64)

    def __getitem__(self, index):
        image, mask = self.load(index)
        return self.transform(image, mask) if self.transform else (image, mask)


def ade20k(root, split: str, transform=None) -> SegmentationDataset:
    return SegmentationDataset(ade20k_pairs(root, split), [str(i) for i in range(ADE20K_CLASSES)], transform,
                               ade20k_labels)


def camvid_dataset(split: str, transform=None, path=None) -> SegmentationDataset:
    data = camvid(path)
    if split not in data:
        raise DataError(f"unknown CamVid split {split!r}; expected train, val or test")
    arrays = data[split]
    items = list(zip(arrays["images"], arrays["masks"]))
    return SegmentationDataset(items, CAMVID_CLASSES, transform, camvid_labels, names=list(arrays["names"]))


@dataclass
class SegTrainTransform:
    """Random resize (ratio range around a base scale), random crop (padded with ignore), flip,
    photometric distortion, normalisation."""

    crop: int
    base_size: tuple[int, int]  # (long side, short side) at ratio 1, as mmseg's img_scale
    mean: tuple
    std: tuple
    ratio_range: tuple[float, float] = (0.5, 2.0)
    flip: float = 0.5

    def __post_init__(self):
        self.jitter = T.ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=18 / 360)

    def __call__(self, image: Image.Image, mask: np.ndarray):
        # torch's generator (seeded per epoch by the engine, per worker by the DataLoader): reproducible
        ratio = self.ratio_range[0] + (self.ratio_range[1] - self.ratio_range[0]) * torch.rand(()).item()
        long_side, short_side = (s * ratio for s in self.base_size)
        scale = min(long_side / max(image.size), short_side / min(image.size))
        size = (max(1, round(image.size[1] * scale)), max(1, round(image.size[0] * scale)))
        img = TF.resize(image, list(size), interpolation=T.InterpolationMode.BILINEAR)
        target = TF.resize(torch.from_numpy(mask)[None], list(size), interpolation=T.InterpolationMode.NEAREST)[0]
        pad_h, pad_w = max(0, self.crop - size[0]), max(0, self.crop - size[1])
        x = TF.to_tensor(self.jitter(img))
        if pad_h or pad_w:
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h))
            target = torch.nn.functional.pad(target, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top = int(torch.randint(0, x.shape[1] - self.crop + 1, ()))
        left = int(torch.randint(0, x.shape[2] - self.crop + 1, ()))
        x = x[:, top:top + self.crop, left:left + self.crop]
        target = target[top:top + self.crop, left:left + self.crop]
        if torch.rand(()).item() < self.flip:
            x, target = x.flip(-1), target.flip(-1)
        return TF.normalize(x, self.mean, self.std), target.long()


@dataclass
class SegEvalTransform:
    """Resize to the base scale (keeping the aspect ratio, multiple of the patch size) and normalise;
    the label map stays at its original size (metrics are computed there)."""

    base_size: tuple[int, int]
    mean: tuple
    std: tuple
    multiple: int = 16

    def __call__(self, image: Image.Image, mask: np.ndarray):
        scale = min(self.base_size[0] / max(image.size), self.base_size[1] / min(image.size))
        h = max(self.multiple, round(image.size[1] * scale / self.multiple) * self.multiple)
        w = max(self.multiple, round(image.size[0] * scale / self.multiple) * self.multiple)
        x = TF.to_tensor(TF.resize(image, [h, w], interpolation=T.InterpolationMode.BILINEAR))
        return TF.normalize(x, self.mean, self.std), torch.from_numpy(mask).long()
