"""Successive halving against the full grid: the epochs `ivpt tune --pruner sha` saves, and what its choice scores.

    python benchmarks/tuner.py                                   # 4 tasks x {vpt-deep, ivpt} x {grid, sha}
    python benchmarks/tuner.py --arms asha --tasks dtd10         # Optuna's asynchronous halving as well
    python benchmarks/tuner.py --shard 0/2 & python benchmarks/tuner.py --shard 1/2   # one process per core
    python benchmarks/tuner.py --report                          # the table from what is finished

Recipe: configs/suite/protocol.yaml (20 epochs with 2 warm-up, 4 lrs x 2 wds, 3 seeds, fp32), on the
suite's backbone (--set backbone=... as benchmarks/accuracy.py). Per (task, method) the two arms run one
after the other in one process with one worker each, so their wall times compare:
- grid: `--pruner none`, every grid point trained to the end (VPT's protocol as it was);
- sha: `--pruner sha`, synchronous successive halving (every point to epoch 2, the best third on to 6,
  then 18; the survivors resume from their checkpoints to the end, so each equals an unpruned run);
- asha (only with --arms): `--pruner asha`, Optuna's asynchronous successive halving on the same rungs.
Each arm then trains its choice on train+val with the 3 seeds and tests them. The sha arm trains in the
folder of benchmarks/accuracy.py's rerun at the same recipe (--runs, then full/<method>/<task>), so the
rerun reuses it; the grid arm in full-grid/<method>/<task>. Wall time per arm is measured around its
tune() call and added up across interruptions (a SIGTERM'd or Ctrl-C'd call still counts its time; a
SIGKILL'd one loses it, and the table says how many calls an arm took).
Run state (studies, runs) under --runs (default benchmarks/state/suite-protocol, not committed); each arm's
summary.json is published under --summaries (default benchmarks/results/<the --runs folder's name>/, the
layout of --runs, committed) and an arm whose summary is there is not run again, so the table rebuilds from
the results alone. Results: benchmarks/results/tuner.{json,csv} after every arm; wall times in
<summaries>/tuner_wall.json.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import statistics
import time
from pathlib import Path

from accuracy import variant_config
from common import RESULTS, ROOT, STATE, committed_summary, machine, publish_summary, today, write_json
from ivpt.cli import parse_shard
from ivpt.data.suite import SUITE_TASKS
from ivpt.engine.config import load_config
from ivpt.engine.hardware import configure_threads
from ivpt.engine.study import tune
from ivpt.tables import print_table, write_csv

# natural, specialized and two structured tasks: every group of the suite
TASKS = ["dtd10", "pneumonia", "dsprites-loc", "clevr-count"]
METHODS = ["vpt-deep", "ivpt"]
ARMS = {"grid": ("none", "full-grid"), "sha": ("sha", "full"), "asha": ("asha", "full-asha")}  # arm -> (pruner, folder)
COMPARED = ("grid", "sha")  # a pair is complete when both are; asha is reported where it was run


def arm_folder(runs: Path, arm: str) -> Path:
    return runs / ARMS[arm][1]


def load_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def run_arm(base, runs: Path, summaries: Path, arm: str, method: str, task: str) -> dict:
    """One arm of one (task, method), timed; the time of an interrupted call is kept as well."""
    cfg = variant_config(base, method, task, arm_folder(runs, arm), quick=False)
    published = arm_folder(summaries, arm) / method / task / "summary.json"
    summary = committed_summary(cfg, published)
    if summary is not None:  # finished (perhaps on another machine): its wall time is recorded already
        return summary
    wall_path, key = summaries / "tuner_wall.json", f"{arm}/{method}/{task}"
    started = time.perf_counter()
    try:
        summary = tune(cfg, arm_folder(runs, arm) / method / task, pruner=ARMS[arm][0])
        summary = publish_summary(cfg, arm_folder(runs, arm) / method / task, summary, published)
    finally:
        elapsed = time.perf_counter() - started
        runs.mkdir(parents=True, exist_ok=True)
        with open(runs / "tuner_wall.lock", "w") as lock:  # shards add their times to one file
            fcntl.flock(lock, fcntl.LOCK_EX)
            walls = load_json(wall_path, {})
            entry = walls.setdefault(key, {"seconds": 0.0, "calls": 0, "done": False})
            if not entry["done"]:  # a finished arm read back later adds nothing
                entry["seconds"] += elapsed
                entry["calls"] += 1
            entry["done"] = entry["done"] or published.is_file()
            write_json(wall_path, walls)
    return summary


def arm_row(summary: dict, wall: dict, epochs: int) -> dict:
    final_epochs = epochs * len(summary["seeds"])
    return {"grid_epochs": summary["epochs_trained"] - final_epochs, "epochs": summary["epochs_trained"],
            "pruned": summary["pruned"], "wall_s": round(wall["seconds"], 1), "calls": wall["calls"],
            "lr": summary["chosen"]["lr"], "wd": summary["chosen"]["weight_decay"],
            "val": summary["chosen"]["val_top1"], "test_mean": summary["test_mean"], "test_std": summary["test_std"],
            "test": summary["test_top1"]}


def report(base, summaries: Path, tasks: list[str], methods: list[str]) -> dict:
    """The table from the published summaries and wall times (no run state needed)."""
    walls = load_json(summaries / "tuner_wall.json", {})
    out = {"recipe": base.to_dict(), "date": today(),
           "machine": f"{machine(threads=False)} (the arms: one thread per process, two shards side by side)",
           "pairs": {}}
    for method in methods:
        for task in tasks:
            arms = {}
            for arm in ARMS:
                summary = load_json(arm_folder(summaries, arm) / method / task / "summary.json", None)
                wall = walls.get(f"{arm}/{method}/{task}")
                if summary is not None and wall is not None:
                    arms[arm] = arm_row(summary, wall, base.epochs)
            if all(arm in arms for arm in COMPARED):
                out["pairs"][f"{method}/{task}"] = {"method": method, "task": task, "group": SUITE_TASKS[task][0], **arms}
    pairs = list(out["pairs"].values())
    if pairs:
        total = {arm: {k: sum(p[arm][k] for p in pairs) for k in ("grid_epochs", "epochs", "wall_s")} for arm in COMPARED}
        out["total"] = {**total, "pairs": len(pairs),
                        "grid_epochs_ratio": total["grid"]["grid_epochs"] / max(1, total["sha"]["grid_epochs"]),
                        "epochs_ratio": total["grid"]["epochs"] / max(1, total["sha"]["epochs"]),
                        "wall_ratio": total["grid"]["wall_s"] / max(1e-9, total["sha"]["wall_s"]),
                        "same_choice": sum((p["grid"]["lr"], p["grid"]["wd"]) == (p["sha"]["lr"], p["sha"]["wd"])
                                           for p in pairs),
                        "test_mean_grid": statistics.fmean(p["grid"]["test_mean"] for p in pairs),
                        "test_mean_sha": statistics.fmean(p["sha"]["test_mean"] for p in pairs),
                        # noise: the spread of a choice's test score over its seeds, averaged over pairs
                        "seed_std_mean": statistics.fmean((p["grid"]["test_std"] + p["sha"]["test_std"]) / 2 for p in pairs)}
        with_asha = [p for p in pairs if "asha" in p]
        if with_asha:  # Optuna's asynchronous halving, on the pairs it ran
            out["total"]["asha"] = {"pairs": len(with_asha),
                                    **{f"{arm}_grid_epochs": sum(p[arm]["grid_epochs"] for p in with_asha) for arm in ARMS}}
    return out


def save(out: dict) -> None:
    write_json("tuner.json", out)
    rows = [{"method": p["method"], "task": p["task"], "arm": arm,
             **{k: v for k, v in p[arm].items() if k != "test"}} for p in out["pairs"].values() for arm in ARMS if arm in p]
    write_csv(RESULTS / "tuner.csv", rows)


def print_report(out: dict) -> None:
    rows = [{"method": p["method"], "task": p["task"],
             **{f"{arm} {k}": (f"{100 * v:.1f}" if k in ("val", "test_mean") else v)
                for arm in ARMS if arm in p for k, v in p[arm].items() if k in ("grid_epochs", "wall_s", "lr", "wd", "val", "test_mean")}}
            for p in out["pairs"].values()]
    columns = list(dict.fromkeys(k for row in rows for k in row))  # asha's columns where it ran
    print_table([{k: row.get(k, "") for k in columns} for row in rows], columns)
    if "total" in out:
        t = out["total"]
        print(f"{t['pairs']} pairs: the full grid trained {t['grid_epochs_ratio']:.2f}x the grid-stage epochs of "
              f"successive halving ({t['epochs_ratio']:.2f}x with the seed runs), {t['wall_ratio']:.2f}x its wall time; "
              f"same choice on {t['same_choice']}; test mean {100 * t['test_mean_grid']:.2f} (grid) vs "
              f"{100 * t['test_mean_sha']:.2f} (sha), seed std {100 * t['seed_std_mean']:.2f}")
        if "asha" in t:
            a = t["asha"]
            print(f"asynchronous halving on {a['pairs']} of them: grid-stage epochs {a['grid_grid_epochs']} (grid), "
                  f"{a['sha_grid_epochs']} (sha), {a['asha_grid_epochs']} (asha)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "suite" / "protocol.yaml"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides (e.g. the testbed's backbone)")
    parser.add_argument("--tasks", nargs="+", default=TASKS, choices=list(SUITE_TASKS))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=["vpt-deep", "ivpt", "vpt-shallow", "gatevpt"])
    parser.add_argument("--runs", default=str(STATE / "suite-protocol"),
                        help="folder of every run (resumable; not committed); the same as benchmarks/accuracy.py --runs for its rerun")
    parser.add_argument("--summaries", default=None,
                        help="folder of the published summaries and wall times (committed; default benchmarks/results/<--runs name>)")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), help="i/n: every n-th (task, method) pair only")
    parser.add_argument("--arms", nargs="+", default=list(COMPARED), choices=list(ARMS), help="arms to run (default grid sha)")
    parser.add_argument("--report", action="store_true", help="only the table of what is finished")
    args = parser.parse_args()
    index, count = args.shard
    configure_threads(processes=count)
    base = load_config(args.recipe, args.set)
    runs = Path(args.runs)
    summaries = Path(args.summaries or RESULTS / runs.name)
    if not args.report:
        pairs = [(task, method) for task in args.tasks for method in args.methods]
        for task, method in pairs[index::count]:
            for arm in args.arms:
                print(f"{method} on {task}: {arm} ...", flush=True)
                run_arm(base, runs, summaries, arm, method, task)
                if count == 1:
                    save(report(base, summaries, args.tasks, args.methods))
    out = report(base, summaries, args.tasks, args.methods)
    save(out)
    print_report(out)


if __name__ == "__main__":
    main()
