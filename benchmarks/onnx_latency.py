"""Inference latency and file size of the ONNX files `ivpt export --onnx` writes, against PyTorch.

    python benchmarks/onnx_latency.py            # default backbone and ViT-B/16 @224 (random weights)
    python benchmarks/onnx_latency.py --quick    # default backbone only, few rounds

For VPT-deep, iVPT (the gate DA with AR, today's default) and merged LoRA: onnxruntime (CPU execution
provider, the file as exported), eager PyTorch (the adapter's model; LoRA: the merged timm model, as
`--merged` gives it) and torch.compile (inductor) of the same, at batch 1 and 32, fp32. Every
configuration runs in this one process, interleaved round by round (A B C ... A B C), each round timing
a few calls after a warm-up, and each reported time is the median over rounds; ratios are medians of
the per-round ratios, so slow phases of a shared machine hit all engines alike. Results are written
to benchmarks/results/onnx.json after each backbone (a killed run keeps what it finished).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import header, write_json

import ivpt

METHODS = ("vpt-deep", "ivpt", "lora")
ENGINES = ("onnxruntime", "eager", "compiled")
BACKBONES = {"default": ("vit_mini_patch4_32.ivpt_cifar10", 32), "vit-b16": ("vit_base_patch16_224", 224)}


def build(backbone: str, method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ivpt.create_model(backbone, method, 100, pretrained=False).eval()
    with torch.no_grad():  # trained-looking tensors: LoRA's zero B would make its change vanish
        for p in model.tuned_parameters().values():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def engines_for(model, method: str, folder: Path, size: int) -> tuple[dict, dict]:
    """{engine: callable on a float32 batch}, and facts: file sizes and export / compile seconds."""
    path = folder / f"{method}.onnx"
    start = time.perf_counter()
    model.export_onnx(path)
    export_s = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same cores as PyTorch, no more
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    eager = model.merge() if method == "lora" else model  # what --merged and the ONNX file hold
    compiled = torch.compile(eager)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(torch.randn(1, 3, size, size))
        compiled(torch.randn(32, 3, size, size))  # both batch sizes compiled before timing
    compile_s = time.perf_counter() - start

    def run_torch(module):
        def call(x: np.ndarray):
            with torch.no_grad():
                return module(torch.from_numpy(x))
        return call

    calls = {"onnxruntime": lambda x: session.run(None, {"images": x}), "eager": run_torch(eager),
             "compiled": run_torch(compiled)}
    adapter = folder / f"{method}-adapter"
    model.save_adapter(adapter)
    facts = {"onnx_mib": path.stat().st_size / 2**20, "adapter_mib": (adapter / "adapter.safetensors").stat().st_size
             / 2**20, "export_seconds": export_s, "compile_seconds": compile_s}
    return calls, facts


def time_call(call, x: np.ndarray, repeats: int) -> float:
    call(x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, backbone: str, size: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        calls, facts = {}, {}
        for method in METHODS:
            model = build(backbone, method)
            calls[method], facts[method] = engines_for(model, method, Path(tmp), size)
            print(f"{name} {method}: exported ({facts[method]['onnx_mib']:.1f} MiB, "
                  f"{facts[method]['export_seconds']:.0f} s), compiled ({facts[method]['compile_seconds']:.0f} s)",
                  flush=True)
        inputs = {b: np.random.default_rng(b).standard_normal((b, 3, size, size)).astype(np.float32) for b in (1, 32)}
        rows = {(m, e, b): [] for m in METHODS for e in ENGINES for b in inputs}
        for r in range(rounds):
            for (m, e, b) in rows:  # interleaved: every configuration once per round
                rows[(m, e, b)].append(time_call(calls[m][e], inputs[b], repeats=5 if b == 1 else 2))
            print(f"{name}: round {r + 1}/{rounds} done", flush=True)
    out = {"backbone": backbone, "image_size": size, "methods": {}}
    for m in METHODS:
        entry = {**facts[m]}
        for b in inputs:
            for e in ENGINES:
                entry[f"{e}_ms_b{b}"] = 1000 * statistics.median(rows[(m, e, b)])
            for e in ("eager", "compiled"):  # per-round ratios, then their median
                entry[f"onnxruntime_vs_{e}_b{b}"] = statistics.median(
                    o / t for o, t in zip(rows[(m, "onnxruntime", b)], rows[(m, e, b)]))
        out["methods"][m] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="default backbone only, 2 rounds")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    report = {**header(libraries=("torch", "onnxruntime")),
              "command": "python benchmarks/onnx_latency.py" + (" --quick" if args.quick else ""), "backbones": {}}
    for name, (backbone, size) in BACKBONES.items():
        if args.quick and name != "default":
            continue
        report["backbones"][name] = measure(name, backbone, size, 2 if args.quick else args.rounds)
        write_json("onnx.json", report)
    for name, block in report["backbones"].items():
        print(f"\n{name} ({block['backbone']} @ {block['image_size']} px), ms per call (median of rounds)")
        print("method    batch  onnxruntime  eager  compiled  ort/eager  ort/compiled  onnx MiB")
        for m, e in block["methods"].items():
            for b in (1, 32):
                print(f"{m:9s} {b:5d}  {e[f'onnxruntime_ms_b{b}']:11.2f}  {e[f'eager_ms_b{b}']:5.2f}  "
                      f"{e[f'compiled_ms_b{b}']:8.2f}  {e[f'onnxruntime_vs_eager_b{b}']:9.2f}  "
                      f"{e[f'onnxruntime_vs_compiled_b{b}']:12.2f}  {e['onnx_mib']:8.1f}")


if __name__ == "__main__":
    main()
