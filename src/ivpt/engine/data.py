"""From a config's ``data`` mapping to train / eval datasets of normalised tensors."""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from ..data import fgvc, image_folder, load_task, vtab_1k
from ..data.cifar10 import load_cifar10
from ..data.datasets import ArrayDataset, DataError
from ..data.folder import check_split_folders, describe_repeats, repeated_images
from ..data.paths import data_file
from ..data.transforms import backbone_transform, timm_resize

KINDS = ("suite", "vtab", "fgvc", "folder", "cifar10")
# kind -> (required fields, optional fields); a spec is checked as a whole against its kind
DATA_FIELDS = {
    "suite": (("task",), ("seed", "version")),
    "vtab": (("root", "task"), ()),
    "fgvc": (("root", "dataset"), ()),
    "folder": (("root",), ("val_fraction", "test_fraction", "seed", "preprocess", "augment", "exif_orientation",
                           "resize", "holdout_rule")),
    "cifar10": ((), ("path", "limit", "seed")),
    "camvid": ((), ("path",)),
    "ade20k": (("root",), ()),
}
FOLDER_EXIF_ORIENTATION = True  # a folder's photos are turned by their EXIF tag unless the spec says false
FOLDER_HOLDOUT = 0.2  # the share of each class held out of train for val (and for test) when the folder has none
# how holdouts are drawn, as an adapter that records none of these fields drew them
FOLDER_DEFAULTS = {"seed": 0, "val_fraction": FOLDER_HOLDOUT, "test_fraction": FOLDER_HOLDOUT, "holdout_rule": 1}
# 2 (since 2026-12-06): each fraction of a class's own count; 1: test_fraction of what val left (recorded
# adapters without the field keep it, so that their held-out splits are the ones they were trained beside)
HOLDOUT_RULE = 2


def is_folder_spec(spec: dict[str, Any]) -> bool:
    """Whether a data spec reads a folder of images: kind 'folder', or a 'root' without a kind."""
    return spec.get("kind", "folder" if "root" in spec else None) == "folder"


def check_data_spec(spec: Any) -> dict[str, Any]:
    """A data spec checked as a whole: its kind, every field known to it, nothing that could be misread.

    ``root`` without a kind means a folder of images; a suite task and a root together are refused
    (it is one or the other: the built-in task, or the user's folder).
    """
    if isinstance(spec, (str, Path)):  # a folder's path where its mapping belongs: say how to write it
        raise DataError(f"data spec: got the text {str(spec)!r}, expected a mapping. For a folder of images (one "
                        f"subfolder per class) give {{'kind': 'folder', 'root': {str(spec)!r}}} "
                        f"(data.root={spec} on the command line); for a built-in task "
                        "{'kind': 'suite', 'task': 'clevr-count'}")
    if not isinstance(spec, dict):
        raise DataError(f"data spec: expected a mapping with a 'kind', got {spec!r}")
    spec = dict(spec)
    if "kind" not in spec:
        if "root" not in spec:
            raise DataError(f"data spec {spec}: needs a 'kind' ({', '.join(DATA_FIELDS)}), or a 'root' folder of images")
        spec["kind"] = "folder"
    kind = spec["kind"]
    if kind not in DATA_FIELDS:
        raise DataError(f"data kind {kind!r} is unknown; expected one of {', '.join(DATA_FIELDS)}")
    if kind == "suite" and "root" in spec:
        raise DataError(f"data spec: kind 'suite' (the built-in task {spec.get('task')!r}) and a 'root' "
                        f"({spec['root']}) together: for your own images set data.kind=folder and remove "
                        "data.task; for the built-in task remove data.root")
    required, optional = DATA_FIELDS[kind]
    known = ("kind", *required, *optional)
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise DataError(f"data spec of kind {kind!r}: unknown field {unknown[0]!r}; its fields are "
                        f"{', '.join(known)}")
    missing = [f for f in required if f not in spec]
    if missing:
        raise DataError(f"data spec of kind {kind!r} needs the field {missing[0]!r}")
    for name in ("root", "path"):
        if name in spec and not (isinstance(spec[name], (str, Path)) and str(spec[name])) and not (
                name == "path" and spec[name] is None):
            raise DataError(f"data field {name!r}: got {spec[name]!r}, expected a path (quote it in YAML if it reads "
                            "as a number or a mapping)")
    for name in ("val_fraction", "test_fraction"):
        if name in spec and (isinstance(spec[name], bool) or not isinstance(spec[name], (int, float))
                             or not 0 <= spec[name] < 0.9):
            raise DataError(f"data field {name!r}: got {spec[name]!r}, expected a fraction in [0, 0.9)")
    if spec.get("holdout_rule", HOLDOUT_RULE) not in (1, 2) or isinstance(spec.get("holdout_rule"), bool):
        raise DataError(f"data field 'holdout_rule': got {spec['holdout_rule']!r}, expected 2 (each fraction of a "
                        "class's images) or 1 (test_fraction of what val left: adapters trained before 2026-12-06)")
    held = [float(spec.get(f"{s}_fraction", FOLDER_HOLDOUT)) for s in ("val", "test")]
    if spec.get("holdout_rule", HOLDOUT_RULE) == 2 and sum(held) >= 0.95:
        raise DataError(f"data fields 'val_fraction' and 'test_fraction': {held[0]:g} + {held[1]:g} of each class "
                        "leave less than 5% for train; lower them so that their sum is below 0.95")
    if spec.get("preprocess", "crop") not in ("crop", "squash"):
        raise DataError(f"data field 'preprocess': got {spec['preprocess']!r}, expected 'crop' (resize the shorter "
                        "side and centre-crop, as timm evaluates) or 'squash' (resize to a square, aspect ratio lost)")
    for name in ("augment", "exif_orientation"):
        if not isinstance(spec.get(name, False), bool):
            raise DataError(f"data field {name!r}: got {spec[name]!r}, expected true or false")
    if "resize" in spec and (isinstance(spec["resize"], bool) or not isinstance(spec["resize"], int)
                             or spec["resize"] < 1):
        raise DataError(f"data field 'resize': got {spec['resize']!r}, expected the shorter side in pixels to resize "
                        "to before the centre crop (a whole number; default timm's floor(size / crop_pct))")
    for name in ("seed", "version", "limit"):
        if name in spec and (isinstance(spec[name], bool) or not isinstance(spec[name], int) or spec[name] < 0):
            raise DataError(f"data field {name!r}: got {spec[name]!r}, expected a non-negative integer")
    if spec.get("limit") == 0:  # 0 would read as 'no limit': every image, not none
        raise DataError("data field 'limit': got 0, expected the number of images to keep (at least 1); leave the "
                        "field out to keep every image")
    return spec


class TensorImages(Dataset):
    """Images already transformed into one tensor (fast path for small in-memory datasets)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


def materialize(dataset: ArrayDataset, transform) -> TensorImages:
    """Apply a deterministic transform once to every image of an in-memory dataset."""
    images = torch.stack([transform(dataset.image(i)) for i in range(len(dataset))])
    return TensorImages(images, torch.as_tensor(dataset.labels, dtype=torch.long))


@dataclass
class TaskData:
    classes: list[str]
    splits: dict[str, Dataset]   # train, val, test, trainval where the layout has them
    protocol: str
    description: str = ""        # what a run trains on, said in its first lines


def _need(spec: dict[str, Any], key: str) -> Any:
    if key not in spec:
        raise DataError(f"data spec of kind {spec['kind']!r} needs the field {key!r}")
    return spec[key]


def _limit(dataset: ArrayDataset, limit: int | None, rng) -> ArrayDataset:
    """A seeded random subset of at most ``limit`` images (all of them when limit is None)."""
    if not limit:
        return dataset
    return dataset.subset(np.sort(rng.choice(len(dataset), min(int(limit), len(dataset)), replace=False)))


_MEMORY: dict[str, TaskData] = {}  # in-memory tasks already transformed, reused across runs of a process


def build_task_data(spec: dict[str, Any], pretrained_cfg: dict) -> TaskData:
    """Datasets for every split of a task, with the protocol's transforms at the backbone's input."""
    kind = spec.get("kind")
    if kind in ("suite", "cifar10"):  # decoded and transformed once per process: grids rerun the same data
        key = json.dumps([spec, [pretrained_cfg.get(k) for k in ("input_size", "mean", "std", "interpolation")]],
                         sort_keys=True, default=str)
        if key not in _MEMORY:
            _MEMORY.clear()  # keep one task at a time: the suite's tasks are visited one after another
            _MEMORY[key] = _described(_build_task_data(spec, pretrained_cfg), spec, pretrained_cfg)
        return _MEMORY[key]
    return _described(_build_task_data(spec, pretrained_cfg), spec, pretrained_cfg)


def _described(task: TaskData, spec: dict[str, Any], pretrained_cfg: dict) -> TaskData:
    if not task.description:
        size = pretrained_cfg["input_size"][-1]
        source = ", ".join(f"{k} {v}" for k, v in spec.items())
        how = (f"resize to {size}x{size}, no augmentation (VTAB-1k's pipeline)" if task.protocol == "vtab" else
               f"FGVC's pipeline at {size}x{size} (train: resize, random crop, flip; eval: resize, centre crop)")
        counts = ", ".join(f"{s} {len(task.splits[s])}" for s in ("train", "val", "test") if s in task.splits)
        task.description = f"{source}: {len(task.classes)} classes; {counts}; input: {how}"
    return task


def _build_task_data(spec: dict[str, Any], pretrained_cfg: dict) -> TaskData:
    kind = spec.get("kind")
    if kind not in KINDS:
        raise DataError(f"data kind {kind!r} is unknown; expected one of {', '.join(KINDS)}")
    vtab_tf = backbone_transform(pretrained_cfg, "vtab")
    if kind == "suite":
        task = load_task(_need(spec, "task"), seed=int(spec.get("seed", 0)), version=int(spec.get("version", 1)))
        splits = {"train": task.train, "val": task.val, "test": task.test, "trainval": task.trainval}
        return TaskData(task.classes, {k: materialize(v, vtab_tf) for k, v in splits.items()}, "vtab")
    if kind == "cifar10":
        data = load_cifar10(spec.get("path") or data_file("cifar10-jpg.tar.gz"))
        train, test = data["train"], data["test"]
        rng = np.random.default_rng(int(spec.get("seed", 0)))
        splits = {"train": _limit(train, spec.get("limit"), rng), "test": _limit(test, spec.get("limit"), rng)}
        return TaskData(train.classes, {k: materialize(v, vtab_tf) for k, v in splits.items()}, "vtab")
    root = Path(_need(spec, "root"))
    if kind == "vtab":
        task = _need(spec, "task")
        names = {"train": "train800", "val": "val200", "trainval": "train800val200", "test": "test"}
        splits = {k: vtab_1k(root, task, v, transform=vtab_tf) for k, v in names.items()}
        return TaskData(splits["train"].classes, splits, "vtab")
    if kind == "fgvc":
        name = _need(spec, "dataset")
        train_tf = backbone_transform(pretrained_cfg, "fgvc", train=True)
        test_tf = backbone_transform(pretrained_cfg, "fgvc", train=False)
        train, val = fgvc(root, name, "train", train_tf), fgvc(root, name, "val", test_tf)
        trainval_items = train.items + [item for item in fgvc(root, name, "val").items]
        trainval = type(train)(train.root, trainval_items, train.classes, train_tf)
        return TaskData(train.classes, {"train": train, "val": val, "trainval": trainval,
                                        "test": fgvc(root, name, "test", test_tf)}, "fgvc")
    return _folder(spec, root, pretrained_cfg)


def recorded_data_spec(spec: dict[str, Any], pretrained_cfg: dict | None = None) -> dict[str, Any]:
    """The data spec an adapter records: a folder's with its image reading spelt out (EXIF orientation,
    the resize before the centre crop), so that a later ivpt, or timm with another crop_pct, reads new
    images as this run did."""
    if spec.get("kind") != "folder":
        return spec
    recorded = {**spec, "exif_orientation": spec.get("exif_orientation", FOLDER_EXIF_ORIENTATION),
                "holdout_rule": spec.get("holdout_rule", HOLDOUT_RULE)}
    if pretrained_cfg is not None and recorded.get("preprocess", "crop") == "crop":
        recorded["resize"] = spec.get("resize") or timm_resize(pretrained_cfg)
    return recorded


def adapter_reads_upright(recorded: dict[str, Any] | None) -> bool:
    """Whether new images for an adapter are turned by their EXIF orientation: as its folder run read its
    images (adapters from before ivpt applied it read the stored pixels); other adapters: yes, as a viewer."""
    recorded = recorded or {}
    return bool(recorded.get("exif_orientation", False)) if recorded.get("kind") == "folder" else True


def adapter_folder_reading(recorded: dict[str, Any], pretrained_cfg: dict) -> dict[str, Any]:
    """The data fields with which a folder adapter's run read its images, for reading new ones alike:
    preprocess, EXIF orientation and the resize (adapters from before 2026-12-05 record none: their runs
    rounded size / crop_pct, where timm floors it)."""
    reading = {"exif_orientation": adapter_reads_upright(recorded)}
    if "preprocess" in recorded:
        reading["preprocess"] = recorded["preprocess"]
    if reading.get("preprocess", "crop") == "crop":
        reading["resize"] = recorded.get("resize") or round(
            pretrained_cfg["input_size"][-1] / float(pretrained_cfg.get("crop_pct") or 1.0))
    return reading


def _folder(spec: dict[str, Any], root: Path, pretrained_cfg: dict) -> TaskData:
    """Class folders with or without split folders; missing val/test splits held out of train."""
    from ..data.datasets import ImageListDataset
    from ..data.transforms import folder_transform

    preprocess, augment = spec.get("preprocess", "crop"), bool(spec.get("augment", False))
    upright = bool(spec.get("exif_orientation", FOLDER_EXIF_ORIENTATION))
    resize = spec.get("resize") or timm_resize(pretrained_cfg)
    size = pretrained_cfg["input_size"][-1]
    if preprocess == "crop" and resize < size:
        raise DataError(f"data field 'resize': {resize} is below the input size {size}: the centre crop would pad "
                        "the image; give at least the input size")
    train_tf = folder_transform(pretrained_cfg, preprocess, augment, resize)
    eval_tf = folder_transform(pretrained_cfg, preprocess, resize=resize)
    check_split_folders(root)  # Train/ + Test/, or validation/ beside train/: refused, never misread
    base = root / "train" if (root / "train").is_dir() else root
    full = image_folder(base, transform=train_tf, upright=upright)
    if len(full.classes) < 2:
        raise DataError(f"{base}: {len(full.classes)} class folder ({', '.join(full.classes)}); classification needs "
                        f"at least two ({base}/<class>/<images>)")
    for split in ("val", "test"):  # a holdout fraction beside a real split folder would be ignored: say so
        if (root / split).is_dir() and f"{split}_fraction" in spec:
            raise DataError(f"data field '{split}_fraction': {root / split} exists, so nothing is held out for "
                            f"{split}; remove the field or the folder")
    fractions = {s: float(spec.get(f"{s}_fraction", FOLDER_HOLDOUT)) for s in ("val", "test") if not (root / s).is_dir()}
    keep, held = stratified_holdout(full.labels, fractions, int(spec.get("seed", 0)),
                                    of_remainder=spec.get("holdout_rule", HOLDOUT_RULE) == 1)
    train = ImageListDataset(base, [full.items[i] for i in keep], full.classes, train_tf, upright)
    splits, origin = {"train": train}, {}
    for split in ("val", "test"):
        if (root / split).is_dir():
            splits[split] = image_folder(root / split, classes=full.classes, transform=eval_tf, upright=upright)
            origin[split] = "folder"
        elif len(held[split]):
            splits[split] = ImageListDataset(base, [full.items[i] for i in held[split]], full.classes, eval_tf, upright)
            share = "of what val left " if split == "test" and spec.get("holdout_rule", HOLDOUT_RULE) == 1 else ""
            origin[split] = (f"{100 * fractions[split]:g}% of each class {share}held out of train, "
                             f"seed {int(spec.get('seed', 0))}")
    if "val" in splits:
        val = splits["val"]
        splits["trainval"] = ConcatDataset([train, ImageListDataset(val.root, val.items, full.classes, train_tf, upright)])
    how = (f"resize the shorter side to {resize} and centre-crop {size}x{size} "
           + (f"(timm's crop_pct {pretrained_cfg.get('crop_pct') or 1.0:g})" if "resize" not in spec else "(data field "
              "'resize')") if preprocess == "crop"
           else f"squash to {size}x{size} (aspect ratio not kept)") + (
        "; training adds random resized crops and flips" if augment else "")
    counts = ", ".join(f"{s} {len(splits[s])}" + (f" ({origin[s]})" if s in origin else "")
                       for s in ("train", "val", "test") if s in splits)
    repeats = describe_repeats(_repeated(splits))
    if repeats:
        warnings.warn(f"{root}: {repeats}", stacklevel=2)
    description = (f"folder {root}: {len(full.classes)} classes ({', '.join(full.classes[:8])}"
                   f"{', ...' if len(full.classes) > 8 else ''}); {counts}; input: {how}"
                   + (f"; WARNING: {repeats}" if repeats else ""))
    return TaskData(full.classes, splits, "folder", description)


_REPEATS: dict[str, list] = {}  # per process: tune builds the same folder for every grid point


def _repeated(splits: dict[str, Any]) -> list:
    """repeated_images over train, val and test, remembered per listing (files, sizes, change times)."""
    parts = {n: splits[n] for n in ("train", "val", "test") if n in splits}
    listing = hashlib.sha256()
    for name, data in parts.items():
        for rel, label in data.items:
            stat = (Path(data.root) / rel).stat()
            listing.update(f"{name}|{data.root}|{rel}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    key = listing.hexdigest()
    if key not in _REPEATS:
        _REPEATS[key] = repeated_images(parts)
    return _REPEATS[key]


def split_record(task: TaskData) -> dict[str, Any] | None:
    """What a folder run's splits held (image count and a digest of the files and labels), for its adapter.

    A held-out split is drawn anew from the folder by every command; the record lets ``ivpt eval`` tell
    when the folder changed since training, so that a redrawn test split cannot overlap the images
    the adapter trained on unnoticed.
    """
    if task.protocol != "folder" or "train" not in task.splits:
        return None
    base = getattr(task.splits["train"], "root", None)
    # only held-out splits are redrawn (they share train's folder); a val/ or test/ folder is read as it is
    held = [n for n in ("val", "test") if getattr(task.splits.get(n), "root", None) == base]
    if not held:
        return None
    record = {}
    for name in ("train", *held):
        items = task.splits[name].items
        digest = hashlib.sha256(json.dumps(sorted(map(list, items))).encode()).hexdigest()[:16]
        record[name] = {"images": len(items), "sha256": digest}
    return record


def check_same_splits(recorded: dict[str, Any] | None, task: TaskData, where: str,
                      redrawn: list[str] | None = None) -> None:
    """Refuse evaluating on a folder whose splits differ from the ones the adapter was trained with.

    redrawn: the holdout fields (seed, fractions) a --data spec set otherwise than training did."""
    now = split_record(task)
    if not recorded or now is None:
        return
    changed = [name for name in recorded if name in now and recorded[name] != now[name]]
    if changed and redrawn:
        raise DataError(f"{where}: --data draws this folder's held-out splits otherwise than training did "
                        f"({', '.join(redrawn)}), so they would hold images the adapter trained on; leave those "
                        "fields out to evaluate on its own held-out splits, or evaluate on images of their own")
    if changed:
        name = changed[0]
        avif = any(rel.lower().endswith(".avif") for split in task.splits.values() for rel, _ in
                   getattr(split, "items", []))
        raise DataError(f"{where}: the folder changed since the adapter was trained: its {name} split now holds "
                        f"{now[name]['images']} images, then {recorded[name]['images']} (or other files); splits "
                        "held out of train would be drawn anew and could hold images it trained on. Evaluate "
                        "on images of their own (--data with a val/ or test/ folder, or another root)"
                        + ("; ivpt reads .avif photos since 2026-12-04, so an adapter trained before left this "
                           "folder's AVIF files out" if avif else ""))


def stratified_holdout(labels, fractions: dict[str, float], seed: int,
                       of_remainder: bool = False) -> tuple[list[int], dict[str, list[int]]]:
    """Seeded per-class holdout: (indices kept for train, {split: held-out indices}), each sorted.

    Each split takes round(fraction * n) images of each class of n images, at least one where the
    fraction is above 0 and the class has an image to spare; train keeps the rest (at least one).
    of_remainder: n is what the splits before it left (holdout rule 1, adapters from before 2026-12-06).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held: dict[str, list[int]] = {s: [] for s in fractions}
    keep: list[int] = []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label)).tolist()
        total = len(idx)
        for split, fraction in fractions.items():
            n = len(idx) if of_remainder else total
            take = max(1, round(fraction * n)) if fraction > 0 and len(idx) > 1 else 0
            take = min(take, len(idx) - 1)
            held[split] += idx[:take]
            idx = idx[take:]
        keep += idx
    return sorted(keep), {s: sorted(v) for s, v in held.items()}


def split_of(task: TaskData, name: str) -> Dataset:
    if name not in task.splits:
        raise DataError(f"this dataset has no {name!r} split (it has {', '.join(task.splits)})")
    return task.splits[name]
