"""What does each method cost? Train step, inference and memory, measured side by side.

    python benchmarks/cost.py                # ViT-B/16 @224 (random weights) and the default backbone
    python benchmarks/cost.py --quick        # a tiny smoke run
    python benchmarks/cost.py --baselines    # every method against VPT-deep on ViT-B/16, merged vs unmerged
    python benchmarks/cost.py --saved-memory # iVPT's saved activations against VPT-deep's, prompt length 1-200
    python benchmarks/cost.py --ivpt-vs-deep --rounds 20  # only VPT-deep and iVPT, both backbones, interleaved
    python benchmarks/cost.py --family --rounds 10        # E2VPT and VFPT against VPT-deep and iVPT on ViT-B/16

Timing: every configuration runs in the same process, interleaved round by round (A B C ... A B C),
and each ratio is the median over rounds of the per-round ratio, so slow phases of a shared machine
hit all methods alike. Memory: the bytes autograd saves for backward during one training forward
(exact and repeatable), plus, in a fresh subprocess per configuration, how far the peak resident
memory rises over two training steps above the level right after the model is built (what the OS
saw; Linux /proc, peak reset with clear_refs). On CUDA, torch.cuda.max_memory_allocated.

The floor is the frozen backbone's forward plus the backward to its input, with the same number of
tokens: what any prompt method must pay at least, since prompt gradients flow back to block 0.
Results: benchmarks/results/cost.json, cost.csv and cost_vs_prompt_length.png. Eager against
torch.compile, with achieved GFLOP/s against the machine's measured GEMM peak: benchmarks/compiled.py
(it reuses this script's model builder and training step).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, header, today, write_json

import ivpt
from ivpt.methods import prompt_options
from ivpt.tables import write_csv

METHODS = ["floor", "linear", "full", "vpt-shallow", "vpt-deep", "ivpt"]
# (backbone, image size, batch, prompt length) of the cost table's sections, and of --quick
SETUPS = [("vit_base_patch16_224", 224, 8, 10), (ivpt.DEFAULT_BACKBONE, 32, 128, 10)]
QUICK_SETUP = ("vit_mini_patch4_32", 32, 16, 10)


def build(backbone: str, method: str, prompt_length: int, img_size: int, num_classes: int = 100, **options):
    """``options``: the method's own options beside the prompt length (e.g. E2VPT's ``kv_length``)."""
    kwargs = {"timm_kwargs": {"img_size": img_size}}
    # the floor is run on a vpt-deep model with its tuned tensors detached (see floor_step)
    name = "vpt-deep" if method == "floor" else method
    return ivpt.create_model(backbone, name, num_classes, **prompt_options(name, prompt_length), **options, **kwargs)


def floor_forward(model, images):
    """The frozen blocks on the embedded tokens plus as many placeholder tokens as prompts."""
    vit = model.backbone
    x = model.embed(images)
    extra = torch.zeros(x.shape[0], model.method.num_prompts, x.shape[2], requires_grad=True)
    npt = vit.num_prefix_tokens
    return vit.norm(vit.blocks(torch.cat([x[:, :npt], extra, x[:, npt:]], dim=1)))


def floor_step(model, images):
    """Frozen forward plus backward to the block-0 input, same tokens as the prompt methods."""
    floor_forward(model, images)[:, 0].sum().backward()


def make_step(model, method, images, labels, run=None):
    """One SGD step over the tuned tensors; ``run``: what computes the logits (e.g. torch.compile(model))."""
    if method == "floor":
        return lambda: floor_step(model, images)
    params = list(model.tuned_parameters().values())
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    run = model if run is None else run

    def step():
        loss = torch.nn.functional.cross_entropy(run(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def saved_bytes(model, method, images, labels) -> int:
    """Bytes autograd keeps for backward in one training forward (activations; weights not counted, nor
    views of them such as prompts expanded over the batch)."""
    seen, total = {(p.untyped_storage().data_ptr(), p.dtype) for p in model.parameters()}, 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if method == "floor":
            floor_forward(model, images)
        else:
            torch.nn.functional.cross_entropy(model(images), labels)
    return total


def timed(fn, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def measure(backbone, methods, prompt_length, img_size, batch, rounds, num_classes=100, variants=None):
    """Build every configuration, then time them interleaved. ``methods``: the configurations' names, each a
    method with its defaults unless ``variants`` maps it to ``(method, options)`` (e.g. two E2VPT settings)."""
    torch.manual_seed(0)
    images = torch.randn(batch, 3, img_size, img_size)
    labels = torch.randint(0, num_classes, (batch,))
    variants = variants or {}
    entries = {}
    for m in methods:
        method, options = variants.get(m, (m, {}))
        model = build(backbone, method, prompt_length, img_size, num_classes, **options)
        model.train()
        entries[m] = {"model": model, "step": make_step(model, method, images, labels), "train": [], "infer": []}
        entries[m]["saved_bytes"] = saved_bytes(model, method, images, labels)
        entries[m]["step"]()  # warm-up
        with torch.no_grad():
            model.eval()(images)
        model.train()
    for _ in range(rounds):
        for m in methods:  # interleaved: every method sees the same machine state per round
            e = entries[m]
            e["train"].append(timed(e["step"]))
            with torch.no_grad():
                e["model"].eval()
                e["infer"].append(timed(lambda model=e["model"]: model(images)))
                e["model"].train()
    return entries


def ratio(entries, a, b, key):
    return statistics.median(x / y for x, y in zip(entries[a][key], entries[b][key]))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_probe(args) -> None:
    """Child process: how far resident memory rises above its level after building the model, over two
    training steps (gradients, optimizer state, activations). Linux: the peak (VmHWM) is reset after
    the model is built, since building a large model peaks higher than a step does."""
    backbone, method, p, size, batch = args
    torch.manual_seed(0)
    model = build(backbone, method, int(p), int(size))
    model.train()
    images, labels = torch.randn(int(batch), 3, int(size), int(size)), torch.randint(0, 100, (int(batch),))
    step = make_step(model, method, images, labels)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    step()
    step()
    print(json.dumps({"peak_rss_growth_bytes": (_status_kib("VmHWM") - before) * 1024}))


def in_child(flag: str, *values, what: str) -> dict | None:
    """Run this script with ``flag values`` in a fresh process and return the JSON it prints last, or
    None when that process fails (e.g. killed for memory): the gap is recorded, the rest is measured."""
    out = subprocess.run([sys.executable, __file__, flag, *map(str, values)], check=False, capture_output=True,
                         text=True)
    if out.returncode != 0:
        print(f"{what}: the measuring process failed (exit {out.returncode}): {out.stderr[-300:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_growth(backbone, method, p, size, batch) -> int | None:
    probe = in_child("--rss-probe", backbone, method, p, size, batch, what=f"peak-RSS probe {method} p={p} @{size}")
    return None if probe is None else probe["peak_rss_growth_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--resume", action="store_true",
                        help="keep the sections and points already in the results file, measure the rest")
    parser.add_argument("--baselines", action="store_true",
                        help="only the baselines section: every method against VPT-deep, and merged inference")
    parser.add_argument("--saved-memory", action="store_true",
                        help="only iVPT's saved activations against VPT-deep's over prompt lengths (no timing)")
    parser.add_argument("--ivpt-vs-deep", action="store_true",
                        help="only VPT-deep and iVPT (train step and inference), on the cost table's two setups")
    parser.add_argument("--family", action="store_true",
                        help="only the VPT family on ViT-B/16: VPT-deep, iVPT, VFPT, E2VPT and E2VPT pruned")
    parser.add_argument("--rss-probe", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--scaling-probe", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_probe:
        return rss_probe(args.rss_probe)
    if args.scaling_probe:
        backbone, p, size, batch, rounds, key, value = args.scaling_probe
        print(json.dumps(scaling_point(backbone, int(p), int(size), int(batch), int(rounds), key, int(value))))
        return None
    torch.set_num_threads(torch.get_num_threads())
    if args.baselines:
        return baselines(args.quick, args.rounds)
    if args.saved_memory:
        return saved_memory(args.quick)
    if args.ivpt_vs_deep:
        return ivpt_vs_deep(args.quick, args.rounds)
    if args.family:
        return family(args.quick, args.rounds)
    if args.quick:
        setups = [QUICK_SETUP]
        lengths, sizes, rounds = [1, 10], [32, 48], 2
    else:
        setups = SETUPS
        lengths, sizes, rounds = [1, 10, 50, 100, 200], [160, 224, 288], args.rounds
    report = {**header(libraries=("torch", "timm")), "setups": [], "prompt_length": [], "image_size": []}
    suffix = "_quick" if args.quick else ""
    rows = []
    if args.resume and (RESULTS / f"cost{suffix}.json").is_file():
        report = json.loads((RESULTS / f"cost{suffix}.json").read_text())
        rows = [{"backbone": s["backbone"], "method": m, **stats} for s in report["setups"]
                for m, stats in s["methods"].items()]
        done = {s["backbone"] for s in report["setups"]}
        setups_to_run = [s for s in setups if s[0] not in done]
    else:
        setups_to_run = setups

    def save() -> None:  # after every section: a late failure (e.g. out of memory) keeps what was measured
        write_json(f"cost{suffix}.json", report)
        write_csv(RESULTS / f"cost{suffix}.csv", rows)

    for backbone, size, batch, p in setups_to_run:
        print(f"== {backbone} @{size}, batch {batch}, prompt length {p}", flush=True)
        entries = measure(backbone, METHODS, p, size, batch, rounds)
        setup = {"backbone": backbone, "image_size": size, "batch": batch, "prompt_length": p, "methods": {}}
        for m in METHODS:
            e = entries[m]
            stats = {"train_step_s": statistics.median(e["train"]), "inference_s": statistics.median(e["infer"]),
                     "saved_activation_bytes": e["saved_bytes"],
                     "peak_rss_growth_bytes": rss_growth(backbone, m, p, size, batch),
                     "train_vs_floor": ratio(entries, m, "floor", "train"),
                     "tuned_parameters": ivpt.count_parameters(e["model"])["tuned"]}
            if m != "floor":
                stats["inference_vs_linear"] = ratio(entries, m, "linear", "infer")
            setup["methods"][m] = stats
            rows.append({"backbone": backbone, "method": m, **{k: v for k, v in stats.items()}})
        setup["ivpt_vs_vpt_deep"] = {
            "train_step": ratio(entries, "ivpt", "vpt-deep", "train"),
            "inference": ratio(entries, "ivpt", "vpt-deep", "infer"),
            "saved_activation_bytes": entries["ivpt"]["saved_bytes"] / entries["vpt-deep"]["saved_bytes"],
            "peak_rss_growth": rss_ratio(setup["methods"]["ivpt"], setup["methods"]["vpt-deep"]),
        }
        setup["vpt_deep_vs_floor_train"] = ratio(entries, "vpt-deep", "floor", "train")
        del entries, e  # free this setup's models before the next section builds its own
        report["setups"].append(setup)
        save()
        print(json.dumps(setup["ivpt_vs_vpt_deep"]), "vpt-deep/floor", round(setup["vpt_deep_vs_floor_train"], 3))
    backbone, size, batch, default_p = setups[0]
    for key, values in (("prompt_length", lengths), ("image_size", sizes)):
        for value in values:
            if any(point[key] == value for point in report[key]):
                continue  # measured by an earlier run (--resume)
            p, s = (value, size) if key == "prompt_length" else (default_p, value)
            # a fresh process per point: in one long-lived process, resident memory grew from point to point
            # until the system killed the run at prompt length 100 (24 GB; one point alone needs ~7 GB)
            point = in_child("--scaling-probe", backbone, p, s, batch, max(2, rounds - 2), key, value,
                             what=f"{key} {value}")
            if point is None:
                continue
            report[key].append(point)
            save()
            print(key, value, round(report[key][-1]["ivpt_vs_vpt_deep_train"], 3), flush=True)
    plot(report, RESULTS / f"cost_vs_prompt_length{suffix}.png")


BASELINES = ["floor", "linear", "vpt-deep", "gatevpt", "ivpt", "lora", "adapter", "adaptformer", "ssf", "bitfit"]
MERGEABLE = ["lora", "ssf", "bitfit"]


def baselines(quick: bool, rounds: int) -> None:
    """Every method against VPT-deep in one interleaved run, and merged against unmerged inference."""
    backbone, size, batch, p = ("vit_mini_patch4_32", 32, 16, 10) if quick else ("vit_base_patch16_224", 224, 8, 10)
    rounds = 2 if quick else rounds
    print(f"== baselines: {backbone} @{size}, batch {batch}, prompt length {p}, {rounds} rounds", flush=True)
    entries = measure(backbone, BASELINES, p, size, batch, rounds)
    images = torch.randn(batch, 3, size, size)
    merged = {m: entries[m]["model"].merge() for m in MERGEABLE}
    times = {m: {"unmerged": [], "merged": []} for m in MERGEABLE}
    with torch.no_grad():
        for m in MERGEABLE:
            entries[m]["model"].eval()
            merged[m](images)  # warm-up
        for _ in range(rounds):
            for m in MERGEABLE:
                times[m]["unmerged"].append(timed(lambda model=entries[m]["model"]: model(images)))
                times[m]["merged"].append(timed(lambda model=merged[m]: model(images)))
    report = {**header(), "backbone": backbone, "image_size": size, "batch": batch, "prompt_length": p, "rounds": rounds,
              "methods": {}}
    for m in BASELINES[1:]:
        e = entries[m]
        report["methods"][m] = {
            "tuned_without_head": ivpt.count_parameters(e["model"])["tuned_without_head"],
            "train_step_s": statistics.median(e["train"]), "inference_s": statistics.median(e["infer"]),
            "train_vs_vpt_deep": ratio(entries, m, "vpt-deep", "train"),
            "inference_vs_vpt_deep": ratio(entries, m, "vpt-deep", "infer"),
            "saved_activation_bytes": e["saved_bytes"],
            "saved_vs_vpt_deep": e["saved_bytes"] / entries["vpt-deep"]["saved_bytes"]}
        if m in MERGEABLE:
            report["methods"][m]["merged_vs_unmerged_inference"] = statistics.median(
                a / b for a, b in zip(times[m]["merged"], times[m]["unmerged"]))
        print(m, json.dumps({k: round(v, 4) for k, v in report["methods"][m].items()}), flush=True)
    write_json("cost_baselines_quick.json" if quick else "cost_baselines.json", report)


def ivpt_vs_deep(quick: bool, rounds: int) -> None:
    """iVPT (``method="ivpt"``: the gate) against VPT-deep alone, on ViT-B/16 and the default backbone: the two
    models interleaved round by round in one process, each ratio the median of the per-round ratios."""
    setups, rounds = ([QUICK_SETUP], 2) if quick else (SETUPS, rounds)
    report = {**header(libraries=("torch", "timm")), "rounds": rounds, "setups": []}
    for backbone, size, batch, p in setups:
        print(f"== {backbone} @{size}, batch {batch}, prompt length {p}, {rounds} rounds", flush=True)
        entries = measure(backbone, ["vpt-deep", "ivpt"], p, size, batch, rounds)
        setup = {"backbone": backbone, "image_size": size, "batch": batch, "prompt_length": p,
                 "methods": {m: {"train_step_s": statistics.median(e["train"]),
                                 "inference_s": statistics.median(e["infer"]),
                                 "saved_activation_bytes": e["saved_bytes"]} for m, e in entries.items()},
                 "ivpt_vs_vpt_deep": {"train_step": ratio(entries, "ivpt", "vpt-deep", "train"),
                                      "inference": ratio(entries, "ivpt", "vpt-deep", "infer")}}
        del entries  # free this setup's models before the next one builds its own
        report["setups"].append(setup)
        print(json.dumps(setup["ivpt_vs_vpt_deep"]), flush=True)
    write_json("cost_ivpt_vs_deep_quick.json" if quick else "cost_ivpt_vs_deep.json", report)


# the VPT family at prompt length 10 on ViT-B/16 (issue 34): name -> (method, options beside the prompt length)
FAMILY = {
    "vpt-deep": ("vpt-deep", {}),
    "ivpt": ("ivpt", {}),
    "vfpt": ("vfpt", {}),  # fourier_share 0.5: 5 of the 10 prompts per block through the 2-D FFT
    "e2vpt": ("e2vpt", {"kv_length": 5}),  # the official VTAB setting: 10 input prompts, 5 key-value prompts
    # as a rewound model: half the tokens and half the pieces of every token pruned. The pruned values stay in
    # the sequence as zeros (as in the official code), so this saves parameters, not compute
    "e2vpt-pruned": ("e2vpt", {"kv_length": 5, "pruned_tokens": list(range(5)),
                               "pruned_pieces": [list(range(8))] * 10}),
}


def family(quick: bool, rounds: int) -> None:
    """E2VPT and VFPT against VPT-deep and iVPT on ViT-B/16, interleaved round by round in one process: train step
    and inference (medians of per-round ratios to VPT-deep), bytes saved for backward, and tuned parameters."""
    (backbone, size, batch, p), rounds = (QUICK_SETUP, 2) if quick else (SETUPS[0], rounds)
    print(f"== family: {backbone} @{size}, batch {batch}, prompt length {p}, {rounds} rounds", flush=True)
    entries = measure(backbone, list(FAMILY), p, size, batch, rounds, variants=FAMILY)
    report = {**header(libraries=("torch", "timm")), "command": "python benchmarks/cost.py " + " ".join(sys.argv[1:]),
              "backbone": backbone, "image_size": size, "batch": batch, "prompt_length": p, "rounds": rounds,
              "configurations": {}}
    for name, (method, options) in FAMILY.items():
        e, counts = entries[name], ivpt.count_parameters(entries[name]["model"])
        groups = entries[name]["model"].method.parameter_groups()
        report["configurations"][name] = {
            "method": method, "options": options,
            "tuned_without_head": counts["tuned_without_head"], "parameter_groups": {g: counts[g] for g in groups},
            "train_step_s": statistics.median(e["train"]), "inference_s": statistics.median(e["infer"]),
            "train_vs_vpt_deep": ratio(entries, name, "vpt-deep", "train"),
            "inference_vs_vpt_deep": ratio(entries, name, "vpt-deep", "infer"),
            "saved_activation_bytes": e["saved_bytes"],
            "saved_vs_vpt_deep": e["saved_bytes"] / entries["vpt-deep"]["saved_bytes"]}
        shown = {k: v for k, v in report["configurations"][name].items() if k not in ("method", "options")}
        print(name, json.dumps(shown, default=float), flush=True)
    write_json("cost_family_quick.json" if quick else "cost_family.json", report)


def saved_memory(quick: bool) -> None:
    """Bytes kept for backward by one training forward: iVPT (gate and channel DA) against VPT-deep."""
    backbone, size, batch = ("vit_mini_patch4_32", 32, 4) if quick else ("vit_base_patch16_224", 224, 8)
    lengths = [1, 10] if quick else [1, 10, 50, 100, 200]
    torch.manual_seed(0)
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 100, (batch,))
    report = {"date": today(), "backbone": backbone, "image_size": size,
              "batch": batch, "points": []}
    variants = {"vpt-deep": ("vpt-deep", {}), "ivpt": ("ivpt", {}), "ivpt-channel": ("ivpt", {"da": "channel"})}
    for p in lengths:
        point = {"prompt_length": p}
        for name, (method, options) in variants.items():
            model = ivpt.create_model(backbone, method, 100, prompt_length=p, timm_kwargs={"img_size": size},
                                      **options).train()
            point[name] = saved_bytes(model, method, images, labels)
            del model
        for name in ("ivpt", "ivpt-channel"):
            point[f"{name}_vs_vpt_deep"] = point[name] / point["vpt-deep"]
        report["points"].append(point)
        print(json.dumps(point), flush=True)
    write_json("saved_memory_quick.json" if quick else "saved_memory.json", report)


def rss_ratio(a: dict, b: dict) -> float | None:
    # None when the step fits in memory the process already held (tiny models): no growth to compare
    if not a["peak_rss_growth_bytes"] or not b["peak_rss_growth_bytes"]:
        return None
    return a["peak_rss_growth_bytes"] / b["peak_rss_growth_bytes"]


def scaling_point(backbone, p, size, batch, rounds, key, value) -> dict:
    """floor, VPT-deep and iVPT at one prompt length and image size: times, saved bytes, peak RSS growth."""
    entries = measure(backbone, ["floor", "vpt-deep", "ivpt"], p, size, batch, rounds)
    point = {key: value}
    for m, e in entries.items():
        point[m] = {"train_step_s": statistics.median(e["train"]), "saved_activation_bytes": e["saved_bytes"],
                    "peak_rss_growth_bytes": rss_growth(backbone, m, p, size, batch)}
    point["ivpt_vs_vpt_deep_train"] = ratio(entries, "ivpt", "vpt-deep", "train")
    point["vpt_deep_vs_floor_train"] = ratio(entries, "vpt-deep", "floor", "train")
    point["ivpt_vs_vpt_deep_saved_bytes"] = entries["ivpt"]["saved_bytes"] / entries["vpt-deep"]["saved_bytes"]
    point["ivpt_vs_vpt_deep_peak_rss_growth"] = rss_ratio(point["ivpt"], point["vpt-deep"])
    return point


def plot(report, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'ivpt[bench]'): no plot written")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    lengths = [r["prompt_length"] for r in report["prompt_length"]]
    sizes = [r["image_size"] for r in report["image_size"]]
    for m in ("floor", "vpt-deep", "ivpt"):
        axes[0].plot(lengths, [r[m]["train_step_s"] for r in report["prompt_length"]], marker="o", label=m)
        axes[1].plot(lengths, [r[m]["saved_activation_bytes"] / 2 ** 20 for r in report["prompt_length"]],
                     marker="o", label=m)
        axes[2].plot(sizes, [r[m]["train_step_s"] for r in report["image_size"]], marker="o", label=m)
    axes[0].set(xlabel="prompt length", ylabel="train step (s)", title="train step time")
    axes[1].set(xlabel="prompt length", ylabel="MiB saved for backward", title="activation memory")
    axes[2].set(xlabel="image size (px)", ylabel="train step (s)", title="train step time, prompt length "
                f"{report['setups'][0]['prompt_length']}")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['setups'][0]['backbone']} @{report['setups'][0]['image_size']}, "
                 f"batch {report['setups'][0]['batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
