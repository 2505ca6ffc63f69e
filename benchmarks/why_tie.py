"""Why does iVPT tie VPT-deep? How far its DA weights and AR gammas move, and whether a longer schedule moves them.

    python benchmarks/why_tie.py                       # resumable; about 20 minutes on 2 cores
    python benchmarks/why_tie.py --adapters runs/testbed/mini-v1/ivpt   # which trained adapters to read

1. Trained adapters: every iVPT adapter under --adapters (by default the testbed probe's iVPT runs on
   today's testbed: the spec's method trained 5 epochs on train) is explained on its task's val
   images: per transition, DA's weight alpha (its start is sigmoid(0) = 0.5; how far the mean and the
   tokens' spread move), AR's gamma (its start is 0, where AR does nothing) and AR's change to the
   reinforced patch tokens relative to their norm.
2. A longer schedule: iVPT trained 5 and 20 epochs (the benchmark recipe, lr 0.01, seed 42) on
   dsprites-loc and dtd10; the per-epoch diagnostics in metrics.jsonl show whether the quantities
   keep growing.
Writes benchmarks/results/why_tie.json and why_tie_schedule.png, and one adapter figure per task.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

import ivpt
from ivpt.engine.config import load_config
from ivpt.engine.data import build_task_data
from ivpt.engine.loop import train
from ivpt.explain import explain, plot_adapter
from common import RESULTS, ROOT, STATE, header, write_json
SCHEDULE_TASKS = ["dsprites-loc", "dtd10"]
SCHEDULES = [5, 20]


def read_adapter(adapter: Path) -> dict:
    model = ivpt.load_adapter(adapter).eval()
    config = json.loads((adapter / "adapter_config.json").read_text())
    data = build_task_data(config["data"], model.backbone.pretrained_cfg)
    e = explain(model, data.splits["val"].images)
    rows = []
    for t in e.transitions:
        rows.append({"transition": t.transition, "da_mode": t.da_mode, "da_weight": t.da_weight,
                     "da_shift": None if t.da_weight is None else t.da_weight - t.da_start,
                     "da_token_std": statistics.pstdev(t.da_weights) if t.da_weights else None,
                     "gamma": t.gamma, "ratio": t.ratio})
    return {"adapter": str(adapter), "task": config["data"].get("task"), "val_top1": config.get("metrics", {}).get("val"),
            "transitions": rows, "explanation": e}


def summary(rows: list[dict]) -> dict:
    def mean_abs(key):
        values = [abs(r[key]) for r in rows if r[key] is not None]
        return statistics.fmean(values) if values else None

    return {"mean_abs_da_shift": mean_abs("da_shift"), "mean_da_token_std": mean_abs("da_token_std"),
            "mean_abs_gamma": mean_abs("gamma"), "mean_ratio": mean_abs("ratio"),
            "max_ratio": max((r["ratio"] for r in rows if r["ratio"] is not None), default=None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", default=str(STATE / "testbed" / "mini-v1" / "ivpt"))
    parser.add_argument("--runs", default=str(STATE / "why_tie"))
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "suite" / "benchmark.yaml"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {**header(), "adapters": [], "schedule": {}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for adapter in sorted(Path(args.adapters).glob("*/lr*/adapter")):
        found = read_adapter(adapter)
        e = found.pop("explanation")
        found["summary"] = summary(found["transitions"])
        report["adapters"].append(found)
        if adapter.parent.name == "lr0.01":
            plot_adapter(e, RESULTS / f"why_tie_{found['task']}.png", title=f"iVPT on {found['task']} (5 epochs, lr 0.01)")
        s = found["summary"]
        print(f"{found['task']:13s} {adapter.parent.name}: |alpha - 0.5| {s['mean_abs_da_shift']:.4f}, token std "
              f"{s['mean_da_token_std']:.4f}, |gamma| {s['mean_abs_gamma']:.4f}, AR change {s['mean_ratio']:.4f}", flush=True)
    base = dataclasses.replace(load_config(args.recipe), method="ivpt", precision="fp32", lr=0.01, seed=42,
                               train_split="train", eval_split="val", test_split=None)
    for task in SCHEDULE_TASKS:
        for epochs in SCHEDULES:
            out = Path(args.runs) / task / f"epochs{epochs}"
            cfg = dataclasses.replace(base, epochs=epochs, warmup_epochs=max(1, epochs // 5),
                                      data={**base.data, "task": task}, output=str(out)).validate()
            done = out / "results.json"
            result = json.loads(done.read_text()) if done.is_file() else train(cfg, resume=True, quiet=True)
            report["schedule"].setdefault(task, {})[str(epochs)] = {"val_top1": result["val"]["top1"], "log": result["log"]}
            last = result["log"][-1]
            print(f"{task} {epochs} epochs: val {100 * result['val']['top1']:.1f}, gamma_0 {last.get('ar_gamma_0')}, "
                  f"AR change_0 {last.get('ar_ratio_0')}", flush=True)
    write_json("why_tie.json", report)
    plot_schedule(report)


def plot_schedule(report: dict) -> None:
    from ivpt.extras import require

    matplotlib = require("matplotlib", "benchmarks/why_tie.py's figure", "bench")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for task, runs in report["schedule"].items():
        log = runs[str(max(SCHEDULES))]["log"]
        epochs = [e["epoch"] for e in log]
        for ax, key, label in ((axes[0], "da_weight", "mean DA weight alpha"), (axes[1], "ar_gamma", "|AR gamma|"),
                               (axes[2], "ar_ratio", "AR change / patch norm")):
            keys = sorted({k for e in log for k in e if k.startswith(key + "_")}, key=lambda k: int(k.rsplit("_", 1)[1]))
            values = [statistics.fmean(abs(e[k]) for k in keys) for e in log]
            ax.plot(epochs, values, marker="o", ms=3, label=task)
            ax.set_title(f"{label} (mean over transitions)", fontsize=9)
            ax.set_xlabel("epoch")
    axes[0].axhline(0.5, color="grey", ls="--", lw=1, label="start (0.5)")
    axes[1].axhline(0.0, color="grey", ls="--", lw=1, label="start (AR off)")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"iVPT trained {max(SCHEDULES)} epochs: do DA and AR move? (val images, per-epoch diagnostics)", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "why_tie_schedule.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
