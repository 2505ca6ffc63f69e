"""Folder-per-class layout (``root/<class>/<image>``), optionally under split folders
(``root/<split>/<class>/<image>``)."""
from __future__ import annotations

from pathlib import Path

from .datasets import IMAGE_SUFFIXES, UNREADABLE_IMAGE_SUFFIXES, DataError, ImageListDataset, visible_files


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_folder(root, split: str | None = None, classes: list[str] | None = None,
                 transform=None, upright: bool = True) -> ImageListDataset:
    """An ImageFolder-style dataset. ``classes`` pins the class order (e.g. from the train split)."""
    root = Path(root)
    base = root / split if split else root
    if not base.is_dir():
        raise DataError(f"dataset folder not found: {base}")
    dirs = _class_dirs(base)
    if not dirs:
        raise DataError(f"{base}: no class folders (expected {base}/<class>/<image files>)")
    found = [d.name for d in dirs]
    if classes is None:
        classes = found
    elif set(found) != set(classes):
        raise DataError(f"{base}: class folders {sorted(set(found) ^ set(classes))} differ from the expected classes")
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for d in dirs:
        # hidden files and folders (.ipynb_checkpoints/, ._x.jpg of macOS) are skipped, as hidden class folders are
        visible = visible_files(d)
        unreadable = [f for f in visible if f.suffix.lower() in UNREADABLE_IMAGE_SUFFIXES]
        if unreadable:  # training on the rest would silently leave these photos out
            raise DataError(f"class folder {d} holds {len(unreadable)} image(s) in a format ivpt cannot read "
                            f"({', '.join(f.name for f in unreadable[:3])}{', ...' if len(unreadable) > 3 else ''}): "
                            "convert them to JPEG or PNG, or move them out of the folder")
        files = [f for f in visible if f.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise DataError(f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        items += [(str(f.relative_to(base)), index[d.name]) for f in files]
    return ImageListDataset(base, items, list(classes), transform, upright)


def image_folder_splits(root, transform=None, eval_transform=None) -> dict[str, ImageListDataset]:
    """Every split folder under ``root`` (train, val, test, ...), sharing the train class order."""
    root = Path(root)
    splits = [d.name for d in _class_dirs(root)] if root.is_dir() else []
    if "train" not in splits:
        raise DataError(f"{root}: expected split folders such as train/ and test/, found {splits or 'none'}")
    train = image_folder(root, "train", transform=transform)
    out = {"train": train}
    for split in splits:
        if split != "train":
            out[split] = image_folder(root, split, classes=train.classes, transform=eval_transform or transform)
    return out
