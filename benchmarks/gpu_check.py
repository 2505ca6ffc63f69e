"""One prepared command for a GPU: throughput and memory of every method, eager and compiled.

    pip install --no-deps -e .                     # on a machine that already has torch and timm
    python benchmarks/gpu_check.py                 # ViT-B/16 @224, batch 128; stops by itself within --budget
    python benchmarks/gpu_check.py --smoke         # the same code on CPU in seconds (tiny sizes; in the tests)

For every method in the registry: training and inference throughput (images/s) and peak memory
(torch.cuda.max_memory_allocated; n/a on CPU) at the automatic precision (ivpt.engine.hardware),
eager and torch.compile'd, on randomly initialised weights (no network needed); and iVPT's ratios to
VPT-deep. A method that fails (e.g. under compile) gets its error in its row instead of stopping the
check. The JSON and a Markdown table (device name, driver, torch version in the header) are written
after every row, so a check stopped at its time budget keeps what it measured. The input pipeline's
delivery rate is not measured: ivpt has no decoded-tensor cache yet.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ivpt
from ivpt.methods import prompt_options
from ivpt.engine.checkpoint import atomic_write
from ivpt.engine.hardware import resolve_precision
from ivpt.engine.loop import autocast_for
from ivpt.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FULL = {"backbone": "vit_base_patch16_224", "timm_kwargs": {}, "image_size": 224, "batch": 128, "steps": 10, "warmup": 3}
SMOKE = {"backbone": "vit_mini_patch4_32", "timm_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2},
         "image_size": 32, "batch": 4, "steps": 1, "warmup": 1}
PROMPT_LENGTH = 10


def device_facts(device: torch.device) -> dict:
    facts = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(name=props.name, memory_gib=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                     capability=f"{props.major}.{props.minor}")
        try:
            facts["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            facts["driver"] = "unknown"
    else:
        facts.update(name=platform.processor() or platform.machine(), driver="-", threads=torch.get_num_threads())
    return facts


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method: str, compiled: bool, setup: dict, device: torch.device, precision: str) -> dict:
    options = prompt_options(method, PROMPT_LENGTH)
    torch.manual_seed(0)
    model = ivpt.create_model(setup["backbone"], method, 100, timm_kwargs=setup["timm_kwargs"], **options).to(device)
    run = torch.compile(model, backend="inductor" if device.type == "cuda" else "eager") if compiled else model
    optimizer = torch.optim.SGD(model.tuned_parameters().values(), lr=0.01, momentum=0.9)
    size, batch = setup["image_size"], setup["batch"]
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)

    def train_step():
        with autocast_for(precision, device):
            loss = F.cross_entropy(run(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer_step():
        with torch.no_grad(), autocast_for(precision, device):
            run(images)

    row = {"method": method, "compiled": compiled, "tuned_parameters": ivpt.count_parameters(model)["tuned"]}
    for name, step in (("train", train_step), ("inference", infer_step)):
        model.train(name == "train")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(setup["warmup"]):  # compile, allocator and autotuning outside the timing
            step()
        synchronize(device)
        started = time.perf_counter()
        for _ in range(setup["steps"]):
            step()
        synchronize(device)
        seconds = time.perf_counter() - started
        row[f"{name}_img_per_s"] = round(batch * setup["steps"] / seconds, 1)
        row[f"{name}_peak_memory_gib"] = (round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
                                          if device.type == "cuda" else None)
    return row


def ratios(rows: list[dict]) -> dict:
    out = {}
    for compiled in (False, True):
        get = {r["method"]: r for r in rows if r["compiled"] == compiled and "error" not in r}
        if "ivpt" in get and "vpt-deep" in get:
            a, b = get["ivpt"], get["vpt-deep"]
            key = "compiled" if compiled else "eager"
            out[key] = {"train_throughput": round(a["train_img_per_s"] / b["train_img_per_s"], 3),
                        "inference_throughput": round(a["inference_img_per_s"] / b["inference_img_per_s"], 3)}
            if a["train_peak_memory_gib"]:
                out[key]["train_peak_memory"] = round(a["train_peak_memory_gib"] / b["train_peak_memory_gib"], 3)
    return out


def markdown(report: dict) -> str:
    f = report["device"]
    lines = [f"GPU check: {f['name']} (driver {f.get('driver', '-')}, CUDA {f.get('cuda', '-')}), torch {f['torch']}; "
             f"{report['setup']['backbone']} @{report['setup']['image_size']}, batch {report['setup']['batch']}, "
             f"precision {report['precision']['used']} ({report['precision']['reason']})", "",
             "| method | compiled | train img/s | inference img/s | train peak GiB | inference peak GiB | tuned params |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {'yes' if r['compiled'] else 'no'} | failed: {r['error'][:80]} | | | | |")
            continue
        lines.append(f"| {r['method']} | {'yes' if r['compiled'] else 'no'} | {r['train_img_per_s']} | "
                     f"{r['inference_img_per_s']} | {r['train_peak_memory_gib'] or 'n/a'} | "
                     f"{r['inference_peak_memory_gib'] or 'n/a'} | {r['tuned_parameters']:,} |")
    for key, r in report["ivpt_vs_vpt_deep"].items():
        lines.append(f"\niVPT / VPT-deep ({key}): " + ", ".join(f"{k} {v}" for k, v in r.items()))
    if report["stopped_early"]:
        lines.append(f"\nStopped at the time budget after {len(report['rows'])} rows.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the code in seconds")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; rows not started by then are skipped")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "gpu_check"), help="path stem for the .json and .md files")
    args = parser.parse_args(argv)
    setup = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    precision = resolve_precision("auto", device)
    stem = Path(args.out + ("_smoke" if args.smoke and args.out == str(RESULTS / "gpu_check") else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": device_facts(device), "setup": setup, "precision": precision.to_dict(), "rows": [],
              "ivpt_vs_vpt_deep": {}, "stopped_early": False}
    started = time.monotonic()
    plan = [(m, c) for c in ((False,) if args.no_compile else (False, True)) for m in args.methods]
    for method, compiled in plan:
        if report["rows"] and time.monotonic() - started > args.budget:  # the first row always runs
            report["stopped_early"] = True
            break
        try:
            row = measure(method, compiled, setup, device, precision.used)
        except Exception as err:  # a failing method is a result, not the end of the check
            row = {"method": method, "compiled": compiled, "error": f"{type(err).__name__}: {err}"}
        report["rows"].append(row)
        report["ivpt_vs_vpt_deep"] = ratios(report["rows"])
        report["seconds"] = round(time.monotonic() - started, 1)
        atomic_write(stem.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
        atomic_write(stem.with_suffix(".md"), lambda tmp: tmp.write_text(markdown(report)))
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    atomic_write(stem.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    atomic_write(stem.with_suffix(".md"), lambda tmp: tmp.write_text(markdown(report)))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
