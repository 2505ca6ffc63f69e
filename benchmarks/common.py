"""What every benchmark script repeats: where results and run state go, the machine's description and the
date in each results file's header, and writing a results file.

The scripts run as ``python benchmarks/<name>.py``, so this folder is on their path: ``from common import ...``.
Results (JSON, CSV, figures, the per-task summaries the tables are built from) go to benchmarks/results/ and
are committed; run state (studies, checkpoints, adapters, logs) goes to benchmarks/state/, which git ignores.
"""
from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STATE = ROOT / "benchmarks" / "state"


def machine(threads: bool = True, libraries: tuple[str, ...] = ("torch",)) -> str:
    """The line a results file records about where it was measured, e.g. ``x86_64, 2 threads, torch 2.5.1``:
    the processor, torch's CPU threads in this process, and the versions of the libraries that shaped it."""
    import importlib

    import torch

    parts = [platform.processor() or platform.machine()]
    if threads:
        parts.append(f"{torch.get_num_threads()} threads")
    parts += [f"{name} {importlib.import_module(name).__version__}" for name in libraries]
    return ", ".join(parts)


def today() -> str:
    """The date (UTC) a results file records."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def header(threads: bool = True, libraries: tuple[str, ...] = ("torch",)) -> dict:
    """The first two keys of every results file: ``machine`` (see machine()) and ``date``."""
    return {"machine": machine(threads, libraries), "date": today()}


def write_json(path: Path | str, report: dict) -> Path:
    """Write a results file atomically (a reader never sees half of it); a bare name lands in benchmarks/results."""
    from ivpt.engine.checkpoint import atomic_write

    path = Path(path)
    if not path.is_absolute() and path.parent == Path("."):
        path = RESULTS / path
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    return path


# -- the per-(method, task) summaries the accuracy and tuner tables are built from --------------------------
# A tuned (method, task) leaves its run state under --runs (the Optuna study, every grid and seed run) and
# one summary.json. The summary is copied to the same place under benchmarks/results/, with what the tables
# need that lives only in the run state (the training seconds the runs logged) and the study's key, so that
# the tables rebuild from git alone and a committed summary is reused only by the recipe that made it.


def training_seconds(folder: Path) -> float:
    """ivpt's own count (``ivpt.engine.study.training_seconds``), imported on use: modules that only read
    results import this one without torch."""
    from ivpt.engine.study import training_seconds as logged

    return logged(folder)


def recipe_key(cfg) -> str:
    """The key of the study a (method, task) config tunes in: every result field but lr, wd, seed and paths."""
    from ivpt.engine.config import as_started
    from ivpt.engine.study import study_key

    return study_key(as_started(cfg.validate()))


def publish_summary(cfg, run_folder: Path, summary: dict, path: Path) -> dict:
    """Copy a finished tune's summary to ``path`` (under benchmarks/results) with its training seconds and key."""
    published = {**summary, "training_seconds": training_seconds(run_folder), "study_key": recipe_key(cfg)}
    write_json(path, published)
    return published


def committed_summary(cfg, path: Path) -> dict | None:
    """A summary published earlier for this config (None: none yet); one from another recipe is refused."""
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("study_key") != recipe_key(cfg):
        raise SystemExit(f"{path} was written by another recipe (study key {summary.get('study_key')}, this one "
                         f"{recipe_key(cfg)}): pass another --summaries folder for this recipe, or remove that file "
                         "to tune the pair again")
    return summary
