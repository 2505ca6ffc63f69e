"""The main job: linear probe, VPT-deep and iVPT side by side on one offline task, in minutes on a CPU.

Hyper-parameters are fixed here (no grid) so that the job stays short; they were chosen on the
task's val split, never on test (see docs/benchmarks.md). The full protocol is ``ivpt tune``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from .backbones import DEFAULT_BACKBONE
from .engine.checkpoint import atomic_write
from .engine.config import TrainConfig
from .engine.loop import train
from .tables import print_table, write_csv

TASK = "dsprites-loc"
EPOCHS = 10
BASE = TrainConfig(
    backbone=DEFAULT_BACKBONE,
    data={"kind": "suite", "task": TASK},
    train_split="trainval",   # VTAB-1k style: train on the 1,000 train+val images, report test
    eval_split="none",
    test_split="test",
    optimizer="adamw",
    lr_scaling=False,
    weight_decay=1e-4,
    epochs=EPOCHS,
    warmup_epochs=1,
    batch_size=64,
    precision="fp32",
    seed=42,
)
# method -> (options, learning rate); lrs chosen on val by benchmarks/quickstart_hparams.py
METHODS = {
    "linear": ({}, 1e-2),
    "vpt-deep": ({"prompt_length": 10}, 1e-2),
    "ivpt": ({"prompt_length": 10}, 1e-2),
}


def run_quickstart(task: str | None = None, output: str | Path = "runs/quickstart", epochs: int | None = None) -> list[dict]:
    out = Path(output)
    rows = []
    for method, (options, lr) in METHODS.items():
        cfg = dataclasses.replace(BASE, method=method, method_options=options, lr=lr,
                                  data={"kind": "suite", "task": task or TASK}, epochs=epochs or BASE.epochs,
                                  output=str(out / method))
        started = time.time()
        print(f"training {method} on {cfg.data['task']} ({cfg.epochs} epochs) ...", flush=True)
        results = train(cfg, resume=True, quiet=True, progress=True)
        params = results["parameters"]
        rows.append({"method": method, "test_top1": round(results["test"]["top1"], 4),  # a fraction, as every file has it
                     "tuned_params": params["tuned"], "prompt_side_params": params["tuned_without_head"],
                     "seconds": round(time.time() - started, 1), "adapter": results["adapter"]})
    header = ["method", "test_top1", "tuned_params", "prompt_side_params", "seconds"]
    print(f"\n{DEFAULT_BACKBONE} on offline-suite task {task or TASK} "
          f"(train+val 1,000 images, test 2,000)")
    print_table(rows, header)
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(rows, indent=2)))
    write_csv(out / "results.csv", rows)
    print(f"adapters and results in {out}/")
    return rows
