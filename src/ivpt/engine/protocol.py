"""VPT's protocol: lr x wd grid on train -> val, pick, retrain on train+val with several seeds, test.

Every run writes its own results.json under the output folder and completed runs are skipped, so an
interrupted tuning restarts where it stopped. ``shard=(i, n)`` runs every n-th job from the i-th, so
n processes (or machines sharing the folder) split the work; any process then merges.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

from ..progress import progress as tqdm_or_lines

from .checkpoint import atomic_write
from .config import TrainConfig
from .loop import train

# the spec's grid: base lrs (scaled by batch/256) and weight decays; VTAB's five seeds
VPT_LRS = [50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05]
VPT_WDS = [0.01, 0.001, 0.0001, 0.0]
VPT_SEEDS = [42, 44, 82, 100, 800]


def _name(value: float) -> str:
    return f"{value:g}"


def grid_jobs(cfg: TrainConfig, out: Path) -> list[tuple[Path, TrainConfig]]:
    lrs, wds = cfg.protocol.get("lrs", VPT_LRS), cfg.protocol.get("wds", VPT_WDS)
    jobs = []
    for lr in lrs:
        for wd in wds:
            run = out / "grid" / f"lr{_name(lr)}_wd{_name(wd)}"
            jobs.append((run, dataclasses.replace(cfg, lr=float(lr), weight_decay=float(wd), train_split="train",
                                                  eval_split="val", test_split=None, output=str(run))))
    return jobs


def final_jobs(cfg: TrainConfig, out: Path, lr: float, wd: float) -> list[tuple[Path, TrainConfig]]:
    jobs = []
    for seed in cfg.protocol.get("seeds", VPT_SEEDS):
        run = out / "final" / f"seed{seed}"
        jobs.append((run, dataclasses.replace(cfg, lr=lr, weight_decay=wd, seed=int(seed), train_split="trainval",
                                              eval_split="none", test_split="test", output=str(run))))
    return jobs


def _done(run: Path) -> dict | None:
    path = run / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _wait_for(jobs, wait: float | None, what: str) -> bool:
    """True once every run exists; polls every ``wait`` seconds (None: do not wait)."""
    while True:
        missing = [run for run, _ in jobs if _done(run) is None]
        if not missing:
            return True
        if wait is None:
            return False
        print(f"waiting for {len(missing)} {what} run(s) of other shards, e.g. {missing[0]} ...", flush=True)
        time.sleep(wait)


def _run_jobs(jobs, shard: tuple[int, int], desc: str) -> None:
    index, count = shard
    mine = [job for i, job in enumerate(jobs) if i % count == index and _done(job[0]) is None]
    for _, cfg in tqdm_or_lines(mine, desc=desc, leave=True):
        train(cfg, resume=True, quiet=True)  # resume=True: an interrupted run continues


def _check_finals(finals, choice: dict) -> None:
    """A finished final run is reused only if it trained at the chosen lr and weight decay."""
    for run, _ in finals:
        done = _done(run)
        if done is None:
            continue
        trained = (done["config"]["lr"], done["config"]["weight_decay"])
        if trained != (choice["lr"], choice["weight_decay"]):
            raise ValueError(f"{run} was trained at lr {trained[0]:g}, wd {trained[1]:g}, but the choice is now "
                             f"lr {choice['lr']:g}, wd {choice['weight_decay']:g}: remove that run folder or use "
                             "another output")


def choose(grid_results: list[dict]) -> dict:
    """Best val top-1; ties go to the smaller lr, then to the larger weight decay."""
    def score(r):  # top-1 for classification, mIoU for segmentation
        return r["val"][r.get("primary_metric", "top1")]

    best = max(grid_results, key=lambda r: (round(score(r), 6), -r["config"]["lr"], r["config"]["weight_decay"]))
    return {"lr": best["config"]["lr"], "weight_decay": best["config"]["weight_decay"], "val_top1": score(best)}


def tune(cfg: TrainConfig, output: str | Path, shard: tuple[int, int] = (0, 1),
         wait: float | None = None, chosen: dict | None = None) -> dict[str, Any] | None:
    """Run this shard's share and return the merged summary.

    ``chosen`` ({"lr", "weight_decay"} and optionally "from") skips the grid and trains the final runs
    at a choice made elsewhere on val, e.g. an ablation reusing its full method's choice.

    With several shards, a shard whose share is done waits (polling every ``wait`` seconds) for the
    others' grid runs before the final runs, and for their final runs before merging; every shard then
    writes the same summary. With ``wait=None`` it returns None instead of waiting.
    """
    out = Path(output)
    if not 0 <= shard[0] < shard[1]:
        raise ValueError(f"--shard {shard[0]}/{shard[1]}: expected i/n with 0 <= i < n")
    if chosen is None:
        grid = grid_jobs(cfg, out)
        _run_jobs(grid, shard, "grid (train -> val)")
        if not _wait_for(grid, wait, "grid"):
            return None  # other shards still own grid runs
        grid_results = [_done(run) for run, _ in grid]
        choice = choose(grid_results)
    else:
        grid_results, choice = [], dict(chosen)
    finals = final_jobs(cfg, out, choice["lr"], choice["weight_decay"])
    _check_finals(finals, choice)
    _run_jobs(finals, shard, "final (train+val -> test)")
    if not _wait_for(finals, wait, "final"):
        return None
    _check_finals(finals, choice)
    final_results = [_done(run) for run, _ in finals]
    tests = [r["test"][r.get("primary_metric", "top1")] for r in final_results]
    summary = {
        "data": cfg.data,
        "method": cfg.method,
        "method_options": cfg.method_options,
        "metric": final_results[0].get("primary_metric", "top1"),
        "grid": [{"lr": r["config"]["lr"], "weight_decay": r["config"]["weight_decay"],
                  "val_top1": r["val"][r.get("primary_metric", "top1")]} for r in grid_results],
        "chosen": choice,
        "seeds": [r["config"]["seed"] for r in final_results],
        "test_top1": tests,
        "test_mean": statistics.fmean(tests),
        "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
        "parameters": final_results[0]["parameters"],
    }
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    return summary
