"""Verify a benchmark data folder: VTAB-1k's processed layout, FGVC as VPT reads it, ADE20K as released.

Every check reads what is on disk: the list and split files, every listed image (present and fully
decoded), the split sizes of the published protocols, the classes each split holds, and for VTAB-1k
that no test image has the bytes of a train800val200 image. A failure is a :class:`Problem` naming the
task, the split, the file and what was expected; nothing is ever repaired silently.

The expected sizes live in the tables below (``VTAB_TRAIN_SIZES``, ``VTAB_TEST_SIZES``,
``FGVC_SPLIT_SIZES``, ``ADE20K_SIZES``). A folder that is deliberately a subset (a smaller test split,
say) passes ``expect={(task, split): count}`` (``--expect TASK:SPLIT=N`` on the command line): the
count is then still checked, against the number the user stated.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from PIL import Image

from ..progress import progress
from .datasets import DataError
from .fgvc import FGVC_DATASETS, FGVC_SPLITS, _read_json
from .paths import sha256_file
from .segmentation import ADE20K_CLASSES
from .vtab import VTAB_SPLITS, VTAB_TASKS, read_list_file

MANIFEST = "ivpt-data.json"  # written last by `ivpt data prepare`, over the whole folder
TASK_RECORD = "ivpt-task.json"  # inside each prepared task folder, written before the folder is renamed into place

VTAB_TRAIN_SIZES = {"train800": 800, "val200": 200, "train800val200": 1000}
# train800val200 is the first 1,000 of shuffled splits, not a stratified sample: with C classes about
# C * (1 - 1/C) ** 1000 of them are absent by chance. Under 0.01 for every task but SUN397 (397 classes:
# about 32, more with its uneven class sizes), whose coverage is recorded instead of required.
VTAB_PARTIAL_CLASS_COVERAGE = frozenset({"sun397"})
# the full test split of each task, as google-research/task_adaptation defines it
VTAB_TEST_SIZES = {
    "caltech101": 6085, "cifar": 10000, "clevr_count": 15000, "clevr_dist": 15000, "diabetic_retinopathy": 42670,
    "dmlab": 22735, "dsprites_loc": 73728, "dsprites_ori": 73728, "dtd": 1880, "eurosat": 5400, "kitti": 711,
    "oxford_flowers102": 6149, "oxford_iiit_pet": 3669, "patch_camelyon": 32768, "resisc45": 6300,
    "smallnorb_azi": 12150, "smallnorb_ele": 12150, "sun397": 21750, "svhn": 26032,
}
# VPT's split files: train / val / test
FGVC_SPLIT_SIZES = {
    "CUB_200_2011": {"train": 5394, "val": 600, "test": 5794},
    "nabirds": {"train": 21536, "val": 2393, "test": 24633},
    "OxfordFlower": {"train": 1020, "val": 1020, "test": 6149},
    "StanfordDogs": {"train": 10800, "val": 1200, "test": 8580},
    "StanfordCars": {"train": 7329, "val": 815, "test": 8041},
}
ADE20K_SIZES = {"training": 20210, "validation": 2000}
ADE20K = "ADEChallengeData2016"
# other codebases' spellings of the VTAB-1k task folders -> ivpt's (after lower-casing, '-' -> '_' and
# dropping a 'processed_vtab_' / 'vtab_' prefix)
VTAB_SPELLINGS = {
    "cifar100": "cifar", "cifar_100": "cifar", "caltech": "caltech101", "caltech_101": "caltech101",
    "dtd_47": "dtd", "flowers102": "oxford_flowers102", "oxford_flowers_102": "oxford_flowers102",
    "flowers": "oxford_flowers102", "pets": "oxford_iiit_pet", "oxford_pet": "oxford_iiit_pet",
    "oxford_iiit_pets": "oxford_iiit_pet", "svhncropped": "svhn", "svhn_cropped": "svhn", "sun": "sun397",
    "pcam": "patch_camelyon", "camelyon": "patch_camelyon", "resisc": "resisc45", "retinopathy": "diabetic_retinopathy",
    "diabetic_retinopathy_detection": "diabetic_retinopathy", "clevr_distance": "clevr_dist",
    "dmlab_frames": "dmlab", "kitti_dist": "kitti", "kitti_distance": "kitti", "dsprites_location": "dsprites_loc",
    "dsprites_orientation": "dsprites_ori", "smallnorb_azimuth": "smallnorb_azi", "smallnorb_elevation": "smallnorb_ele",
}


def vtab_task_for(name: str) -> str | None:
    """ivpt's name of a VTAB-1k task folder spelt as another codebase spells it (None: not a task)."""
    key = re.sub(r"^(processed_vtab_|vtab_1k_|vtab_)", "", name.lower().replace("-", "_"))
    return key if key in VTAB_TASKS else VTAB_SPELLINGS.get(key)


MAX_LISTED = 5  # problems of one kind named one by one per task; the rest are counted


@dataclass
class Problem:
    task: str
    split: str
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.task} [{self.split}] {self.file}: {self.message}"


@dataclass
class TaskReport:
    """What one task (a VTAB-1k task, an FGVC dataset, ADE20K) holds, and what is wrong with it."""
    kind: str
    task: str
    counts: dict[str, int] = field(default_factory=dict)
    classes: int = 0
    formats: list[str] = field(default_factory=list)
    list_sha256: dict[str, str] = field(default_factory=dict)
    duplicates: int = 0  # test images whose bytes also occur in train800val200 (VTAB-1k)
    classes_trained: int | None = None  # classes occurring in train800val200 / train
    image_bytes: int = 0  # on disk, every image once
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def lossless(self) -> bool:
        return bool(self.formats) and "JPEG" not in self.formats

    def record(self) -> dict:
        """The task's entry of the manifest."""
        return {"kind": self.kind, "counts": self.counts, "classes": self.classes,
                "classes_in_train": self.classes_trained, "formats": self.formats,
                "lossless": self.lossless, "list_sha256": self.list_sha256, "duplicates_with_train": self.duplicates,
                "image_bytes": self.image_bytes}

    def fail(self, split: str, file, message: str) -> None:
        self.problems.append(Problem(self.task, split, str(file), message))


# -- images --------------------------------------------------------------------------------------
@dataclass
class ImageFacts:
    digest: str | None = None
    format: str | None = None
    size: tuple[int, int] | None = None
    histogram: np.ndarray | None = None  # label maps: how many pixels hold each value 0..255
    nbytes: int = 0
    error: str | None = None


def inspect_image(path: str, labels: bool = False) -> ImageFacts:
    """Read a file once: its sha256, and a full decode (a truncated JPEG fails here, not in training)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return ImageFacts(error="listed, but the file does not exist")
    except OSError as err:
        return ImageFacts(error=f"cannot be read ({err})")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            facts = ImageFacts(hashlib.sha256(data).hexdigest(), img.format, img.size, nbytes=len(data))
            if labels:
                if img.mode not in ("L", "P"):
                    return ImageFacts(error=f"a label map must be single-channel 8-bit (mode L or P), found {img.mode}")
                facts.histogram = np.bincount(np.asarray(img).ravel(), minlength=256)
            return facts
    except Exception as err:  # Pillow raises many kinds for damaged files; each means the same here
        return ImageFacts(error=f"cannot be decoded as an image ({type(err).__name__}: {err})")


def _inspect_chunk(chunk: tuple[list[str], bool]) -> list[ImageFacts]:
    paths, labels = chunk
    return [inspect_image(p, labels) for p in paths]


def inspect_images(paths: list[Path], desc: str, workers: int = 1, labels: bool = False) -> list[ImageFacts]:
    """inspect_image over many files, in ``workers`` processes, with progress (tqdm, or lines in a log)."""
    names = [str(p) for p in paths]
    if workers <= 1 or len(names) < 512:
        return list(progress((inspect_image(p, labels) for p in names), desc=desc, total=len(names)))
    size = 256
    chunks = [(names[i:i + size], labels) for i in range(0, len(names), size)]
    with ProcessPoolExecutor(workers) as pool:
        facts = (f for chunk in pool.map(_inspect_chunk, chunks) for f in chunk)
        return list(progress(facts, desc=desc, total=len(names)))


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _report_capped(report: TaskReport, found: list[tuple[str, str, str]], what: str) -> None:
    """(split, file, message) problems of one kind: the first few named, the rest counted."""
    for split, file, message in found[:MAX_LISTED]:
        report.fail(split, file, message)
    if len(found) > MAX_LISTED:
        split, file, _ = found[MAX_LISTED]
        report.fail(split, "...", f"and {len(found) - MAX_LISTED} more {what} (first of them: {file})")


def _check_count(report: TaskReport, split: str, file, found: int, expected: int, why: str, flag: str) -> None:
    if found != expected:
        report.fail(split, file, f"{found:,} images, expected {expected:,} ({why}); if this folder is a deliberate "
                                 f"subset, state its size with {flag}={found}, otherwise prepare the task again")


def expected_size(table: Mapping[str, int], task: str, split: str, expect: Mapping | None) -> int:
    return (expect or {}).get((task, split), table[split])


def _check_decodes(report: TaskReport, where: dict[str, tuple[str, Path]], facts: list[ImageFacts]) -> None:
    bad = [(split, str(path), f.error) for (split, path), f in zip(where.values(), facts) if f.error]
    _report_capped(report, bad, "unreadable images")
    report.formats = sorted({f.format for f in facts if f.format})
    report.image_bytes += sum(f.nbytes for f in facts)


# -- VTAB-1k -------------------------------------------------------------------------------------
def check_vtab_task(folder: Path, task: str, expect: Mapping | None = None, workers: int = 1,
                    allow_duplicates: bool = False) -> TaskReport:
    """Verify one VTAB-1k task folder (``<task>/{train800,val200,train800val200,test}.txt`` and its images)."""
    folder = Path(folder)
    report = TaskReport("vtab-1k", task)
    if task not in VTAB_TASKS:
        known = vtab_task_for(task)
        report.fail("-", folder, f"rename it to {known}: ivpt reads VTAB-1k tasks by its own names" if known else
                    f"not a VTAB-1k task name; ivpt reads these: {', '.join(VTAB_TASKS)}")
        return report
    num_classes = VTAB_TASKS[task][0]
    report.classes = num_classes
    splits: dict[str, list[tuple[str, int]]] = {}
    sizes = {**VTAB_TRAIN_SIZES, "test": VTAB_TEST_SIZES[task]}
    for split in VTAB_SPLITS:
        path = folder / f"{split}.txt"
        try:
            splits[split] = read_list_file(path)
        except DataError as err:
            report.fail(split, path, f"{err} (expected lines 'images/{split}/000000.jpg LABEL')")
            continue
        report.list_sha256[path.name] = sha256_file(path)
        report.counts[split] = len(splits[split])
        why = "task_adaptation's full test split" if split == "test" else "VTAB-1k's fixed size"
        _check_count(report, split, path, len(splits[split]), expected_size(sizes, task, split, expect),
                     why, f"--expect {task}:{split}")
        outside = sorted({label for _, label in splits[split] if not 0 <= label < num_classes})
        if outside:
            report.fail(split, path, f"label {outside[0]} is outside {task}'s classes 0..{num_classes - 1}")
    _check_vtab_splits(report, folder, splits)
    _check_vtab_images(report, folder, splits, workers, allow_duplicates)
    return report


def _check_vtab_splits(report: TaskReport, folder: Path, splits: dict) -> None:
    if "train800val200" in splits:
        path = folder / "train800val200.txt"
        present = {label for _, label in splits["train800val200"]}
        absent = sorted(set(range(report.classes)) - present)
        report.classes_trained = report.classes - len(absent)
        if absent and report.task not in VTAB_PARTIAL_CLASS_COVERAGE:
            shown = ", ".join(map(str, absent[:10])) + (" ..." if len(absent) > 10 else "")
            report.fail("train800val200", path, f"class(es) {shown} never occur: every one of {report.task}'s "
                                                f"{report.classes} classes must occur in train800val200")
        whole = {p for p, _ in splits["train800val200"]}
        if "train800" in splits and "val200" in splits:
            parts = {p for p, _ in splits["train800"]} | {p for p, _ in splits["val200"]}
            if parts != whole:
                odd = sorted(parts ^ whole)[0]
                report.fail("train800val200", path, f"is not train800 + val200 (e.g. {odd} is in one, not the other)")
        if "test" in splits:
            shared = sorted(whole & {p for p, _ in splits["test"]})
            if shared:
                report.fail("test", folder / "test.txt", f"lists {shared[0]}, also listed in train800val200 "
                                                         f"({len(shared)} such files)")


def _check_vtab_images(report: TaskReport, folder: Path, splits: dict, workers: int, allow_duplicates: bool) -> None:
    where: dict[str, tuple[str, Path]] = {}
    for split in ("train800", "val200", "test", "train800val200"):  # each file named by the split it belongs to
        for rel, _ in splits.get(split, []):
            where.setdefault(rel, (split, folder / rel))
    facts = inspect_images([p for _, p in where.values()], f"{report.task}: images", workers)
    _check_decodes(report, where, facts)
    by_rel = dict(zip(where, facts))
    trained = {by_rel[rel].digest: rel for rel, _ in splits.get("train800val200", []) if by_rel[rel].digest}
    twins = [("test", str(folder / rel), f"has the same bytes as {trained[by_rel[rel].digest]} of train800val200")
             for rel, _ in splits.get("test", []) if by_rel[rel].digest in trained]
    report.duplicates = len(twins)
    if twins and not allow_duplicates:
        twins[0] = (*twins[0][:2], twins[0][2] + f" ({len(twins)} test images have a twin in train800val200: "
                    f"evaluating on them measures memory; if the dataset itself holds identical images, pass "
                    f"--allow-duplicates {report.task} to record them instead)")
        _report_capped(report, twins, "test images with a twin in train800val200")


# -- FGVC ----------------------------------------------------------------------------------------
def check_fgvc_dataset(folder: Path, dataset: str, expect: Mapping | None = None, workers: int = 1) -> TaskReport:
    """Verify one FGVC dataset folder as VPT lays it out (``{train,val,test}.json`` and its image folder)."""
    report, splits = check_fgvc_splits(folder, dataset, expect)
    if dataset not in FGVC_DATASETS:
        return report
    where: dict[str, tuple[str, Path]] = {}
    for split, items in splits.items():
        for rel in items:
            if rel in where:
                report.fail(split, Path(folder) / f"{split}.json", f"lists {rel}, also listed in {where[rel][0]}.json")
            where.setdefault(rel, (split, Path(folder) / FGVC_DATASETS[dataset][1] / rel))
    _check_decodes(report, where, inspect_images([p for _, p in where.values()], f"{dataset}: images", workers))
    return report


def check_fgvc_splits(folder: Path, dataset: str, expect: Mapping | None = None) -> tuple[TaskReport, dict]:
    """The split files alone (sizes, class ids): cheap, so a preparation checks them before extracting images."""
    folder = Path(folder)
    report = TaskReport("fgvc", dataset)
    splits: dict[str, dict[str, int]] = {}
    if dataset not in FGVC_DATASETS:
        report.fail("-", folder, f"not an FGVC dataset name; ivpt reads these: {', '.join(FGVC_DATASETS)}")
        return report, splits
    report.classes = FGVC_DATASETS[dataset][0]
    for split in FGVC_SPLITS:
        path = folder / f"{split}.json"
        try:
            splits[split] = _read_json(path)
        except DataError as err:
            report.fail(split, path, str(err))
            continue
        report.list_sha256[path.name] = sha256_file(path)
        report.counts[split] = len(splits[split])
        _check_count(report, split, path, len(splits[split]),
                     expected_size(FGVC_SPLIT_SIZES[dataset], dataset, split, expect), "VPT's split file",
                     f"--expect {dataset}:{split}")
    _check_fgvc_labels(report, folder, splits)
    return report, splits


def _check_fgvc_labels(report: TaskReport, folder: Path, splits: dict) -> None:
    """ivpt maps labels through train.json's ids for every split (never per split, as VPT's loader did): each
    split's labels must be train's, and train must hold every class."""
    if "train" not in splits:
        return
    train_ids = set(splits["train"].values())
    report.classes_trained = len(train_ids)
    if len(train_ids) != report.classes:
        report.fail("train", folder / "train.json", f"{len(train_ids)} distinct labels, {report.task} has "
                                                    f"{report.classes} classes: every class must occur in train")
    for split in ("val", "test"):
        unknown = sorted(set(splits.get(split, {}).values()) - train_ids)
        if unknown:
            report.fail(split, folder / f"{split}.json", f"label {unknown[0]} does not occur in train.json "
                                                         f"({len(unknown)} such label(s)): the class ids of the "
                                                         "splits do not agree")


# -- ADE20K --------------------------------------------------------------------------------------
def ade20k_base(root: Path) -> Path:
    return root / ADE20K if (root / ADE20K).is_dir() else root


def check_ade20k(root: Path, expect: Mapping | None = None, workers: int = 1) -> TaskReport:
    """Verify ``ADEChallengeData2016/{images,annotations}/{training,validation}``: counts, one annotation per
    image of the same size, label maps within 0..150, every class in training."""
    base = ade20k_base(Path(root))
    report = TaskReport("ade20k", "ade20k", classes=ADE20K_CLASSES)
    seen = np.zeros(256, dtype=np.int64)
    for split in ADE20K_SIZES:
        images, masks = base / "images" / split, base / "annotations" / split
        if not images.is_dir() or not masks.is_dir():
            report.fail(split, images if not images.is_dir() else masks, "folder not found (expected "
                        f"{ADE20K}/images/{split} and {ADE20K}/annotations/{split})")
            continue
        stems = {p.stem: p for p in images.glob("*.jpg")}
        labels = {p.stem: p for p in masks.glob("*.png")}
        report.counts[split] = len(stems)
        _check_count(report, split, images, len(stems), expected_size(ADE20K_SIZES, "ade20k", split, expect),
                     "ADE20K's release", f"--expect ade20k:{split}")
        unpaired = [(split, str(stems[s]), f"has no annotation {masks / (s + '.png')}") for s in sorted(stems)
                    if s not in labels]
        unpaired += [(split, str(labels[s]), f"has no image {images / (s + '.jpg')}") for s in sorted(labels)
                     if s not in stems]
        _report_capped(report, unpaired, "unpaired files")
        pairs = sorted(set(stems) & set(labels))
        _check_ade20k_pairs(report, split, [stems[s] for s in pairs], [labels[s] for s in pairs], workers, seen)
    if "training" in report.counts:
        absent = [c for c in range(1, ADE20K_CLASSES + 1) if not seen[c]]
        if absent:
            report.fail("training", base / "annotations" / "training", f"class(es) {absent[:10]} never occur: "
                        f"every one of the {ADE20K_CLASSES} classes must occur in training")
    return report


def _check_ade20k_pairs(report: TaskReport, split: str, images: list[Path], masks: list[Path], workers: int,
                        seen: np.ndarray) -> None:
    image_facts = inspect_images(images, f"ade20k {split}: images", workers)
    mask_facts = inspect_images(masks, f"ade20k {split}: annotations", workers, labels=True)
    _check_decodes(report, {str(p): (split, p) for p in images + masks}, image_facts + mask_facts)
    report.formats = sorted({f.format for f in image_facts if f.format})
    odd = []
    for image, mask, fi, fm in zip(images, masks, image_facts, mask_facts):
        if fi.error or fm.error:
            continue
        if fi.size != fm.size:
            odd.append((split, str(mask), f"is {fm.size[0]}x{fm.size[1]}, its image {fi.size[0]}x{fi.size[1]}"))
        elif fm.histogram[ADE20K_CLASSES + 1:].any():
            top = int(np.flatnonzero(fm.histogram)[-1])
            odd.append((split, str(mask), f"holds label {top}, expected 0 (other) to {ADE20K_CLASSES}"))
        else:
            seen += fm.histogram
    _report_capped(report, odd, "annotations that do not fit their image")


# -- a whole folder ------------------------------------------------------------------------------
def read_manifest(root: Path) -> dict | None:
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); delete it and run ivpt data prepare again") from None


def find_task_folders(root: Path, marker: str) -> list[Path]:
    """Subfolders of ``root`` holding ``marker`` (a list or split file); hidden ones (work in progress) skipped."""
    return sorted(p.parent for p in Path(root).glob(f"*/{marker}") if not p.parent.name.startswith("."))


def detect_kind(root: Path) -> str:
    root = Path(root)
    manifest = read_manifest(root)
    if manifest and manifest.get("kind"):
        return manifest["kind"]
    if (root / ADE20K).is_dir() or (root / "images" / "training").is_dir():
        return "ade20k"
    if any(find_task_folders(root, f"{s}.txt") for s in VTAB_SPLITS):
        return "vtab-1k"
    if any(find_task_folders(root, f"{s}.json") for s in FGVC_SPLITS):
        return "fgvc"
    raise DataError(f"{root}: no VTAB-1k task (<task>/train800.txt ...), FGVC dataset (<dataset>/train.json ...) or "
                    f"ADE20K ({ADE20K}/images/training ...) found; is this the folder ivpt data prepare wrote?")


def check_folder(root, expect: Mapping | None = None, workers: int = 1,
                 allow_duplicates: Iterable[str] = ()) -> list[TaskReport]:
    """Verify every task of a prepared or hand-made data folder; a manifest, when there, must match too."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    kind = detect_kind(root)
    if kind == "ade20k":
        return [check_ade20k(root, expect, workers)]
    markers = VTAB_SPLITS if kind == "vtab-1k" else FGVC_SPLITS
    suffix = ".txt" if kind == "vtab-1k" else ".json"
    folders = sorted({f for s in markers for f in find_task_folders(root, s + suffix)})
    reports = []
    for folder in folders:
        if kind == "vtab-1k":  # duplicates let through at preparation stay let through
            allowed = folder.name in set(allow_duplicates) or task_record(folder).get("duplicates_allowed", False)
            report = check_vtab_task(folder, folder.name, expect, workers, allowed)
        else:
            report = check_fgvc_dataset(folder, folder.name, expect, workers)
        _check_against_record(report, folder, read_manifest(root))
        reports.append(report)
    return reports


def task_record(folder: Path) -> dict:
    """What ivpt data prepare recorded in a task folder it verified ({} for one made by hand)."""
    path = folder / TASK_RECORD
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); delete the task folder and prepare it again") from None


def _check_against_record(report: TaskReport, folder: Path, manifest: dict | None) -> None:
    """A prepared task's list files must still be the ones verified then (an edit afterwards shows here)."""
    record = (manifest or {}).get("tasks", {}).get(report.task)
    if record is None:
        return
    for name, digest in record.get("list_sha256", {}).items():
        now = report.list_sha256.get(name)
        if now is not None and now != digest:
            report.fail(Path(name).stem, folder / name, f"changed since ivpt data prepare verified it "
                                                        f"(sha256 {now[:12]}..., recorded {digest[:12]}...)")


def report_rows(reports: list[TaskReport]) -> tuple[list[dict], list[str]]:
    """One table row per task (counts per split, classes, image format, result) and its columns."""
    splits = list(dict.fromkeys(s for r in reports for s in r.counts))
    rows = [{"task": r.task, **{s: f"{r.counts[s]:,}" if s in r.counts else "-" for s in splits},
             "classes": r.classes, "format": "/".join(r.formats) or "-",
             "result": "ok" if r.ok else f"FAILED ({len(r.problems)})"} for r in reports]
    return rows, ["task", *splits, "classes", "format", "result"]
