"""Does AR point at the evidence? iVPT against VPT-deep on find-shape, a task whose evidence is known.

    python benchmarks/mechanism.py                 # resumable; about 15 minutes on 2 cores
    python benchmarks/mechanism.py --quick         # 1 epoch, 1 seed: checks the pipeline

find-shape (ivpt.data.procedural): one small target shape (heart, arrow, flag or cross: the label)
among 5-8 distractors (squares, ellipses, triangles) of the same sizes and colours, about 1.1-1.6
patches wide on the default backbone's 8 x 8 grid; the generator records the target's box. Design
and success measures were fixed before the run (docs/benchmarks.md, "Mechanism test"):
- VPT's protocol at the suite's benchmark recipe (configs/suite/benchmark.yaml in fp32): lr chosen
  on val from {0.03, 0.01}, then seeds 42, 44, 82 on train+val, top-1 on the 2,000 test images.
  iVPT is the spec's method (CDC, gate DA, AR at ratio 0.25, i.e. K = 16 of m = 64 patches).
- Pointing, on the test images, per AR transition: coverage = |S n T| / |T|, the share of the
  target's patches T among AR's K selected patches S (chance K/m = 0.25), and hit@1 = whether
  the most salient patch is a target patch (chance |T|/m). For iVPT freshly initialised (seed
  42: gamma = 0, so AR changes nothing yet) and after training (each seed's adapter); VPT-deep's
  CLS attention is scored the same way, for comparison.
- AR finds the target when the mean coverage over transitions after training is at least 0.35;
  training sharpens it when that mean rises by at least 0.05 over the fresh model; iVPT beats
  VPT-deep when its mean test top-1 exceeds VPT-deep's by more than twice the standard error.
Writes benchmarks/results/mechanism.{json,csv} and example figures mechanism_*.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch

import ivpt
from ivpt.data.procedural import box_patches
from ivpt.data.suite import load_task
from ivpt.engine.config import load_config
from ivpt.engine.data import build_task_data
from ivpt.engine.study import tune
from ivpt.explain import denormalize, explain, plot_adapter, plot_image
from ivpt.tables import write_csv
from common import RESULTS, ROOT, STATE, header, write_json
TASK = "find-shape"
METHODS = ["vpt-deep", "ivpt"]
COVERAGE_BAR, SHARPEN_BAR = 0.35, 0.05  # the rule above


def pointing(model, images: torch.Tensor, targets: list[np.ndarray], batch: int = 250) -> dict[int, dict[str, float]]:
    """Per block: mean coverage of the target by AR's selected patches (where AR acts; elsewhere the top-K
    salient ones, K as AR's default ratio gives), and hit@1 of the most salient patch."""
    coverage, hits = {}, {}
    for start in range(0, len(images), batch):
        e = explain(model, images[start:start + batch])
        top_k = max(1, math.floor(0.25 * e.grid[0] * e.grid[1] + 0.5))  # AR's K at its default ratio
        for n, image in enumerate(e.images):
            target = set(targets[start + n].tolist())
            for block, saliency in image.saliency.items():
                order = np.argsort(-saliency.ravel(), kind="stable")
                chosen = set(image.selected.get(block, order[:top_k].tolist()))
                coverage.setdefault(block, []).append(len(chosen & target) / len(target))
                hits.setdefault(block, []).append(float(int(order[0]) in target))
    return {b: {"coverage": statistics.fmean(coverage[b]), "hit_at_1": statistics.fmean(hits[b])} for b in coverage}


def summarise(per_block: dict[int, dict[str, float]], blocks: list[int]) -> dict[str, float]:
    return {key: statistics.fmean(per_block[b][key] for b in blocks) for key in ("coverage", "hit_at_1")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "suite" / "benchmark.yaml"))
    parser.add_argument("--runs", default=str(STATE / "mechanism"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = dataclasses.replace(load_config(args.recipe), precision="fp32", data={"kind": "suite", "task": TASK})
    if args.quick:
        base = dataclasses.replace(base, epochs=1, warmup_epochs=0,
                                   protocol={**base.protocol, "seeds": base.protocol["seeds"][:1]})
    runs = Path(args.runs) / ("quick" if args.quick else "full")
    task = load_task(TASK)
    data = build_task_data(base.data, ivpt.create_model(base.backbone, "linear", 4).backbone.pretrained_cfg)
    test = data.splits["test"]
    images = test.images
    grid = (images.shape[-2] // 4, images.shape[-1] // 4)
    targets = [box_patches(b, grid) for b in task.boxes["test"]]
    chance = {"coverage": 0.25, "hit_at_1": statistics.fmean(len(t) for t in targets) / (grid[0] * grid[1])}
    report = {**header(), "task": TASK, "recipe": base.to_dict(), "chance": chance, "rule": {"coverage": COVERAGE_BAR,
              "sharpen": SHARPEN_BAR, "accuracy": "gap > 2 standard errors"}, "methods": {}}
    for method in METHODS:
        cfg = dataclasses.replace(base, method=method, output=str(runs / method)).validate()
        summary = tune(cfg, runs / method, pruner="none")  # the full grid, as when first measured
        seeds = base.protocol["seeds"]
        per_seed = []
        for seed in seeds:
            model = ivpt.load_adapter(runs / method / "final" / f"seed{seed}" / "adapter").eval()
            per_seed.append(pointing(model, images, targets))
        blocks = sorted(per_seed[0])
        after = {b: {k: statistics.fmean(s[b][k] for s in per_seed) for k in ("coverage", "hit_at_1")} for b in blocks}
        entry = {"test_top1": summary["test_top1"], "test_mean": summary["test_mean"], "test_std": summary["test_std"],
                 "chosen": summary["chosen"], "pointing_after": after}
        if method == "ivpt":
            torch.manual_seed(42)  # the seed-42 run's initialisation: gamma = 0, DA's gate at 0.5
            fresh = ivpt.create_model(base.backbone, "ivpt", len(task.classes), **base.method_options).eval()
            entry["pointing_before"] = pointing(fresh, images, targets)
            transitions = sorted(int(t) for t in fresh.method.reinforcement)
            entry["ar_transitions"] = transitions
            entry["before"] = summarise(entry["pointing_before"], transitions)
            entry["after"] = summarise(after, transitions)
        else:
            entry["after"] = summarise(after, blocks[:-1])  # the same blocks as iVPT's transitions
        report["methods"][method] = entry
        print(f"{method}: test top-1 {100 * entry['test_mean']:.2f} ± {100 * entry['test_std']:.2f}; "
              f"coverage after {entry['after']['coverage']:.3f} (chance 0.25)", flush=True)
    report["verdict"] = verdict(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    write_json(f"mechanism{suffix}.json", report)
    rows = [{"method": m, "when": when, "block": b, **v} for m, e in report["methods"].items()
            for when in ("before", "after") for b, v in e.get(f"pointing_{when}", {}).items()]
    write_csv(RESULTS / f"mechanism{suffix}.csv", rows)
    figures(runs, images, data.classes, suffix, task.boxes["test"], test.labels)
    print(json.dumps(report["verdict"], indent=2))


def verdict(report: dict) -> dict:
    iv, vd = report["methods"]["ivpt"], report["methods"]["vpt-deep"]
    gap = iv["test_mean"] - vd["test_mean"]
    error = math.sqrt(iv["test_std"] ** 2 / len(iv["test_top1"]) + vd["test_std"] ** 2 / len(vd["test_top1"]))
    return {"ar_finds_target": iv["after"]["coverage"] >= COVERAGE_BAR,
            "training_sharpens": iv["after"]["coverage"] - iv["before"]["coverage"] >= SHARPEN_BAR,
            "coverage_before": iv["before"]["coverage"], "coverage_after": iv["after"]["coverage"],
            "vpt_deep_coverage": vd["after"]["coverage"],
            "ivpt_minus_vpt_deep_points": 100 * gap, "two_standard_errors_points": 200 * error,
            "accuracy": "win" if gap > 2 * error else "loss" if gap < -2 * error else "tie"}


def figures(runs: Path, images: torch.Tensor, classes: list[str], suffix: str, boxes, labels) -> None:
    """Example explain figures of the first seed's adapters on a test image, for the docs."""
    for method in METHODS:
        model = ivpt.load_adapter(runs / method / "final" / "seed42" / "adapter").eval()
        e = explain(model, images[:2], class_names=classes)
        cfg = model.backbone.pretrained_cfg
        pixels = denormalize(images[:2], cfg["mean"], cfg["std"])
        plot_image(e, 0, pixels[0], RESULTS / f"mechanism_{method}_example{suffix}.png",
                   title=f"{method} on find-shape (test image 0, true class {classes[int(labels[0])]})",
                   evidence=tuple(boxes[0]))
        if method == "ivpt":
            plot_adapter(explain(model, images[:256], class_names=classes),
                         RESULTS / f"mechanism_ivpt_adapter{suffix}.png", title="iVPT on find-shape: learned quantities")


if __name__ == "__main__":
    main()
