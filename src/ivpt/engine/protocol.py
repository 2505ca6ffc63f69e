"""VPT's protocol: lr x wd grid on train -> val, pick, retrain on train+val with several seeds, test.

Every run writes its own results.json under the output folder and completed runs are skipped, so an
interrupted tuning restarts where it stopped. ``ivpt.engine.study.tune`` runs the stages as Optuna
studies that any number of worker processes and machines share through one storage.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .config import TrainConfig

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


def check_finals(finals, choice: dict) -> None:
    """A finished final run is reused only if it trained at the chosen lr and weight decay, with its config
    otherwise the job's too (E2VPT's seeds: the chosen masks)."""
    from .config import config_differences

    for run, cfg in finals:
        done = _done(run)
        if done is None:
            continue
        trained = (done["config"]["lr"], done["config"]["weight_decay"])
        if trained != (choice["lr"], choice["weight_decay"]):
            raise ValueError(f"{run} was trained at lr {trained[0]:g}, wd {trained[1]:g}, but the choice is now "
                             f"lr {choice['lr']:g}, wd {choice['weight_decay']:g}: remove that run folder or use "
                             "another output")
        differences = config_differences(done["config"], cfg)
        if differences:
            raise ValueError(f"{run} is a finished run of another config (it differs in {', '.join(differences)}): "
                             "remove that run folder or use another output")


def choose(grid_results: list[dict]) -> dict:
    """Best val top-1; ties go to the smaller lr, then to the larger weight decay."""
    def score(r):  # top-1 for classification, mIoU for segmentation
        return r["val"][r.get("primary_metric", "top1")]

    best = max(grid_results, key=lambda r: (round(score(r), 6), -r["config"]["lr"], r["config"]["weight_decay"]))
    return {"lr": best["config"]["lr"], "weight_decay": best["config"]["weight_decay"], "val_top1": score(best)}


def grid_edges(chosen: dict, lrs: list[float], wds: list[float]) -> list[str]:
    """The chosen values that lie on the edge of their grid (its largest or smallest value), as
    ``"lr 0.01 is the largest of [0.01, 0.003]"``: the optimum may lie outside the grid, so a wider grid
    could choose differently. A grid of one value has no edge worth naming (nothing was searched), nor has a
    weight decay of 0 (nothing lies below it)."""
    edges = []
    for name, value, grid in (("lr", chosen.get("lr"), lrs), ("wd", chosen.get("weight_decay"), wds)):
        values = sorted({float(v) for v in grid})
        if value is None or len(values) < 2 or float(value) not in (values[0], values[-1]):
            continue
        if float(value) == values[0] == 0.0:
            continue
        side = "largest" if float(value) == values[-1] else "smallest"
        edges.append(f"{name} {float(value):g} is the {side} of [{', '.join(f'{v:g}' for v in grid)}]")
    return edges


def grid_edge_warning(chosen: dict, lrs: list[float], wds: list[float]) -> str | None:
    """One line for ``ivpt tune`` to warn with, or None when the choice lies inside its grid."""
    edges = grid_edges(chosen, lrs, wds)
    if not edges:
        return None
    return (f"the choice is on the edge of its grid ({'; '.join(edges)}): the best value may lie outside it; "
            "widen protocol.lrs / protocol.wds to check")
