"""Folder-per-class layout (``root/<class>/<image>``), optionally under split folders
(``root/<split>/<class>/<image>``)."""
from __future__ import annotations

import hashlib
import os
import unicodedata
import warnings
from pathlib import Path

from .datasets import IMAGE_SUFFIXES, UNREADABLE_IMAGE_SUFFIXES, DataError, ImageListDataset, hidden, visible_files
from .paths import sha256_file


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not hidden(p.name))


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
        _warn_lookalike_classes(base, found)
    elif set(found) != set(classes):
        odd = sorted(set(found) ^ set(classes))
        alike = len({_folded(c) for c in odd}) < len(odd)  # e.g. NFC and NFD spellings: they print the same
        differ = class_difference(list(classes), found, "the expected classes")
        raise DataError(f"{base}: its class folders differ from the expected classes (train's): "
                        + (f"{', '.join(map(ascii, odd))} are the same name spelt with other characters, e.g. an accent "
                           "composed or not, as macOS and Linux write it: rename one" if alike else
                           f"{differ}; give every split the same class folders"))
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


def class_difference(expected: list[str], found: list[str], owner: str) -> str:
    """How two class lists differ, by name: missing, extra, or the same names in another order."""
    missing = [c for c in expected if c not in found]
    extra = [c for c in found if c not in expected]
    parts = []
    if missing:
        parts.append(f"missing {', '.join(map(repr, missing[:8]))}{', ...' if len(missing) > 8 else ''}")
    if extra:
        parts.append(f"not in {owner} {', '.join(map(repr, extra[:8]))}{', ...' if len(extra) > 8 else ''}")
    if not parts:
        parts.append(f"the same {len(found)} names in another order ({', '.join(map(repr, found[:8]))}"
                     f"{', ...' if len(found) > 8 else ''}; {owner}'s: {', '.join(map(repr, expected[:8]))})")
    return "; ".join(parts)


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


def _folded(name: str) -> str:
    return unicodedata.normalize("NFC", name).strip().casefold()


def _warn_lookalike_classes(base: Path, names: list[str]) -> None:
    """Class folders whose names differ only in case, surrounding spaces or Unicode form are two classes,
    which is rarely meant (Cat/ and cat/, a name copied from a Mac); said, not refused: some datasets
    do mean it (EMNIST's A and a)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_folded(name), []).append(name)
    alike = [g for g in groups.values() if len(g) > 1]
    if alike:
        warnings.warn(f"{base}: class folders {', '.join(' and '.join(map(ascii, g)) for g in alike[:3])} differ "
                      "only in case, spaces or Unicode form and are read as separate classes; merge them if they "
                      "are one class", stacklevel=3)


# split folder names people use, and the one ivpt reads each as
SPLIT_FOLDERS = ("train", "val", "test")
SPLIT_SPELLINGS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                   "test": "test", "testing": "test"}


def check_split_folders(root: Path) -> None:
    """Refuse split folders under another spelling: ``Train/`` + ``Test/`` without ``train/`` would be
    read as two classes (the model would learn which split an image is in), and ``validation/`` beside
    ``train/`` would be ignored while val is held out of train."""
    names = [d.name for d in _class_dirs(root)]
    has_train = "train" in names
    odd = [n for n in names if _folded(n) in SPLIT_SPELLINGS and not (has_train and n in SPLIT_FOLDERS)]
    splits_meant = has_train or any(SPLIT_SPELLINGS.get(_folded(n)) == "train" for n in names) or (
        names and len(odd) == len(names))  # Train/ or training/, or nothing but split names (test/ + val/)
    if not odd or not splits_meant:  # valid/ beside invalid/ are classes
        return
    name = odd[0]
    meant = SPLIT_SPELLINGS[_folded(name)]
    if has_train:
        fate = (f"both {meant}/ and {name}/ exist: say which is the {meant} split by merging or removing one"
                if meant in names else f"rename it to {meant}/ (as it is, it would be ignored and {meant} held out "
                                       "of train)")
    else:
        renames = [f"{n}/ to {SPLIT_SPELLINGS[_folded(n)]}/" for n in odd if n != SPLIT_SPELLINGS[_folded(n)]]
        fate = (("rename " + ", ".join(renames) + "; " if renames else "")
                + ("" if "train" in {SPLIT_SPELLINGS[_folded(n)] for n in odd} else "put the training images under "
                   "train/<class>/; ")
                + f"as {'they are' if len(odd) > 1 else 'it is'}, {'each' if len(odd) > 1 else 'it'} would be read "
                  "as a class")
    raise DataError(f"{root / name}: split folders are named exactly train/, val/ and test/ (train/ required); {fate}")


def repeated_images(splits: dict[str, ImageListDataset]) -> list[list[tuple[str, str, str]]]:
    """Groups of files with the same bytes across the given splits, each as (split, file, class).

    Files are compared by size, then by a hash of their first 64 KiB, then by their whole content, so a
    folder of distinct photos costs one stat per file and few reads."""
    entries = []
    for split, data in splits.items():
        for rel, label in data.items:
            path = Path(data.root) / rel
            entries.append((split, path, data.classes[label]))
    by_size: dict[int, list] = {}
    for entry in entries:
        by_size.setdefault(os.stat(entry[1]).st_size, []).append(entry)
    groups = []
    for same_size in (g for g in by_size.values() if len(g) > 1):
        for same_head in _grouped(same_size, _head_digest):
            groups += [[(split, str(path), label) for split, path, label in g]
                       for g in _grouped(same_head, sha256_file)]
    return sorted(groups)


def _grouped(entries, key) -> list[list]:
    out: dict[str, list] = {}
    for entry in entries:
        out.setdefault(key(entry[1]), []).append(entry)
    return [g for g in out.values() if len(g) > 1]


def _head_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(1 << 16)).hexdigest()


def describe_repeats(groups: list[list[tuple[str, str, str]]]) -> str | None:
    """What repeated files mean for a run, or None: across splits scores count them as unseen; under two
    classes one image carries two labels; within a split it weighs twice."""
    if not groups:
        return None
    across = [g for g in groups if len({s for s, _, _ in g}) > 1]
    labels = [g for g in groups if len({c for _, _, c in g}) > 1]
    parts = []
    for kind, chosen, meaning in (("in two splits", across, "val/test scores count them as unseen images"),
                                  ("under two classes", labels, "each carries two labels"),
                                  ("repeated", groups, "")):
        if chosen and (kind != "repeated" or not (across or labels)):
            a, b = chosen[0][:2]
            parts.append(f"{len(chosen)} image(s) {kind} (e.g. {a[1]} and {b[1]} hold the same bytes)"
                         + (f": {meaning}" if meaning else ""))
    return "; ".join(parts) + "; remove the copies"
