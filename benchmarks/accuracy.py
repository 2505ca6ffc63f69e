"""Does iVPT help? Accuracy of every method and ablation on the offline suite, default backbone.

    python benchmarks/accuracy.py                      # all methods, all 7 tasks, 3 seeds (1-2 h on 2 cores)
    python benchmarks/accuracy.py --shard 0/2 & python benchmarks/accuracy.py --shard 1/2   # one process per core
    python benchmarks/accuracy.py --quick              # 1 epoch, 1 seed, 2 tasks: checks the pipeline
    python benchmarks/accuracy.py --methods vpt-deep ivpt --tasks clevr-count dtd10
    python benchmarks/accuracy.py --recipe configs/suite/protocol.yaml --pruner sha --runs benchmarks/state/suite-protocol
                                                       # the longer recipe (20 epochs, 4 x 2 grid), successive halving

Protocol per (method, task), as VPT's: the lr x wd grid of the recipe (configs/suite/benchmark.yaml) is trained on train
and evaluated on val; the best val top-1 is kept (ties: smaller lr); then one run per seed trains on
train+val and is evaluated on test. The ablations (cdc-static, cdc-da, ar-only) reuse full iVPT's
choice on the same task instead of a grid of their own (--own-grid: their own). Never selected on test.

Run state (the Optuna studies, every run's checkpoints, adapter and logs) lives under --runs, by default
in benchmarks/state/ (git ignores it; resumable: finished runs are skipped). Each tuned (method, task) also
publishes its summary.json, with the seconds its runs trained, to the same place under --summaries (by
default benchmarks/results/<the --runs folder's name>/, committed): a pair whose summary is there is not
tuned again, so the tables rebuild from the results alone, on a machine without the run state. The tables
go to benchmarks/results/accuracy.{json,csv} and accuracy.png.
With --shard i/n, this process takes every n-th (method, task) pair and writes no tables; a final run
without --shard finds every run done and writes them. --progress trains nothing and writes the tables of
the methods finished on every task so far to benchmarks/results/accuracy_progress.{json,csv}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from common import RESULTS, ROOT, STATE, committed_summary, header, publish_summary, write_json
from common import training_seconds  # noqa: F401  (the seconds the tables report: published with each summary)
from tqdm import tqdm

from ivpt.cli import parse_shard
from ivpt.data.suite import SUITE_TASKS, summarize
from ivpt.engine.config import load_config
from ivpt.engine.hardware import configure_threads
from ivpt.engine.study import PRUNERS, tune
from ivpt.tables import write_csv

# name -> (method, options beyond the recipe's prompt length)
VARIANTS = {
    "linear": ("linear", None),
    "full": ("full", None),
    "vpt-shallow": ("vpt-shallow", {}),
    "vpt-deep": ("vpt-deep", {}),
    "gatevpt": ("gatevpt", {}),                                # GateVPT: one gate per block, shallow prompts
    "cdc-static": ("ivpt", {"da": "static", "ar": False}),     # a connection without selection
    "cdc-da": ("ivpt", {"da": "gate", "ar": False}),           # CDC + DA (the gate: selection)
    "ar-only": ("ivpt", {"cdc": False}),                       # AR alone on VPT-deep prompts
    "ivpt": ("ivpt", {}),                                      # CDC + DA + AR
    "ivpt-static": ("ivpt-static", {}),                        # the static connection + AR (the preset)
    "lora": ("lora", None),                                    # the module methods: their own defaults
    "adapter": ("adapter", None),
    "adaptformer": ("adaptformer", None),
    "ssf": ("ssf", None),
    "bitfit": ("bitfit", None),
}
ABLATIONS = ["vpt-deep", "cdc-static", "cdc-da", "ar-only", "ivpt"]
# Ablations train at the lr and wd chosen on val for full iVPT on the same task (no grid of their own:
# it halves their cost on 2 cores; --own-grid gives each its own). Run --methods ivpt before them.
REUSE_CHOICE = {"cdc-static": "ivpt", "cdc-da": "ivpt", "ar-only": "ivpt"}
# The recipe's lrs are the prompts' (and the linear probe's); the other families train at scaled lrs:
# full fine-tuning moves every weight (far smaller AdamW steps: 0.03 -> 3e-4), the module methods change
# the blocks' own activations (V-PETL trains them at 1e-3 on ViT-B, a tenth of the prompts' steps).
# BitFit's biases count as the blocks' own weights here.
LR_SCALE = {"full": 0.01, **dict.fromkeys(("lora", "adapter", "adaptformer", "ssf", "bitfit"), 0.1)}


def variant_config(base, name: str, task: str, runs: Path, quick: bool):
    method, extra = VARIANTS[name]
    options = {} if extra is None else {**base.method_options, **extra}
    changes = {"method": method, "method_options": options, "data": {**base.data, "task": task},
               "output": str(runs / name / task)}
    if method in LR_SCALE:
        changes["protocol"] = {**base.protocol, "lrs": [float(f"{lr * LR_SCALE[method]:.3g}") for lr in base.protocol["lrs"]]}
    if quick:
        lrs = changes.get("protocol", base.protocol)["lrs"][:2]
        changes.update(epochs=1, warmup_epochs=0,
                       protocol={"lrs": lrs, "wds": [0.0], "seeds": base.protocol["seeds"][:1]})
    return dataclasses.replace(base, **changes).validate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "suite" / "benchmark.yaml"))
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tasks", nargs="+", default=list(SUITE_TASKS), choices=list(SUITE_TASKS))
    parser.add_argument("--runs", default=str(STATE / "accuracy"), help="folder for every run (resumable; not committed)")
    parser.add_argument("--summaries", default=None,
                        help="folder of the per-(method, task) summaries (committed; default benchmarks/results/<--runs name>)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
    parser.add_argument("--quick", action="store_true", help="1 epoch, 1 seed, 2 lrs: a pipeline check")
    parser.add_argument("--own-grid", action="store_true", help="ablations choose their own lr on val")
    parser.add_argument("--pruner", default="none", choices=PRUNERS,
                        help="the grid stage's pruner (ivpt tune --pruner); sha trains the weaker grid points shorter")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), help="i/n: run every n-th (method, task) pair only, no tables")
    parser.add_argument("--progress", action="store_true",
                        help="train nothing: the tables of the methods finished on every task so far, to accuracy_progress.*")
    args = parser.parse_args()
    index, count = args.shard
    configure_threads(processes=count)  # shards on one machine share its cores (unless OMP_NUM_THREADS is set)
    base = load_config(args.recipe, args.set)
    variant = "quick" if args.quick else "full"
    runs = Path(args.runs) / variant
    summaries = Path(args.summaries or RESULTS / Path(args.runs).name) / variant
    if args.progress:
        write_progress(base, summaries, args.methods, args.tasks)
        return
    table = {}
    # methods whose val choice an ablation reuses come first, so one process never waits on itself
    order = sorted(args.methods, key=lambda m: m not in REUSE_CHOICE.values())
    pairs = [(m, t) for m in order for t in args.tasks]
    for name, task in tqdm(pairs[index::count], desc=f"method x task (shard {index}/{count})"):
        cfg = variant_config(base, name, task, runs, args.quick)
        summary = committed_summary(cfg, summaries / name / task / "summary.json")
        if summary is not None:
            check_choice_source(summary, name, task, args.own_grid)
        else:
            chosen = None if args.own_grid else reused_choice(summaries, name, task, wait=count > 1)
            summary = tune(cfg, runs / name / task, chosen=chosen, pruner=args.pruner)
            summary = publish_summary(cfg, runs / name / task, summary, summaries / name / task / "summary.json")
        table.setdefault(name, {})[task] = summary
    if count > 1:
        print("shard done; run once more without --shard to write the tables")
        return
    report, rows = build_report(base, table, args.methods, args.quick)
    suffix = "_quick" if args.quick else ""
    write_json(f"accuracy{suffix}.json", report)
    write_csv(RESULTS / f"accuracy{suffix}.csv", rows)
    print_tables(report, args.tasks)
    plot(report, args.tasks, RESULTS / f"accuracy{suffix}.png")


def write_progress(base, summaries: Path, methods: list[str], tasks: list[str]) -> None:
    """A rerun spread over sessions, read back mid-way: the methods finished on every task, and what is left."""
    done = {m: {t: json.loads(p.read_text()) for t in tasks if (p := summaries / m / t / "summary.json").is_file()}
            for m in methods}
    complete = {m: per_task for m, per_task in done.items() if len(per_task) == len(tasks)}
    report, rows = build_report(base, complete, methods, False)
    report["progress"] = {m: sorted(per_task) for m, per_task in done.items()}
    write_json("accuracy_progress.json", report)
    write_csv(RESULTS / "accuracy_progress.csv", rows)
    print_tables(report, tasks)
    left = {m: len(tasks) - len(per_task) for m, per_task in done.items() if len(per_task) < len(tasks)}
    print(f"finished on every task: {', '.join(complete) or 'none'}; tasks left: "
          + (", ".join(f"{m} {n}" for m, n in left.items()) or "none"))


def build_report(base, table: dict, methods: list[str], quick: bool) -> tuple[dict, list[dict]]:
    """The tables from the published summaries (``table[method][task]``), in the order of ``methods``."""
    report = {"recipe": base.to_dict(), "quick": quick, **header(), "methods": {}}
    rows = []
    for name, per_task in ((m, table[m]) for m in methods if m in table):  # the order asked for
        means = {t: s["test_mean"] for t, s in per_task.items()}
        report["methods"][name] = {
            "tasks": {t: {"test_mean": s["test_mean"], "test_std": s["test_std"], "seeds": s["test_top1"],
                          "chosen": s["chosen"]} for t, s in per_task.items()},
            **summarize(means),
            "tuned_parameters": next(iter(per_task.values()))["parameters"],
            "training_seconds": {t: s["training_seconds"] for t, s in per_task.items()},
        }
        for t, s in per_task.items():
            rows.append({"method": name, "task": t, "group": SUITE_TASKS[t][0], "test_mean": s["test_mean"],
                         "test_std": s["test_std"], "lr": s["chosen"]["lr"], "weight_decay": s["chosen"]["weight_decay"],
                         "val_top1": s["chosen"].get("val_top1"), "choice_from": s["chosen"].get("from", name)})
    return report, rows


def reused_choice(summaries: Path, name: str, task: str, wait: bool) -> dict | None:
    """The lr and wd chosen on val for the method this ablation reuses (its own val score is not known)."""
    source = REUSE_CHOICE.get(name)
    if source is None:
        return None
    path = summaries / source / task / "summary.json"
    while not path.is_file():
        if not wait:
            raise SystemExit(f"{name} on {task} reuses {source}'s choice on val, but {path} does not exist yet: "
                             f"run --methods {source} first (or pass --own-grid)")
        print(f"waiting for {path} (another shard runs {source} on {task}) ...", flush=True)
        time.sleep(30)
    chosen = json.loads(path.read_text())["chosen"]
    return {"lr": chosen["lr"], "weight_decay": chosen["weight_decay"], "from": source,
            "source_val_top1": chosen["val_top1"]}


def check_choice_source(summary: dict, name: str, task: str, own_grid: bool) -> None:
    """A committed ablation summary made the other way (its own grid, or another method's choice) is refused."""
    reused = summary["chosen"].get("from")
    if name in REUSE_CHOICE and bool(reused) == own_grid:
        made = f"at {reused}'s choice" if reused else "with its own grid"
        raise SystemExit(f"{name} on {task}: its committed summary was made {made}, not as asked "
                         f"({'--own-grid' if own_grid else 'without --own-grid'}); pass another --summaries folder")


def print_tables(report, tasks) -> None:
    header = ["method"] + tasks + ["natural", "specialized", "structured", "mean of groups", "plain mean", "tuned"]
    print(" | ".join(header))
    for name, r in report["methods"].items():
        cells = [name] + [f"{100 * r['tasks'][t]['test_mean']:.1f}±{100 * r['tasks'][t]['test_std']:.1f}"
                          if t in r["tasks"] else "-" for t in tasks]
        cells += [f"{100 * r['groups'][g]:.1f}" if g in r["groups"] else "-" for g in ("natural", "specialized", "structured")]
        cells += [f"{100 * r['mean_of_group_means']:.2f}", f"{100 * r['plain_mean']:.2f}", str(r["tuned_parameters"]["tuned"])]
        print(" | ".join(cells))


def plot(report, tasks, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'ivpt[bench]'): no plot written")
        return
    names = list(report["methods"])
    width = 0.8 / len(names)
    colours = plt.get_cmap("tab20").colors  # 20 distinct colours: the default cycle repeats after 10 methods
    fig, ax = plt.subplots(figsize=(max(8, (1.6 if len(names) <= 8 else 2.4) * len(tasks)), 5.5))
    for i, name in enumerate(names):
        r = report["methods"][name]["tasks"]
        xs = [j + i * width for j in range(len(tasks))]
        ax.bar(xs, [100 * r[t]["test_mean"] if t in r else 0 for t in tasks], width, color=colours[i % len(colours)],
               yerr=[100 * r[t]["test_std"] if t in r else 0 for t in tasks], label=name, capsize=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=20)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("offline suite, default backbone: mean and std over seeds")
    ax.legend(fontsize=8, ncol=min(len(names), 8), loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
