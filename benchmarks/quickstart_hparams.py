"""How the main job's fixed learning rates were chosen: train -> val only, never test.

    python benchmarks/quickstart_hparams.py [--task dsprites-loc] [--lrs 0.01 0.003 0.001]

For each method of the quickstart, trains on the task's 800 train images with each lr (the
quickstart's epochs and optimizer) and scores the 200 val images. Writes
benchmarks/results/quickstart_hparams.json.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ivpt.engine.loop import train
from ivpt.quickstart import BASE, METHODS, TASK
from common import STATE, header, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default=TASK)
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.003, 0.001])
    parser.add_argument("--runs", default=str(STATE / "quickstart_hparams"))
    args = parser.parse_args()
    table = {}
    for method, (options, _) in METHODS.items():
        for lr in args.lrs:
            cfg = dataclasses.replace(BASE, method=method, method_options=options, lr=lr, train_split="train",
                                      eval_split="val", test_split=None, data={"kind": "suite", "task": args.task},
                                      output=str(Path(args.runs) / args.task / method / f"lr{lr:g}"))
            result = train(cfg, resume=True, quiet=True)
            table.setdefault(method, {})[lr] = result["val"]["top1"]
            print(f"{method:10s} lr {lr:<8g} val top-1 {100 * result['val']['top1']:.2f}", flush=True)
    best = {m: max(scores, key=lambda lr: (scores[lr], -lr)) for m, scores in table.items()}
    write_json("quickstart_hparams.json",
               {**header(), "task": args.task, "epochs": BASE.epochs, "val_top1": table, "chosen_lr": best})
    print("chosen (best val, ties to the smaller lr):", best)


if __name__ == "__main__":
    main()
