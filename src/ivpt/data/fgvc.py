"""FGVC as the VPT repository lays it out: per dataset an image folder and ``train.json``,
``val.json``, ``test.json`` mapping relative image paths to integer labels."""
from __future__ import annotations

import json
from pathlib import Path

from .datasets import DataError, ImageListDataset, require_known

# dataset folder -> (number of classes, image folder inside it, as the VPT code reads it)
FGVC_DATASETS: dict[str, tuple[int, str]] = {
    "CUB_200_2011": (200, "images"),
    "nabirds": (555, "images"),
    "OxfordFlower": (102, ""),
    "StanfordDogs": (120, "Images"),
    "StanfordCars": (196, ""),
}
FGVC_SPLITS = ("train", "val", "test")


def _read_json(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty object mapping image paths to labels")
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"{path}: label of {key!r} is {value!r}, expected an integer")
    return data


def fgvc(root, dataset: str, split: str, transform=None) -> ImageListDataset:
    require_known("FGVC dataset", dataset, FGVC_DATASETS)
    require_known("FGVC split", split, FGVC_SPLITS)
    num_classes, image_dir = FGVC_DATASETS[dataset]
    base = Path(root) / dataset
    if not base.is_dir():
        raise DataError(f"FGVC dataset folder not found: {base}")
    # labels in the files may be 1-based or sparse: map them as the train split orders them
    train_ids = sorted(set(_read_json(base / "train.json").values()))
    if len(train_ids) != num_classes:
        raise DataError(f"{base / 'train.json'}: {len(train_ids)} distinct labels, {dataset} has {num_classes} classes")
    contiguous = {label: i for i, label in enumerate(train_ids)}
    annotations = _read_json(base / f"{split}.json")
    unknown = sorted(set(annotations.values()) - set(contiguous))
    if unknown:
        raise DataError(f"{base / f'{split}.json'}: label {unknown[0]} does not occur in train.json")
    items = [(path, contiguous[label]) for path, label in annotations.items()]
    # the published protocols read the stored pixels (no EXIF orientation), as torchvision does
    return ImageListDataset(base / image_dir, items, [str(i) for i in train_ids], transform, upright=False)
