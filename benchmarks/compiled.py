"""Eager against torch.compile, and how far each method runs from the machine's matmul peak.

    python benchmarks/compiled.py            # default backbone (batch 64) and ViT-B/16 @224 (batch 8)
    python benchmarks/compiled.py --quick    # a tiny smoke run

For linear, VPT-deep and iVPT (the spec's method), eager and compiled (inductor), every training step
is timed in interleaved rounds in one process (A B C ... A B C), so slow phases hit all alike; ratios
are medians of per-round ratios. FLOPs of one training step (forward + backward) are counted with
torch.utils.flop_counter on the eager model; achieved GFLOP/s = FLOPs / median step time. The peak is
a large square GEMM (fp32, and bf16 where the CPU computes it natively) timed on the same threads.
Results: benchmarks/results/compiled.json, written after every setup.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import RESULTS, header, write_json
from cost import build, make_step, ratio, timed

import ivpt
from ivpt.engine.hardware import cpu_native_bf16

METHODS = ["linear", "vpt-deep", "ivpt"]


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the best of ``repeats`` n x n x n GEMMs."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def step_flops(model, images, labels) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.cross_entropy(model(images), labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(backbone: str, size: int, batch: int, rounds: int) -> dict:
    torch.manual_seed(0)
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 100, (batch,))
    entries, compile_seconds, flops = {}, {}, {}
    for m in METHODS:
        for compiled in (False, True):
            model = build(backbone, m, 10, size).train()
            if not compiled:
                flops[m] = step_flops(model, images, labels)
            run = torch.compile(model) if compiled else model
            step = make_step(model, m, images, labels, run=run)
            start = time.perf_counter()
            step()  # the first call compiles
            step()  # dynamo may recompile once for the optimizer's state
            if compiled:
                compile_seconds[m] = time.perf_counter() - start
            entries[(m, compiled)] = {"step": step, "train": []}
    for _ in range(rounds):
        for e in entries.values():
            e["train"].append(timed(e["step"]))
    named = {f"{m}{'-compiled' if c else ''}": e for (m, c), e in entries.items()}
    out = {"backbone": backbone, "image_size": size, "batch": batch, "rounds": rounds, "methods": {}}
    for m in METHODS:
        eager_s, compiled_s = (statistics.median(entries[(m, c)]["train"]) for c in (False, True))
        out["methods"][m] = {"train_step_s": eager_s, "compiled_train_step_s": compiled_s,
                             "compiled_vs_eager": ratio(named, f"{m}-compiled", m, "train"),
                             "compile_seconds": compile_seconds[m], "step_gflop": flops[m] / 1e9,
                             "gflops_eager": flops[m] / eager_s / 1e9, "gflops_compiled": flops[m] / compiled_s / 1e9}
    out["ivpt_vs_vpt_deep"] = {"eager": ratio(named, "ivpt", "vpt-deep", "train"),
                               "compiled": ratio(named, "ivpt-compiled", "vpt-deep-compiled", "train")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    setups = ([("vit_mini_patch4_32", 32, 8)] if args.quick else
              [(ivpt.DEFAULT_BACKBONE, 32, 64), ("vit_base_patch16_224", 224, 8)])
    rounds = 2 if args.quick else args.rounds
    peak = {"fp32": matmul_peak(torch.float32, 512 if args.quick else 2048)}
    if cpu_native_bf16():
        peak["bf16"] = matmul_peak(torch.bfloat16, 512 if args.quick else 2048)
    report = {**header(), "matmul_peak_gflops": peak, "setups": []}
    print(f"matmul peak (GFLOP/s): {json.dumps({k: round(v, 1) for k, v in peak.items()})}", flush=True)
    path = RESULTS / ("compiled_quick.json" if args.quick else "compiled.json")
    for backbone, size, batch in setups:
        print(f"== {backbone} @{size}, batch {batch}", flush=True)
        setup = measure(backbone, size, batch, rounds)
        for m, s in setup["methods"].items():
            s["share_of_fp32_peak_eager"] = s["gflops_eager"] / peak["fp32"]
            s["share_of_fp32_peak_compiled"] = s["gflops_compiled"] / peak["fp32"]
            print(m, json.dumps({k: round(v, 4) for k, v in s.items()}), flush=True)
        print("ivpt/vpt-deep", json.dumps(setup["ivpt_vs_vpt_deep"]), flush=True)
        report["setups"].append(setup)
        write_json(path, report)


if __name__ == "__main__":
    main()
