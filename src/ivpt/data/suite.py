"""The offline suite: a VTAB-1k-style benchmark that runs on CPU with no downloads.

Each task has 800 train / 200 val images and a fixed test subset of at most 2,000, drawn with a
fixed seed, and belongs to one of VTAB's groups. Report both the mean of group means and the
plain mean over tasks (``summarize``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .datasets import ArrayDataset, DataError, require_known
from .paths import cache_dir
from .procedural import MECHANISM_TASKS, PROCEDURAL_TASKS, VERSIONS, render, tasks_of
from .sources import dtd10, fashion_mnist, load_npz_cache, pneumonia_mnist
from .vtab import GROUPS

TRAIN, VAL, TEST_MAX = 800, 200, 2000
# Versions of the procedural tasks (ivpt.data.procedural): 1, the original; 2, VTAB's label
# resolution in patch units. Natural and specialized tasks are the same in every version.
SUITE_VERSIONS = tuple(VERSIONS)

# task -> (group, needs the shared data folder or a system package)
SUITE_TASKS: dict[str, tuple[str, str | None]] = {
    "dtd10": ("natural", "dtd10-256.tar.gz"),
    "fashion-mnist": ("natural", "Debian package dataset-fashion-mnist"),
    "pneumonia": ("specialized", "pneumoniamnist.npz"),
    **{name: (group, None) for name, (_, _, group, _) in PROCEDURAL_TASKS.items()},
}
# Procedural tasks outside the benchmark suite (not in its means): their images come with the box of
# the evidence, for pointing scores (benchmarks/mechanism.py). Loaded like suite tasks.
EXTRA_TASKS: dict[str, tuple[str, str | None]] = {name: (group, None) for name, (_, _, group, _) in MECHANISM_TASKS.items()}


@dataclass
class SuiteTask:
    name: str
    group: str
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    boxes: dict[str, np.ndarray] | None = None  # split -> (N, 4) evidence boxes (mechanism tasks only)

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def trainval(self) -> ArrayDataset:
        """train800val200, for the final runs of the protocol."""
        return ArrayDataset(np.concatenate([self.train.images, self.val.images]),
                            np.concatenate([self.train.labels, self.val.labels]), self.classes)


def _sample(rng, n_total: int, n: int) -> np.ndarray:
    return np.sort(rng.choice(n_total, size=min(n, n_total), replace=False))


def _procedural(name: str, seed: int, version: int) -> SuiteTask:
    mechanism = name in MECHANISM_TASKS
    _, _, group, classes = MECHANISM_TASKS[name] if mechanism else tasks_of(version)[name]
    # the version is in the name, so a cache of one version is never read as another
    path = cache_dir() / (f"suite-{name}-seed{seed}.npz" if mechanism else f"suite-{name}-v{version}-seed{seed}.npz")
    arrays = load_npz_cache(path)
    if arrays is None:
        names = sorted(PROCEDURAL_TASKS) + sorted(MECHANISM_TASKS)
        base = seed * 1000 + names.index(name) * 10
        arrays = {}
        for offset, (split, count) in enumerate((("train", TRAIN), ("val", VAL), ("test", TEST_MAX))):
            drawn = render(name, count, base + offset, version)
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = drawn[:2]
            if mechanism:
                arrays[f"{split}_boxes"] = drawn[2]
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    splits = {s: ArrayDataset(arrays[f"{s}_images"], arrays[f"{s}_labels"], classes) for s in ("train", "val", "test")}
    boxes = None
    if mechanism:
        boxes = {s: arrays[f"{s}_boxes"] for s in ("train", "val", "test")}
        boxes["trainval"] = np.concatenate([boxes["train"], boxes["val"]])
    return SuiteTask(name, group, **splits, boxes=boxes)


def load_task(name: str, seed: int = 0, version: int = 1) -> SuiteTask:
    """One suite task; the same seed and version always give the same images in the same splits."""
    require_known("offline-suite task", name, {**SUITE_TASKS, **EXTRA_TASKS})
    if version not in SUITE_VERSIONS:
        raise DataError(f"offline-suite version {version!r} is unknown; expected one of "
                        f"{', '.join(map(str, SUITE_VERSIONS))}")
    group = {**SUITE_TASKS, **EXTRA_TASKS}[name][0]
    rng = np.random.default_rng(seed)
    if name in PROCEDURAL_TASKS or name in EXTRA_TASKS:
        return _procedural(name, seed, version)
    if name == "dtd10":
        data = dtd10()
        parts = {"train": [], "val": [], "test": []}
        for label in range(len(data.classes)):  # seeded per-class split: 80 / 20 / 20
            idx = rng.permutation(np.flatnonzero(data.labels == label))
            n_train, n_val = len(idx) * 2 // 3, len(idx) // 6
            parts["train"].append(idx[:n_train])
            parts["val"].append(idx[n_train:n_train + n_val])
            parts["test"].append(idx[n_train + n_val:])
        return SuiteTask(name, group, **{s: data.subset(np.sort(np.concatenate(p))) for s, p in parts.items()})
    if name == "fashion-mnist":
        data = fashion_mnist()
        pool = rng.permutation(len(data["train"]))[:TRAIN + VAL]
        return SuiteTask(name, group, data["train"].subset(np.sort(pool[:TRAIN])),
                         data["train"].subset(np.sort(pool[TRAIN:])),
                         data["test"].subset(_sample(rng, len(data["test"]), TEST_MAX)))
    data = pneumonia_mnist()
    return SuiteTask(name, group, data["train"].subset(_sample(rng, len(data["train"]), TRAIN)),
                     data["val"].subset(_sample(rng, len(data["val"]), VAL)),
                     data["test"].subset(_sample(rng, len(data["test"]), TEST_MAX)))


def summarize(accuracy: dict[str, float]) -> dict[str, float | dict[str, float]]:
    """Group means, their mean, and the plain mean over the tasks given."""
    groups = {}
    for group in GROUPS:
        values = [v for task, v in accuracy.items() if SUITE_TASKS.get(task, (None,))[0] == group]
        if values:
            groups[group] = float(np.mean(values))
    return {
        "groups": groups,
        "mean_of_group_means": float(np.mean(list(groups.values()))) if groups else float("nan"),
        "plain_mean": float(np.mean(list(accuracy.values()))) if accuracy else float("nan"),
    }
