"""Precision and threads on this machine: fp32 against bf16 step time, and two trainings sharing the cores.

    python benchmarks/precision_threads.py          # a few minutes on 2 cores; needs the machine to itself

1. Training-step time of VPT-deep in fp32 and under bf16 autocast, interleaved rounds in one process,
   on the default backbone (batch 32) and ViT-B/16 @224 (batch 8, random weights); with the CPU's
   bf16 flags and what precision: auto picks here.
2. Two trainings at once: the step time of each when both use every core (what happens without the
   division of cores) and when each gets cores / 2 (what ivpt now sets for processes sharing a
   machine), against one training alone on every core.
Writes benchmarks/results/precision_threads.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from common import header, write_json
SETUPS = {"default backbone": ("vit_mini_patch4_32.ivpt_cifar10", 32, 32),
          "ViT-B/16": ("vit_base_patch16_224", 224, 8)}


def step_times(backbone: str, size: int, batch: int, precision: str, steps: int) -> list[float]:
    import ivpt
    from ivpt.engine.loop import autocast_for

    torch.manual_seed(0)
    model = ivpt.create_model(backbone, "vpt-deep", 10, prompt_length=10).train()
    opt = torch.optim.SGD(model.tuned_parameters().values(), lr=0.01)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    times = []
    for i in range(steps + 1):
        started = time.perf_counter()
        with autocast_for(precision, torch.device("cpu")):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step allocates and warms up
            times.append(time.perf_counter() - started)
    return times


def child(args) -> None:
    """One training process for the concurrency measurement: prints its median step time."""
    torch.set_num_threads(args.threads)
    times = step_times(*SETUPS["default backbone"], "fp32", args.steps)
    print(json.dumps({"median_step_s": statistics.median(times), "threads": torch.get_num_threads()}))


def concurrent(threads: int, processes: int, steps: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    procs = [subprocess.Popen([sys.executable, __file__, "--child", "--threads", str(threads), "--steps", str(steps)],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(processes)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        return child(args)
    from ivpt.engine.hardware import _cpu_flags, machine_cores, resolve_precision

    cores = machine_cores()
    torch.set_num_threads(cores)
    auto = resolve_precision("auto", torch.device("cpu"))
    report = {**header(), "cores": cores, "cpu_bf16_flags": sorted(f for f in _cpu_flags() if "bf16" in f or f.startswith("amx")),
              "auto_picks": auto.to_dict(), "precision": {}, "concurrency": {}}
    for name, setup in SETUPS.items():
        per = {"fp32": [], "bf16": []}
        for _ in range(args.rounds):  # interleaved, so drifts of the machine hit both alike
            for precision in per:
                per[precision].append(statistics.median(step_times(*setup, precision, max(2, args.steps // 2))))
        fp32, bf16 = statistics.median(per["fp32"]), statistics.median(per["bf16"])
        report["precision"][name] = {"fp32_step_s": round(fp32, 4), "bf16_step_s": round(bf16, 4),
                                     "bf16_over_fp32": round(bf16 / fp32, 3), "batch": setup[2]}
        print(f"{name}: fp32 {fp32:.3f} s, bf16 {bf16:.3f} s per step (bf16 / fp32 {bf16 / fp32:.2f})", flush=True)
    alone = concurrent(cores, 1, args.steps)[0]["median_step_s"]
    both_full = [r["median_step_s"] for r in concurrent(cores, 2, args.steps)]
    both_shared = [r["median_step_s"] for r in concurrent(max(1, cores // 2), 2, args.steps)]
    report["concurrency"] = {
        "alone_all_cores_step_s": round(alone, 4),
        "two_each_all_cores_step_s": [round(t, 4) for t in both_full],
        "two_each_half_the_cores_step_s": [round(t, 4) for t in both_shared],
        "slowdown_oversubscribed": round(statistics.fmean(both_full) / alone, 2),
        "slowdown_divided": round(statistics.fmean(both_shared) / alone, 2),
    }
    print(json.dumps(report["concurrency"], indent=2))
    write_json("precision_threads.json", report)


if __name__ == "__main__":
    main()
