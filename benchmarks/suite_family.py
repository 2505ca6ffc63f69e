"""E2VPT and VFPT on the offline suite beside VPT-deep and iVPT: collect the finished (method, task) pairs.

    OMP_NUM_THREADS=1 ivpt benchmark suite configs/suite/protocol.yaml --output benchmarks/state/suite-protocol/full \\
        --methods e2vpt vfpt --workers 2          # the runs (resumable; docs/benchmarks.md)
    python benchmarks/suite_family.py             # this: summaries into benchmarks/results/, suite_family.json

Each finished pair's summary.json is copied from the run folder (benchmarks/state, not committed) to
benchmarks/results/suite-protocol/full/<method>/<task>/, where the other rows' summaries are; the table
beside VPT-deep and iVPT (their summaries of the 2026-12-02 rerun) is written to
benchmarks/results/suite_family.json for report.py. Unfinished pairs are listed as such, never estimated.
"""
from __future__ import annotations

import json
import shutil

from common import RESULTS, STATE, header, write_json

from ivpt.data.suite import SUITE_TASKS

NEW = ("e2vpt", "vfpt")
BESIDE = ("vpt-deep", "ivpt")
RUNS = STATE / "suite-protocol" / "full"
SUMMARIES = RESULTS / "suite-protocol" / "full"


def collect() -> None:
    """Copy every finished new pair's summary next to the other rows' (a pair is finished when tune wrote it)."""
    for method in NEW:
        for task in SUITE_TASKS:
            source = RUNS / method / task / "summary.json"
            if source.is_file():
                target = SUMMARIES / method / task / "summary.json"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)


def row(summary: dict) -> dict:
    return {"test_mean": summary["test_mean"], "test_std": summary["test_std"], "seeds": summary["seeds"],
            "test_top1": summary["test_top1"], "lr": summary["chosen"]["lr"],
            "weight_decay": summary["chosen"]["weight_decay"], "val_top1": summary["chosen"]["val_top1"],
            "tuned_without_head": summary["parameters"].get("tuned_without_head"),
            "options": summary["method_options"], "core_hours": round(summary.get("training_seconds", 0) / 3600, 2)}


def table() -> dict:
    methods = {}
    for method in BESIDE + NEW:
        tasks = {}
        for task in SUITE_TASKS:
            path = SUMMARIES / method / task / "summary.json"
            tasks[task] = row(json.loads(path.read_text())) if path.is_file() else None
        done = [t for t in tasks.values() if t is not None]
        methods[method] = {"tasks": tasks, "finished": len(done),
                           "mean": sum(t["test_mean"] for t in done) / len(done) if len(done) == len(tasks) else None}
    return {**header(threads=False), "recipe": "configs/suite/protocol.yaml", "tasks": list(SUITE_TASKS),
            "methods": methods}


def main() -> None:
    collect()
    report = table()
    write_json("suite_family.json", report)
    for name, m in report["methods"].items():
        print(f"{name:<9} {m['finished']}/{len(report['tasks'])} tasks finished"
              + (f", mean {100 * m['mean']:.2f}" if m["mean"] is not None else ""))


if __name__ == "__main__":
    main()
