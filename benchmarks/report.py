"""Render the benchmark results (benchmarks/results/*.json) as the markdown tables of docs/benchmarks.md.

    python benchmarks/report.py            # rewrites every <!-- table:NAME --> ... <!-- /table:NAME --> block
    python benchmarks/report.py --print    # prints the tables instead

The tables are generated, never typed by hand, so the document cannot drift from the JSON files.
A block whose results file does not exist yet is left as it is.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
GROUPS = ("natural", "specialized", "structured")
SWITCHES = {  # ablation name -> (CDC, DA, AR) as the spec's switches
    "vpt-deep": ("-", "-", "-"), "cdc-static": ("yes", "static", "-"), "cdc-da": ("yes", "gate", "-"),
    "ar-only": ("-", "-", "yes"), "ivpt-static": ("yes", "static", "yes"), "ivpt": ("yes", "gate", "yes"),
}
# the run of 2026-11-24 (5 epochs), when method="ivpt" meant the static connection
SWITCHES_5EPOCH = {**{k: v for k, v in SWITCHES.items() if k not in ("ivpt", "ivpt-static")},
                   "ivpt": ("yes", "static (then the default)", "yes")}


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def verdict(a: dict, b: dict) -> str:
    """a against b from per-seed test scores: a tie unless the gap exceeds twice its standard error."""
    gap = a["test_mean"] - b["test_mean"]
    n_a, n_b = len(a["seeds"]), len(b["seeds"])
    error = math.sqrt(a["test_std"] ** 2 / n_a + b["test_std"] ** 2 / n_b)
    if abs(gap) <= 2 * error:
        return f"tie ({100 * gap:+.1f})"
    return f"{'win' if gap > 0 else 'loss'} ({100 * gap:+.1f})"


def accuracy_tables(report: dict) -> str:
    methods = report["methods"]
    tasks = list(next(iter(methods.values()))["tasks"])
    rows = []
    for name, r in methods.items():
        cells = [name] + [f"{pct(r['tasks'][t]['test_mean'])} ± {pct(r['tasks'][t]['test_std'])}" for t in tasks]
        cells += [pct(r["groups"].get(g)) for g in GROUPS]
        cells += [f"**{pct(r['mean_of_group_means'], 2)}**", pct(r["plain_mean"], 2),
                  f"{r['tuned_parameters']['tuned_without_head']:,}"]
        rows.append(cells)
    out = [table(["method"] + tasks + list(GROUPS) + ["mean of groups", "plain mean", "tuned without head"], rows)]
    def lr(c: dict) -> str:
        return f"{c['lr']:g}" + (f" ({c['from']}'s)" if c.get("from") else "")

    chosen = [[name] + [lr(r["tasks"][t]["chosen"]) for t in tasks] for name, r in methods.items()]
    out += ["", "Learning rate chosen on val per task (an ablation reuses the named method's choice):", "",
            table(["method"] + tasks, chosen)]
    if "ivpt" in methods and "vpt-deep" in methods:
        rows = []
        for name in [m for m in methods if m not in ("vpt-deep",)]:
            rows.append([name] + [verdict(methods[name]["tasks"][t], methods["vpt-deep"]["tasks"][t]) for t in tasks])
        seeds = len(methods["vpt-deep"]["tasks"][tasks[0]]["seeds"])
        note = ("Each method against VPT-deep per task (test top-1 points; a tie unless the gap exceeds "
                f"twice its standard error over the {seeds} seeds):")
        out += ["", note, "", table(["method"] + tasks, rows)]
        others = [m for m in methods if m not in ("ivpt", "vpt-deep")]
        if others:
            rows = [[name] + [verdict(methods["ivpt"]["tasks"][t], methods[name]["tasks"][t]) for t in tasks]
                    for name in others]
            out += ["", "iVPT against each other method per task (iVPT's test top-1 minus the method's, the same rule):",
                    "", table(["iVPT against"] + tasks, rows)]
    hours = {name: sum(r["training_seconds"].values()) / 3600 for name, r in methods.items() if "training_seconds" in r}
    if hours:
        out += ["", f"Training time the runs logged (grid and seed runs, one thread each): {sum(hours.values()):.1f} "
                "core-hours in all; " + ", ".join(f"{name} {h:.2f}" for name, h in hours.items()) + "."]
    return "\n".join(out)


def accuracy_progress_tables(report: dict) -> str:
    """A rerun read back mid-way (benchmarks/accuracy.py --progress): the methods finished on every task."""
    done = ", ".join(f"{m} {len(t)}" for m, t in report["progress"].items())
    head = f"{report['date']}; tasks finished per method: {done}.\n\n"
    if not report["methods"]:
        return head + "No method is finished on every task yet."
    return head + accuracy_tables(report)


def ablation_table(report: dict, switches: dict = SWITCHES) -> str:
    methods = report["methods"]
    base = methods.get("vpt-deep")
    rows = []
    for name, (cdc, da, ar) in switches.items():
        if name not in methods:
            continue
        r = methods[name]
        delta = "-" if base is None or name == "vpt-deep" else \
            f"{100 * (r['mean_of_group_means'] - base['mean_of_group_means']):+.2f}"
        rows.append([name, cdc, da, ar, pct(r["mean_of_group_means"], 2), pct(r["plain_mean"], 2), delta,
                     f"{r['tuned_parameters']['tuned_without_head']:,}"])
    return table(["variant", "CDC", "DA", "AR", "mean of groups", "plain mean", "vs VPT-deep", "tuned without head"],
                 rows)


def defaults_table(report: dict) -> str:
    tasks = report["tasks"]
    rows = [[r["setting"]] + [pct(r[t]) for t in tasks] + [pct(r["mean_val_top1"], 2)] for r in report["rows"]]
    out = [table(["setting"] + tasks + ["mean val top-1"], rows), ""]
    for key, v in report["verdicts"].items():
        out.append(f"- `{key}`: best on val `{v['best']}` ({v['gain_points']:+.2f} points over the spec default "
                   f"`{v['default']}`): {'**changed** in the code' if v['change'] else 'default kept'}.")
    return "\n".join(out)


def segmentation_table(report: dict) -> str:
    rows = []
    for name, s in report["methods"].items():
        ms = f"{pct(s['test_ms_mean'], 2)} ± {pct(s['test_ms_std'], 2)}" if "test_ms_mean" in s else "-"
        rows.append([name, f"**{pct(s['test_mean'], 2)}** ± {pct(s['test_std'], 2)}",
                     ", ".join(pct(x, 2) for x in s["test_top1"]), ms, f"{s['chosen']['lr']:g}",
                     pct(s["chosen"]["val_top1"], 2), f"{s['parameters']['decoder']:,}",
                     f"{s['parameters']['prompt_side']:,}"])
    return table(["method", "test mIoU-SS (mean ± std)", "SS per seed", "test mIoU-MS (mean ± std)", "lr (val)",
                  "val mIoU-SS", "decoder params", "prompt-side params"], rows)


def cost_tables(report: dict) -> str:
    out = []
    for setup in report["setups"]:
        title = f"**{setup['backbone']} @{setup['image_size']}, batch {setup['batch']}, prompt length {setup['prompt_length']}**"
        out += [title, ""]
        rows = []
        for m, s in setup["methods"].items():
            rows.append([m, f"{s['train_step_s']:.3f}", f"{s['train_vs_floor']:.3f}", f"{s['inference_s']:.3f}",
                         f"{s.get('inference_vs_linear', 1.0):.3f}" if m != "floor" else "-",
                         f"{s['saved_activation_bytes'] / 2 ** 20:.1f}", "n/a" if s["peak_rss_growth_bytes"] is None else f"{s['peak_rss_growth_bytes'] / 2 ** 20:.0f}",
                         "-" if m == "floor" else f"{s['tuned_parameters']:,}"])
        out += [table(["method", "train step (s)", "/ floor", "inference (s)", "/ linear", "saved for backward (MiB)",
                       "peak RSS growth (MiB)", "tuned params"], rows), ""]
        r = setup["ivpt_vs_vpt_deep"]
        rss = "n/a" if r["peak_rss_growth"] is None else f"{r['peak_rss_growth']:.3f}"
        summary = (f"iVPT / VPT-deep: train step **{r['train_step']:.3f}**, inference **{r['inference']:.3f}**, "
                   f"saved activations **{r['saved_activation_bytes']:.3f}**, peak RSS growth **{rss}**; "
                   f"VPT-deep / floor train step **{setup['vpt_deep_vs_floor_train']:.3f}**.")
        out += [summary, ""]
    for key, label in (("prompt_length", "prompt length"), ("image_size", "image size")):
        if not report.get(key):
            continue
        rows = []
        for p in report[key]:
            rows.append([str(p[key])] + [f"{p[m]['train_step_s']:.3f}" for m in ("floor", "vpt-deep", "ivpt")] +
                        [f"{p['ivpt_vs_vpt_deep_train']:.3f}", f"{p['vpt_deep_vs_floor_train']:.3f}",
                         f"{p['ivpt_vs_vpt_deep_saved_bytes']:.3f}",
                         "n/a" if p["ivpt_vs_vpt_deep_peak_rss_growth"] is None
                         else f"{p['ivpt_vs_vpt_deep_peak_rss_growth']:.3f}"])
        out += [f"Against {label} ({report['setups'][0]['backbone']}):", "",
                table([label, "floor step (s)", "VPT-deep step (s)", "iVPT step (s)", "iVPT / VPT-deep step",
                       "VPT-deep / floor step", "iVPT / VPT-deep saved", "iVPT / VPT-deep peak RSS"], rows), ""]
    return "\n".join(out).rstrip()


def testbed_table(report: dict) -> str:
    tasks = ["dsprites-loc", "dsprites-ori", "clevr-count", "clevr-dist", "dtd10"]
    rows = []
    for name, c in report["candidates"].items():
        for method, scores in c["val_top1"].items():
            rows.append([name, method] + [pct(scores.get(t)) for t in tasks] +
                        [pct(sum(scores[t] for t in tasks[:4]) / 4), pct(sum(scores[t] for t in tasks) / 5)])
    out = [table(["candidate", "method"] + tasks + ["structured mean", "mean"], rows), ""]
    rule = report["rule"]
    verdicts = []
    for name, c in report["candidates"].items():
        v = c["verdict"]
        verdicts.append([name, f"{c['pretrain_seconds'] / 3600:.2f}", pct(c["cifar10_test_top1"], 2),
                         f"{v['vpt_over_linear_structured']:+.2f}", f"{v['full_over_vpt_mean']:+.2f}",
                         f"{v['ivpt_over_vpt_mean']:+.2f}", "**passes**" if v["passes"] else "fails"])
    out += [f"The rule per candidate (VPT-deep - linear on the structured mean >= {rule['min_vpt_over_linear_structured']:g};"
            f" full - VPT-deep on the mean <= {rule['max_full_over_vpt_mean']:g}; val top-1 points):", "",
            table(["candidate", "pretraining (h)", "CIFAR-10 test top-1", "VPT-deep - linear (structured)",
                   "full - VPT-deep (mean)", "iVPT - VPT-deep (mean)", "verdict"], verdicts), ""]
    chosen = report.get("chosen")
    out.append(f"Chosen: **{chosen}**." if chosen else "Chosen: none of the candidates measured passes the rule: the testbed stays.")
    return "\n".join(out)


def mechanism_table(report: dict) -> str:
    methods, chance = report["methods"], report["chance"]
    rows = []
    for name, e in methods.items():
        for when in ("before", "after"):
            if when not in e:
                continue
            rows.append([name, "freshly initialised" if when == "before" else "trained (mean of seeds)",
                         f"{e[when]['coverage']:.3f}", f"{e[when]['hit_at_1']:.3f}",
                         f"{pct(e['test_mean'], 2)} ± {pct(e['test_std'], 2)}" if when == "after" else "-"])
    out = [table(["method", "model", "coverage (chance 0.250)", f"hit@1 (chance {chance['hit_at_1']:.3f})",
                  "test top-1 (3 seeds)"], rows), ""]
    iv = methods["ivpt"]
    per = [[str(t), f"{iv['pointing_before'][str(t)]['coverage']:.3f}", f"{iv['pointing_after'][str(t)]['coverage']:.3f}"]
           for t in iv["ar_transitions"]]  # JSON keys are strings
    out += ["iVPT's coverage per transition:", "", table(["transition", "fresh", "trained"], per), ""]
    v = report["verdict"]
    out.append(f"- AR finds the target (mean coverage >= {report['rule']['coverage']}): "
               f"**{'yes' if v['ar_finds_target'] else 'no'}** ({v['coverage_after']:.3f}).")
    out.append(f"- Training sharpens it (+{report['rule']['sharpen']} over the fresh model): "
               f"**{'yes' if v['training_sharpens'] else 'no'}** ({v['coverage_after'] - v['coverage_before']:+.3f}).")
    out.append(f"- iVPT against VPT-deep, test top-1: **{v['accuracy']}** ({v['ivpt_minus_vpt_deep_points']:+.2f} points; "
               f"twice the standard error {v['two_standard_errors_points']:.2f}).")
    return "\n".join(out)


def precision_threads_table(report: dict) -> str:
    flags = ", ".join(report["cpu_bf16_flags"]) or "none"
    rows = [[name, str(r["batch"]), f"{r['fp32_step_s']:.3f}", f"{r['bf16_step_s']:.3f}", f"{r['bf16_over_fp32']:.2f}"]
            for name, r in report["precision"].items()]
    c = report["concurrency"]
    out = [f"CPU bf16 flags: {flags}; `precision: auto` picks **{report['auto_picks']['used']}** here "
           f"({report['auto_picks']['reason']}).", "",
           table(["VPT-deep training step", "batch", "fp32 (s)", "bf16 autocast (s)", "bf16 / fp32"], rows), "",
           table(["two trainings at once", "step time of each (s)", "against one alone"],
                 [[f"each on all {report['cores']} cores (no division)",
                   ", ".join(f"{t:.3f}" for t in c["two_each_all_cores_step_s"]), f"{c['slowdown_oversubscribed']:.2f}x"],
                  [f"each on {max(1, report['cores'] // 2)} (ivpt's division)",
                   ", ".join(f"{t:.3f}" for t in c["two_each_half_the_cores_step_s"]), f"{c['slowdown_divided']:.2f}x"],
                  [f"one alone on all {report['cores']} cores", f"{c['alone_all_cores_step_s']:.3f}", "1.00x"]])]
    return "\n".join(out)


def why_tie_tables(report: dict) -> str:
    def num(x, digits=3):
        return "-" if x is None else f"{x:.{digits}f}"

    rows = []
    for a in report["adapters"]:
        lr = Path(a["adapter"]).parent.name.removeprefix("lr")
        s = a["summary"]
        rows.append([a["task"], lr, pct(a.get("val_top1")), num(s["mean_abs_da_shift"]), num(s["mean_da_token_std"]),
                     num(s["mean_abs_gamma"]), num(s["mean_ratio"]), num(s["max_ratio"])])
    out = ["Trained iVPT adapters (5 epochs on train; DA's weights over the val images' prompt tokens; means over "
           "transitions):", "",
           table(["task", "lr", "val top-1", "mean abs(alpha - 0.5)", "alpha's spread over tokens (std)", "mean abs(gamma)",
                  "AR change / patch norm", "largest AR change"], rows), ""]
    rows = []
    for task, runs in report["schedule"].items():
        for epochs, r in sorted(runs.items(), key=lambda kv: int(kv[0])):
            last = r["log"][-1]

            def mean_of(key):
                values = [abs(v) for k, v in last.items() if k.startswith(key + "_")]
                return sum(values) / len(values) if values else None
            rows.append([task, epochs, pct(r["val_top1"]), num(mean_of("da_weight")), num(mean_of("ar_gamma")),
                         num(mean_of("ar_ratio"))])
    out += ["Longer schedule (lr 0.01, seed 42; the last epoch's diagnostics on 32 val images):", "",
            table(["task", "epochs", "val top-1", "mean alpha", "mean abs(gamma)", "AR change / patch norm"], rows)]
    return "\n".join(out)


def open_choices_table(report: dict) -> str:
    tasks = report["tasks"]
    rows = [[r["setting"]] + [pct(r[t]) for t in tasks] + [pct(r["mean_val_top1"], 2),
             "-" if r["setting"] == "default" else f"{report['verdicts'][r['setting']]['gain_points']:+.2f}"]
            for r in report["rows"]]
    out = ["The open choices (val top-1; \"default\" is the spec's method):", "",
           table(["setting"] + tasks + ["mean val top-1", "vs the spec's method"], rows), ""]
    winners = [k for k, v in report["verdicts"].items() if v["variant"]]
    out.append("Settings that clear the 1-point rule: " + (", ".join(f"`{w}`" for w in winners) if winners else
                                                           "**none**") + ".")
    return "\n".join(out)


# V-PETL Bench's "Params." for VTAB-1k on ViT-B/16 (../shared/reference/published-results.md); the VPT rows
# are VPT's own, at its per-task prompt lengths (ours: p = 10 everywhere)
PUBLISHED_PARAMS = {"linear": "0", "full": "85.8M", "vpt-shallow": "0.08M", "vpt-deep": "0.56M", "adapter": "0.16M",
                    "adaptformer": "0.16M", "bitfit": "0.10M", "lora": "0.29M", "ssf": "0.21M"}


def params_table(rows: list) -> str:
    out = []
    for r in rows:
        own = r["tuned_without_head"]
        out.append([r["method"], f"{own:,}", f"{own / 1e6:.2f}M", PUBLISHED_PARAMS.get(r["method"], "-"),
                    f"{r['tuned_%']:.3f}"])
    return table(["method", "tuned without the head", "in millions", "V-PETL Bench / VPT (published)",
                  "% of the backbone"], out)


def baselines_cost_table(report: dict) -> str:
    rows = []
    for m, s in report["methods"].items():
        merged = s.get("merged_vs_unmerged_inference")
        rows.append([m, f"{s['tuned_without_head']:,}", f"{s['train_step_s']:.2f}", f"{s['train_vs_vpt_deep']:.3f}",
                     f"{s['inference_s']:.2f}", f"{s['inference_vs_vpt_deep']:.3f}",
                     f"{s['saved_activation_bytes'] / 2 ** 20:.0f}", f"{s['saved_vs_vpt_deep']:.3f}",
                     "-" if merged is None else f"{merged:.3f}"])
    head = (f"{report['backbone']} @{report['image_size']}, batch {report['batch']}, prompt length "
            f"{report['prompt_length']}, {report['rounds']} interleaved rounds, {report['machine']}, {report['date']}")
    return head + "\n\n" + table(["method", "tuned params", "train step (s)", "/ VPT-deep", "inference (s)",
                                   "/ VPT-deep", "saved for backward (MiB)", "/ VPT-deep",
                                   "merged / unmerged inference"], rows)


def compiled_table(report: dict) -> str:
    peak = ", ".join(f"{k} {v:.1f}" for k, v in report["matmul_peak_gflops"].items())
    out = [f"{report['machine']}, {report['date']}; measured matmul peak (GFLOP/s): {peak}.", ""]
    for setup in report["setups"]:
        rows = []
        for m, s in setup["methods"].items():
            rows.append([m, f"{s['train_step_s']:.3f}", f"{s['compiled_train_step_s']:.3f}",
                         f"{s['compiled_vs_eager']:.3f}", f"{s['compile_seconds']:.0f}", f"{s['step_gflop']:.1f}",
                         f"{s['gflops_eager']:.1f} ({100 * s['share_of_fp32_peak_eager']:.0f}%)",
                         f"{s['gflops_compiled']:.1f} ({100 * s['share_of_fp32_peak_compiled']:.0f}%)"])
        r = setup["ivpt_vs_vpt_deep"]
        out += [f"**{setup['backbone']} @{setup['image_size']}, batch {setup['batch']}** (iVPT / VPT-deep step: "
                f"eager {r['eager']:.3f}, compiled {r['compiled']:.3f})", "",
                table(["method", "eager step (s)", "compiled step (s)", "compiled / eager", "compile (s)",
                       "GFLOP per step", "GFLOP/s eager (of fp32 peak)", "GFLOP/s compiled (of fp32 peak)"], rows), ""]
    return "\n".join(out).rstrip()


def saved_memory_table(report: dict) -> str:
    before = {p["prompt_length"]: p["ivpt_vs_vpt_deep_saved_bytes"] for p in (load("cost") or {}).get("prompt_length", [])}
    rows = []
    for p in report["points"]:
        old = before.get(p["prompt_length"])
        rows.append([str(p["prompt_length"]), f"{p['vpt-deep'] / 2 ** 20:.0f}", "-" if old is None else f"{old:.3f}",
                     f"{p['ivpt_vs_vpt_deep']:.3f}", f"{p['ivpt-channel_vs_vpt_deep']:.3f}"])
    return (f"{report['backbone']} @{report['image_size']}, batch {report['batch']}, {report['date']}\n\n" +
            table(["prompt length", "VPT-deep saved (MiB)", "iVPT / VPT-deep before (2026-11-24, static DA)",
                   "iVPT / VPT-deep now (gate DA, fused)", "iVPT channel DA / VPT-deep now"], rows))


def input_pipeline_table(report: dict) -> str:
    rows = []
    for name, e in report["sets"].items():
        for workers in ("0", "1", "2"):
            cold, warm = e["cold"][workers], e["cached"][workers]
            raw = e.get("cached_uint8", {}).get(workers)
            rows.append([name, workers, f"{cold:.0f}", f"{warm:.0f}", f"{warm / cold:.1f}x",
                         "-" if raw is None else f"{raw:.0f}", "-" if raw is None else f"{raw / cold:.1f}x"])
    use = ", ".join(f"{k}: {v:.0f} img/s" for k, v in report["consumption"].items())
    builds = ", ".join(f"{k} {e['build_seconds']:.1f} s" for k, e in report["sets"].items())
    return (f"{report['machine']}, {report['date']}; {report['images']} JPEGs per set, batch {report['batch']}\n\n"
            + table(["set (VTAB resize to)", "loader workers", "cold (img/s)", "cache, normalised on this CPU (img/s)",
                     "/ cold", "cache, uint8 for the device (img/s)", "/ cold"], rows)
            + f"\n\nBuilding each cache once: {builds}. A VPT-deep training step consumes: {use}.")


def linear_probe_cache_table(report: dict) -> str:
    rows = [[name, f"{r['seconds']:.1f}", f"{r['val_top1']:.4f}"] for name, r in report["runs"].items()]
    return (f"{report['machine']}, {report['date']}; offline-suite {report['task']}, {report['epochs']} epochs\n\n"
            + table(["linear probe run", "wall time (s)", "val top-1"], rows)
            + f"\n\nUncached / cached: **{report['uncached_vs_cached_first']:.1f}x** for the run that computes the "
              f"features, **{report['uncached_vs_cached_again']:.0f}x** for every later grid point.")


def tuner_table(report: dict) -> str:
    """Successive halving against the full grid, per (method, task) and in total (benchmarks/tuner.py)."""
    rows, verdicts = [], []
    for pair in report["pairs"].values():
        g, s = pair["grid"], pair["sha"]
        verdicts.append(verdict(*({**arm, "seeds": arm["test"]} for arm in (s, g))))
        rows.append([pair["method"], pair["task"], str(g["grid_epochs"]), str(s["grid_epochs"]),
                     f"{g['wall_s'] / 60:.0f}", f"{s['wall_s'] / 60:.0f}",
                     f"{g['lr']:g} / {g['wd']:g}", f"{s['lr']:g} / {s['wd']:g}", f"{pct(g['val'])} / {pct(s['val'])}",
                     f"{pct(g['test_mean'])} ± {pct(g['test_std'])}", f"{pct(s['test_mean'])} ± {pct(s['test_std'])}",
                     verdicts[-1]])
    out = table(["method", "task", "grid epochs (full)", "grid epochs (sha)", "wall min (full)", "wall min (sha)",
                 "choice lr / wd (full)", "choice (sha)", "val top-1 full / sha", "test (full)", "test (sha)",
                 "sha against full on test"], rows)
    t = report.get("total")
    if t:
        out += (f"\n\nIn total ({t['pairs']} pairs): the full grid trained **{t['grid_epochs_ratio']:.2f}x** the grid "
                f"epochs of successive halving ({t['grid']['grid_epochs']} against {t['sha']['grid_epochs']}; "
                f"{t['epochs_ratio']:.2f}x with the seed runs) in **{t['wall_ratio']:.2f}x** its wall time "
                f"({t['grid']['wall_s'] / 3600:.2f} h against {t['sha']['wall_s'] / 3600:.2f} h, the seed runs included). "
                f"Same choice on {t['same_choice']} of {t['pairs']}; mean test top-1 of the choices "
                f"{pct(t['test_mean_grid'], 2)} (full grid) against {pct(t['test_mean_sha'], 2)} (successive halving), "
                f"where a choice's test std over its seeds averages {pct(t['seed_std_mean'], 2)}; within noise "
                f"(a tie: the gap within twice its standard error over the seeds) on "
                f"{sum(v.startswith('tie') for v in verdicts)} of {t['pairs']}.")
    asha = [pair for pair in report["pairs"].values() if "asha" in pair]
    if asha:  # Optuna's asynchronous successive halving, where it was run
        out += "\n\nOptuna's asynchronous successive halving (`--pruner asha`, the same rungs), on the pairs it ran:\n\n"
        out += table(["method", "task", "grid epochs (full / sha / asha)", "wall min (asha)", "choice (asha)",
                      "val top-1 (asha)", "test (asha)"],
                     [[p["method"], p["task"], f"{p['grid']['grid_epochs']} / {p['sha']['grid_epochs']} / {p['asha']['grid_epochs']}",
                       f"{p['asha']['wall_s'] / 60:.0f}", f"{p['asha']['lr']:g} / {p['asha']['wd']:g}", pct(p["asha"]["val"]),
                       f"{pct(p['asha']['test_mean'])} ± {pct(p['asha']['test_std'])}"] for p in asha])
    return f"{report['machine']}, {report['date']}\n\n" + out


def onnx_table(report: dict) -> str:
    out = [f"{report['machine']}, {report['date']}; `{report['command']}`", ""]
    for block in report["backbones"].values():
        rows = []
        for m, e in block["methods"].items():
            for b in (1, 32):
                rows.append([m + (" (merged)" if m == "lora" else ""), str(b), f"{e[f'onnxruntime_ms_b{b}']:.2f}",
                             f"{e[f'eager_ms_b{b}']:.2f}", f"{e[f'compiled_ms_b{b}']:.2f}",
                             f"{e[f'onnxruntime_vs_eager_b{b}']:.2f}", f"{e[f'onnxruntime_vs_compiled_b{b}']:.2f}",
                             f"{e['onnx_mib']:.1f}", f"{e['adapter_mib']:.2f}"])
        out += [f"**{block['backbone']} @{block['image_size']}**", "",
                table(["method", "batch", "onnxruntime (ms)", "eager (ms)", "compiled (ms)", "ort / eager",
                       "ort / compiled", "ONNX file (MiB)", "adapter (MiB)"], rows), ""]
    return "\n".join(out).rstrip()


def prepare_table(report: dict) -> str:
    rows = [[str(r["workers"]), f"{r['images']:,}", f"{r['prepare_s']:.1f}", f"{r['prepare_images_per_s']:,.0f}",
             f"{r['check_s']:.1f}", f"{r['check_images_per_s']:,.0f}"] for r in report["runs"]]
    head = (f"{report['machine']}, Python {report['python']}, {report['date']}; `{report['command']}`; "
            f"{report['tasks']} tasks at their real split sizes, {report['image_px']} px JPEGs")
    return head + "\n\n" + table(["workers", "images", "prepare (s)", "prepare (images/s)", "check (s)",
                                    "check (images/s)"], rows)


def ivpt_vs_deep_table(report: dict) -> str:
    rows = [[f"{s['backbone']} @{s['image_size']}", str(s["batch"]), str(s["prompt_length"]),
             f"{s['methods']['vpt-deep']['train_step_s']:.3f}", f"{s['methods']['ivpt']['train_step_s']:.3f}",
             f"{s['ivpt_vs_vpt_deep']['train_step']:.3f}", f"{s['methods']['vpt-deep']['inference_s']:.3f}",
             f"{s['methods']['ivpt']['inference_s']:.3f}", f"{s['ivpt_vs_vpt_deep']['inference']:.3f}"]
            for s in report["setups"]]
    return f"{report['machine']}, {report['date']}, {report['rounds']} interleaved rounds\n\n" + table(
        ["setup", "batch", "p", "VPT-deep step (s)", "iVPT step (s)", "step ratio", "VPT-deep infer (s)",
         "iVPT infer (s)", "inference ratio"], rows)


def compact(value) -> str:
    """An option's value, short: [0, 1, 2, 3, 4] as 0..4, ten equal rows as 10 x (0..7)."""
    if not isinstance(value, list):
        return str(value)
    if len(value) > 1 and isinstance(value[0], list) and all(v == value[0] for v in value):
        return f"{len(value)} x ({compact(value[0])})"
    if len(value) > 2 and all(isinstance(v, int) for v in value) and value == list(range(value[0], value[-1] + 1)):
        return f"{value[0]}..{value[-1]}"
    return "[" + ", ".join(compact(v) for v in value) + "]"


def family_cost_table(report: dict) -> str:
    """The VPT family against VPT-deep (benchmarks/cost.py --family)."""
    rows = []
    for name, c in report["configurations"].items():
        options = ", ".join(f"{k} {compact(v)}" for k, v in c["options"].items()) or "defaults"
        groups = " + ".join(f"{g} {n:,}" for g, n in c["parameter_groups"].items())
        rows.append([name, options, f"{c['tuned_without_head']:,}", groups, f"{c['train_step_s']:.3f}",
                     f"{c['train_vs_vpt_deep']:.3f}", f"{c['inference_s']:.3f}", f"{c['inference_vs_vpt_deep']:.3f}",
                     f"{c['saved_activation_bytes'] / 2 ** 20:.0f}", f"{c['saved_vs_vpt_deep']:.3f}"])
    head = (f"{report['backbone']} @{report['image_size']}, batch {report['batch']}, prompt length "
            f"{report['prompt_length']}, {report['rounds']} interleaved rounds, {report['machine']}, {report['date']}; "
            f"`{report['command']}`")
    return head + "\n\n" + table(["configuration", "options", "tuned without head", "parameter groups",
                                   "train step (s)", "/ VPT-deep", "inference (s)", "/ VPT-deep",
                                   "saved for backward (MiB)", "/ VPT-deep"], rows)


def suite_family_table(report: dict) -> str:
    """E2VPT and VFPT on the suite beside VPT-deep and iVPT (benchmarks/suite_family.py); unfinished pairs shown."""
    tasks, methods = report["tasks"], report["methods"]

    def cell(r):
        return "unfinished" if r is None else f"{pct(r['test_mean'])} ± {pct(r['test_std'])}"

    rows = [[name] + [cell(m["tasks"][t]) for t in tasks] + [pct(m["mean"], 2), f"{m['finished']}/{len(tasks)}"]
            for name, m in methods.items()]
    text = table(["method"] + tasks + ["mean", "finished"], rows)
    lines = []
    for name in ("e2vpt", "vfpt"):
        against = [f"{t}: {verdict(methods[name]['tasks'][t], methods['vpt-deep']['tasks'][t])}" for t in tasks
                   if methods[name]["tasks"][t] is not None and methods["vpt-deep"]["tasks"][t] is not None]
        if against:
            lines.append(f"- {name} against VPT-deep (test top-1 difference; a tie unless over twice its standard "
                         f"error): " + "; ".join(against))
        chosen = [f"{t} {r['lr']:g}/{r['weight_decay']:g}" for t, r in methods[name]["tasks"].items() if r is not None]
        if chosen:
            lines.append(f"- {name}'s choice (lr/wd, on val): " + ", ".join(chosen))
    return (f"Test top-1 (%), mean ± std over 3 seeds, `{report['recipe']}`; the mean only once all "
            f"{len(tasks)} tasks are in. Collected {report['date']}.\n\n" + text + ("\n\n" + "\n".join(lines) if lines else ""))


def equality_verdict(row: dict) -> str:
    found = "equal" if row["equal"] else "different"
    return found if found == row.get("expected", "equal") else f"{found} (**unexpected**)"


def official_equality_table(report: dict) -> str:
    """E2VPT, VFPT and GateVPT against their official code (benchmarks/official_equality.py)."""
    rows = []
    for method in ("e2vpt", "vfpt", "gatevpt"):
        if method not in report:
            continue
        for r in report[method]["rows"]:
            rows.append([method, r["configuration"], f"{r['max_abs_features']:.1e}", f"{r['max_abs_logits']:.1e}",
                         f"{min(r['controls_max_abs_logits'].values()):.1e}", equality_verdict(r)])
    sources = "; ".join(f"{report[m]['repository']} at {report[m]['commit'][:7]}" for m in ("e2vpt", "vfpt", "gatevpt")
                        if m in report and report[m].get("commit"))
    return (f"{report['backbone']}, 4 images, eval, float32; {sources}; tolerance {report['tolerance']:g}; "
            f"{report['machine']}, {report['date']}\n\n"
            + table(["method", "configuration", "max abs. difference, features", "logits",
                     "smallest control", "verdict"], rows))


RENDERERS = {  # block name -> (results file, renderer)
    "accuracy": ("accuracy", accuracy_tables),
    "accuracy_progress": ("accuracy_progress", accuracy_progress_tables),
    "ablation": ("accuracy", ablation_table),
    "accuracy_5epoch": ("accuracy_5epoch", accuracy_tables),  # the suite of 2026-11-24, kept as it was
    "ablation_5epoch": ("accuracy_5epoch", lambda report: ablation_table(report, SWITCHES_5EPOCH)),
    "defaults": ("ivpt_defaults", defaults_table),
    "segmentation": ("segmentation", segmentation_table),
    "cost": ("cost", cost_tables),
    "ivpt_vs_deep": ("cost_ivpt_vs_deep", ivpt_vs_deep_table),
    "family_cost": ("cost_family", family_cost_table),
    "suite_family": ("suite_family", suite_family_table),
    "official_equality": ("official_equality", official_equality_table),
    "testbed": ("testbed_probe", testbed_table),
    "mechanism": ("mechanism", mechanism_table),
    "precision_threads": ("precision_threads", precision_threads_table),
    "why_tie": ("why_tie", why_tie_tables),
    "open_choices": ("ivpt_open_choices", open_choices_table),
    "params_baselines": ("params_vit_b16", params_table),
    "baselines_cost": ("cost_baselines", baselines_cost_table),
    "compiled": ("compiled", compiled_table),
    "saved_memory": ("saved_memory", saved_memory_table),
    "input_pipeline": ("input_pipeline", input_pipeline_table),
    "linear_probe_cache": ("linear_probe_cache", linear_probe_cache_table),
    "tuner": ("tuner", tuner_table),
    "onnx": ("onnx", onnx_table),
    "prepare": ("prepare", prepare_table),
}


def render() -> dict[str, str]:
    blocks = {}
    for name, (source, fn) in RENDERERS.items():
        data = load(source)
        if data is not None:
            blocks[name] = fn(data)
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print the tables, do not touch the document")
    args = parser.parse_args()
    blocks = render()
    if args.print:
        for name, text in blocks.items():
            print(f"## {name}\n\n{text}\n")
        return
    doc = DOC.read_text()
    for name, text in blocks.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n)(?:.*?\n)?(<!-- /table:{name} -->)", re.DOTALL)
        if not pattern.search(doc):
            print(f"note: no <!-- table:{name} --> block in {DOC}")
            continue
        doc = pattern.sub(lambda m, text=text: m.group(1) + text + "\n" + m.group(2), doc)
    DOC.write_text(doc)
    print(f"updated {DOC}: {', '.join(blocks) or 'nothing (no results yet)'}")


if __name__ == "__main__":
    main()
