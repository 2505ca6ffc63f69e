"""VTAB-1k in its widely shared processed layout.

``<root>/<task>/`` holds the images and the list files ``train800.txt``, ``val200.txt``,
``train800val200.txt`` and ``test.txt``, one ``relative/path label`` per line.
"""
from __future__ import annotations

from pathlib import Path

from .datasets import DataError, ImageListDataset, require_known

# task -> (number of classes, group)
VTAB_TASKS: dict[str, tuple[int, str]] = {
    "cifar": (100, "natural"),
    "caltech101": (102, "natural"),
    "dtd": (47, "natural"),
    "oxford_flowers102": (102, "natural"),
    "oxford_iiit_pet": (37, "natural"),
    "svhn": (10, "natural"),
    "sun397": (397, "natural"),
    "patch_camelyon": (2, "specialized"),
    "eurosat": (10, "specialized"),
    "resisc45": (45, "specialized"),
    "diabetic_retinopathy": (5, "specialized"),
    "clevr_count": (8, "structured"),
    "clevr_dist": (6, "structured"),
    "dmlab": (6, "structured"),
    "kitti": (4, "structured"),
    "dsprites_loc": (16, "structured"),
    "dsprites_ori": (16, "structured"),
    "smallnorb_azi": (18, "structured"),
    "smallnorb_ele": (9, "structured"),
}
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
GROUPS = ("natural", "specialized", "structured")


def read_list_file(path: Path) -> list[tuple[str, int]]:
    if not path.is_file():
        raise DataError(f"list file not found: {path}")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{number}: expected 'relative/path label', got {line!r}")
        items.append((parts[0], int(parts[1])))
    if not items:
        raise DataError(f"list file {path} is empty")
    return items


def vtab_1k(root, task: str, split: str, transform=None) -> ImageListDataset:
    require_known("VTAB-1k task", task, VTAB_TASKS)
    require_known("VTAB-1k split", split, VTAB_SPLITS)
    num_classes, _ = VTAB_TASKS[task]
    base = Path(root) / task
    if not base.is_dir():
        raise DataError(f"VTAB-1k task folder not found: {base}")
    items = read_list_file(base / f"{split}.txt")
    # the published protocols read the stored pixels (no EXIF orientation), as torchvision does
    return ImageListDataset(base, items, [str(i) for i in range(num_classes)], transform, upright=False)
