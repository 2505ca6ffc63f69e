"""ivpt benchmark: end to end on a two-task VTAB-1k fixture (shipped backbone, one epoch), the rerun, the table
against the runs' own records and the shipped reference, grid edges, unfinished tasks, the dry run."""
import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ivpt import benchmark
from ivpt.cli import main

TASKS = ["kitti", "patch_camelyon"]  # 4 and 2 classes: a structured and a specialized task
METHODS = ["vpt-deep", "lora"]


def write_vtab_task(root: Path, task: str, classes: int, seed: int) -> None:
    """The processed VTAB-1k layout: images/<split>/NNNNNN.jpg and one 'path label' list per split."""
    rng = np.random.default_rng(seed)
    sizes = {"train800": 2 * classes, "val200": classes, "test": classes}
    lists = {}
    for split, count in sizes.items():
        lines = []
        for i in range(count):
            rel = f"images/{split}/{i:06d}.jpg"
            (root / task / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / task / rel)
            lines.append(f"{rel} {i % classes}")
        lists[split] = lines
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (root / task / f"{split}.txt").write_text("\n".join(lines) + "\n")


def overrides(root: Path) -> list[str]:
    return ["backbone=vit_mini_patch4_32.ivpt_cifar10", "weights=null", "pretrained=null", "epochs=1",
            "warmup_epochs=0", "batch_size=4", "protocol={lrs: [0.01, 0.001], wds: [0.0], seeds: [42]}",
            f"data.root={root}"]


def command(root: Path, out: Path, *extra: str, tasks=TASKS) -> list[str]:
    return ["benchmark", "vtab-1k", "--methods", *METHODS, "--tasks", *tasks, "--set", *overrides(root),
            "--output", str(out), *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab-1k")
    for seed, task in enumerate(TASKS):
        write_vtab_task(root, task, {"kitti": 4, "patch_camelyon": 2}[task], seed)
    out = tmp_path_factory.mktemp("bench") / "out"
    assert main(command(root, out)) == 0
    return root, out


def test_the_table_holds_the_runs_own_records_and_the_published_figures(finished):
    root, out = finished
    table = json.loads((out / "table.json").read_text())
    reference = json.loads((Path(benchmark.__file__).parent / "reference" / "published.json").read_text())
    published = reference["benchmarks"]["vtab-1k"]["methods"]
    for method in METHODS:
        for task in TASKS:
            row = table["methods"][method]["tasks"][task]
            folder = out / method / task
            runs = [json.loads(p.read_text()) for p in sorted((folder / "final").glob("seed*/results.json"))]
            tests = [100 * r["test"]["top1"] for r in runs]
            assert row["status"] == "finished" and row["seeds"] == len(runs) == 1
            assert row["test_mean"] == pytest.approx(statistics.fmean(tests)) and row["test_std"] == 0
            assert (row["lr"], row["weight_decay"]) == (runs[0]["config"]["lr"], runs[0]["config"]["weight_decay"])
            assert row["tuned"] == runs[0]["parameters"]["tuned"]
            seconds = sum(json.loads(line)["seconds"] for p in folder.rglob("metrics.jsonl")
                          for line in p.read_text().splitlines())
            assert row["gpu_hours"] == pytest.approx(seconds / 3600, abs=1e-4) and seconds > 0
            assert row["published"] == published[method]["tasks"][task]
            assert row["difference"] == pytest.approx(row["test_mean"] - row["published"])
            assert row["source"] == published[method]["source"] and row["source"] in table["sources"]
    # two tasks of 19: no group or 19-task mean is claimed
    assert table["methods"]["lora"]["mean"] is None and table["methods"]["lora"]["groups"] == {}
    text = (out / "table.md").read_text()
    assert "| kitti | structured |" in text and f"{published['lora']['tasks']['kitti']:.1f}" in text
    rows = (out / "table.csv").read_text().splitlines()
    assert rows[0].startswith("method,task,group,status,test_mean") and len(rows) == 1 + 4 + 2 * 2  # + two mean rows a method
    pytest.importorskip("matplotlib")
    assert (out / "table.png").stat().st_size > 0


def test_the_module_methods_train_under_their_protocol_and_the_overrides_apply_to_every_task(finished):
    _, out = finished
    for task in TASKS:
        lora = json.loads((out / "lora" / task / "final" / "seed42" / "results.json").read_text())["config"]
        deep = json.loads((out / "vpt-deep" / task / "final" / "seed42" / "results.json").read_text())["config"]
        assert (lora["optimizer"], lora["batch_size"], lora["method_options"]) == ("adamw", 4, {})  # vtab-petl, --set
        assert deep["optimizer"] == "sgd" and deep["method_options"]["prompt_length"] == 100  # VPT's per-task length
        assert lora["epochs"] == deep["epochs"] == 1 and lora["data"]["task"] == deep["data"]["task"] == task


def test_a_rerun_trains_nothing(finished, monkeypatch):
    root, out = finished
    before = {p: p.stat().st_mtime_ns for m in METHODS for p in (out / m).rglob("*")}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished (method, task) was trained again")

    monkeypatch.setattr("ivpt.engine.loop.train", no_training)
    monkeypatch.setattr("ivpt.engine.study.tune", no_training)
    assert main(command(root, out)) == 0
    assert {p: p.stat().st_mtime_ns for m in METHODS for p in (out / m).rglob("*")} == before


def test_a_choice_on_its_grids_edge_is_marked(finished):
    _, out = finished
    table = json.loads((out / "table.json").read_text())
    text = (out / "table.md").read_text()
    for method in METHODS:
        for task in TASKS:
            row = table["methods"][method]["tasks"][task]
            side = "largest" if row["lr"] == 0.01 else "smallest"  # of two lrs, either choice is an edge
            assert row["grid_edges"] == [f"lr {row['lr']:g} is the {side} of [0.01, 0.001]"]  # one wd: no edge
            assert f"| {row['lr']:g} (edge) | 0 |" in text


def test_grid_edges():
    from ivpt.engine.protocol import grid_edge_warning, grid_edges

    lrs, wds = [0.1, 0.03, 0.01], [0.01, 0.0001, 0.0]
    assert grid_edges({"lr": 0.03, "weight_decay": 0.0001}, lrs, wds) == []
    assert grid_edges({"lr": 0.1, "weight_decay": 0.01}, lrs, wds) == [
        "lr 0.1 is the largest of [0.1, 0.03, 0.01]", "wd 0.01 is the largest of [0.01, 0.0001, 0]"]
    assert grid_edges({"lr": 0.01, "weight_decay": 0.0}, lrs, wds) == ["lr 0.01 is the smallest of [0.1, 0.03, 0.01]"]
    line = grid_edge_warning({"lr": 0.1, "weight_decay": 0.0001}, lrs, wds)
    assert "lr 0.1 is the largest" in line and "\n" not in line
    assert grid_edge_warning({"lr": 0.03, "weight_decay": 0.0001}, lrs, wds) is None


def test_ivpt_tune_warns_of_a_choice_on_its_grids_edge(finished, capsys, tmp_path):
    root, out = finished
    # a copy of the finished lora tuning on kitti, read back by ivpt tune: its choice is one of two lrs, an edge
    shutil.copytree(out / "lora" / "kitti", tmp_path / "kitti")
    args = ["tune", str(benchmark.packaged("vtab/kitti.yaml")), str(benchmark.packaged("protocols/vtab-petl.yaml")),
            "--set", "method=lora", "method_options={}", *overrides(root), "--output", str(tmp_path / "kitti")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count("ivpt: warning: the choice is on the edge of its grid (lr ") == 1


def test_unfinished_tasks_show_as_such(finished, tmp_path):
    root, out = finished
    assert main(command(root, out, "--table-only", tasks=[*TASKS, "eurosat"])) == 0
    table = json.loads((out / "table.json").read_text())
    row = table["methods"]["lora"]["tasks"]["eurosat"]
    assert row["status"] == "unfinished" and "test_mean" not in row and row["published"] == 95.3
    assert table["methods"]["lora"]["finished"] == 2 and table["methods"]["lora"]["task_count"] == 3
    assert "| eurosat | specialized | unfinished | 95.3 |" in (out / "table.md").read_text()


def test_another_configs_summary_is_refused_by_name(finished):
    root, out = finished
    with pytest.raises(ValueError, match=r"lora/kitti/summary\.json is a finished tuning of another config \(it differs in epochs"):
        benchmark.run(benchmark.plan("vtab-1k", [], ["lora"], ["kitti"], [o.replace("epochs=1", "epochs=2") for o in overrides(root)], out), log=lambda s: None)


def test_the_dry_run_plan(finished, capsys):
    root, out = finished
    jobs = benchmark.plan("vtab-1k", [], ["vpt-deep"], TASKS, overrides(root), out)
    plan = benchmark.estimate(jobs, "sha", tflops=10)
    train, evaluate = benchmark.flops_per_image(jobs[0].cfg, 4)
    assert train > 1.5 * evaluate > 0  # a training step computes a backward pass beside the forward one
    for row in plan["jobs"]:  # 2 grid points + 1 seed, one epoch each; val after the grid epochs, test once
        train_n, val_n, test_n = benchmark.FAMILIES["vtab-1k"].sizes[row["task"]]
        assert (row["runs"], row["epochs"], row["finished"]) == (3, 3, True)
        assert row["flops"] == pytest.approx(2 * (train_n * train + val_n * evaluate) + (train_n + val_n) * train
                                             + test_n * evaluate, rel=1e-3)  # a 100-class head beside kitti's 4
        assert row["gpu_hours"] == pytest.approx(row["flops"] / 10e12 / 3600, abs=1e-3)
    assert benchmark.estimate(jobs, "sha", tflops=20)["gpu_hours"] == pytest.approx(plan["gpu_hours"] / 2, abs=0.01)
    assert main(command(root, out, "--dry-run", "--tflops", "10")) == 0
    printed = capsys.readouterr().out
    assert "vpt-deep         2      6        6" in printed and "10 TFLOP/s" in printed


def test_successive_halvings_epochs():
    # VTAB's 40-point grid, 100 epochs: 40 points to 11, 13 on to 33, 4 on to 99, 1 to 100
    assert benchmark.grid_epochs(40, 100, "sha") == 40 * 11 + 13 * 22 + 4 * 66 + 1
    assert benchmark.grid_epochs(40, 100, "none") == 4000 and benchmark.grid_epochs(2, 1, "sha") == 2


def test_recipe_names_and_bad_input(tmp_path):
    jobs = benchmark.plan("fgvc", [], ["vpt-deep"], ["nabirds"], [], tmp_path)
    assert jobs[0].cfg.data["dataset"] == "nabirds" and jobs[0].cfg.method_options == {"prompt_length": 50}
    suite = benchmark.plan("suite", ["configs/suite/protocol.yaml"], ["lora"], ["dtd10"], [], tmp_path)
    assert suite[0].cfg.protocol["lrs"] == [0.01, 0.003, 0.001, 0.0003]  # the suite's module-method scale
    assert benchmark.plan("suite", ["suite/base"], ["linear"], ["dtd10"], [], tmp_path)[0].cfg.optimizer == "sgd"
    for args, message in [(("vtab-1k", [], ["vpt-deep"], ["cifar100"], []), "--tasks 'cifar100'"),
                          (("vtab-1k", [], ["lora", "lora"], None, []), "'lora' is listed twice"),
                          (("vtab-1k", [], ["vpt-dep"], ["dtd"], []), "--methods 'vpt-dep'"),
                          (("vtab-1k", [], ["full"], ["dtd"], []), "no vtab-1k protocol for full fine-tuning"),
                          (("vtab-1k", [], ["ivpt"], ["dtd"], ["method=lora"]), "given by --methods"),
                          (("vtab-1k", ["fgvc"], ["ivpt"], ["dtd"], []), "fgvc benchmark's"),
                          (("vtab-1k", ["nothere.yaml"], ["ivpt"], ["dtd"], []), "recipe 'nothere.yaml'")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            benchmark.plan(*args, tmp_path)
    full = benchmark.plan("vtab-1k", [], ["full"], ["dtd"], ["protocol.lrs=[0.001]"], tmp_path)
    assert full[0].cfg.protocol["lrs"] == [0.001]


def test_the_cli_names_every_benchmark():
    from ivpt import cli

    assert cli.BENCHMARKS == tuple(benchmark.FAMILIES) and cli.ASSUMED_TFLOPS == benchmark.ASSUMED_TFLOPS


def test_the_shipped_reference_agrees_with_itself():
    """Each published mean is the mean of its published per-task figures to within their rounding (the papers
    averaged unrounded figures; each is rounded to 0.1, so a mean moves by at most 0.05): a transcription slip
    in published.json would show here."""
    reference = benchmark.published_reference()
    assert set(reference["sources"]) == {"vpt", "v-petl-bench"}
    for name, family in (("vtab-1k", benchmark.FAMILIES["vtab-1k"]), ("fgvc", benchmark.FAMILIES["fgvc"])):
        methods = reference["benchmarks"][name]["methods"]
        assert set(methods) == {"full", "linear", "vpt-shallow", "vpt-deep", "adapter", "adaptformer", "lora", "ssf", "bitfit"}
        for method, entry in methods.items():
            assert set(entry["tasks"]) == set(family.tasks) and entry["source"] in reference["sources"]
            assert statistics.fmean(entry["tasks"].values()) == pytest.approx(entry["mean"], abs=0.05), (name, method)
            for group, published in entry.get("groups", {}).items():
                tasks = [t for t, g in family.tasks.items() if g == group]
                assert statistics.fmean(entry["tasks"][t] for t in tasks) == pytest.approx(published, abs=0.05)


def test_means_of_a_whole_benchmark_beside_the_published_ones(tmp_path):
    """Every VTAB-1k task finished (rows as task_row writes them, at the published figures plus one point):
    group means, their mean and the 19-task mean, each one point above the published one."""
    reference = benchmark.published_reference()["benchmarks"]["vtab-1k"]["methods"]
    family = benchmark.FAMILIES["vtab-1k"]
    for method in ("vpt-deep", "lora"):
        rows = [{"method": method, "task": t, "group": g, "status": "finished", "published": reference[method]["tasks"][t],
                 "test_mean": reference[method]["tasks"][t] + 1, "gpu_hours": 0.5, "tuned_without_head": 10}
                for t, g in family.tasks.items()]
        means = benchmark.aggregate(rows, family, reference)
        assert means["mean"] == pytest.approx(statistics.fmean(r["test_mean"] for r in rows))
        assert means["published_mean"] == reference[method]["mean"] and means["gpu_hours"] == 9.5
        for group in family.groups:
            assert means["groups"][group] == pytest.approx(
                statistics.fmean(r["test_mean"] for r in rows if r["group"] == group))
        assert means["mean_of_groups"] == pytest.approx(statistics.fmean(means["groups"].values()))
        computed = means["published_computed"]
        if method == "vpt-deep":  # the VPT paper publishes its group means: those, not ours recomputed
            assert means["published_groups"] == reference[method]["groups"] and computed == []
            assert means["published_mean_of_groups"] == reference[method]["mean_of_groups"]
        else:
            assert computed == [*family.groups, "mean of groups"]
            assert means["groups"]["natural"] - means["published_groups"]["natural"] == pytest.approx(1)
        del rows[0]["test_mean"]  # one task unfinished: no mean that covers it
        rows[0]["status"] = "unfinished"
        partial = benchmark.aggregate(rows, family, reference)
        assert partial["mean"] is partial["mean_of_groups"] is None and "natural" in partial["groups"]
        assert partial["groups"]["natural"] is None and partial["groups"]["structured"] == means["groups"]["structured"]


def test_an_ablation_needs_its_source_method(tmp_path):
    jobs = benchmark.plan("suite", [], ["cdc-static"], ["dtd10"], [], tmp_path)
    assert jobs[0].reuse_from == "ivpt" and jobs[0].cfg.method_options == {"prompt_length": 10, "da": "static", "ar": False}
    with pytest.raises(ValueError, match=r"cdc-static on dtd10 trains at the lr and wd ivpt chose .* add ivpt to --methods"):
        benchmark.run(jobs, log=lambda s: None)


def test_a_missing_task_is_said_before_anything_trains(finished):
    root, out = finished
    jobs = benchmark.plan("vtab-1k", [], ["vpt-shallow"], ["kitti", "eurosat"], overrides(root), out)
    with pytest.raises(ValueError, match=r"VTAB-1k task folder not found: .*eurosat"):
        benchmark.run(jobs, log=lambda s: None)
    assert not (out / "vpt-shallow").exists()  # kitti, first in line, was not started
    fresh = out.parent / "fresh"
    assert main(command(root, fresh, tasks=["kitti", "eurosat"])) == 2 and not fresh.exists()  # no table either


def test_e2vpt_and_vfpt_run_with_their_codes_settings_per_task(tmp_path):
    """--methods e2vpt / vfpt: each method's own protocol layer and per-task options over every task recipe
    (E2VPT's command.txt lengths, VFPT's share where the recipe's one prompt would give no Fourier prompt),
    and the dry run counts E2VPT's rewinds."""
    tasks = ["caltech101", "oxford_flowers102", "patch_camelyon", "dtd"]
    jobs = {(j.method, j.task): j for j in benchmark.plan("vtab-1k", [], ["e2vpt", "vfpt"], tasks, [], tmp_path)}
    options = {task: jobs["e2vpt", task].cfg.method_options for task in tasks}
    assert options["caltech101"] == {"prompt_length": 32, "kv_length": 5, "prompt_dropout": 0.1, "prune": True}
    assert (options["oxford_flowers102"]["prompt_length"], options["oxford_flowers102"]["kv_length"]) == (1, 1)
    assert options["patch_camelyon"]["kv_length"] == 10 and options["dtd"]["prompt_length"] == 10
    assert {jobs["e2vpt", t].cfg.batch_size for t in tasks} == {64} and jobs["e2vpt", "dtd"].cfg.optimizer == "sgd"
    assert jobs["vfpt", "oxford_flowers102"].cfg.method_options == {"prompt_length": 1, "fourier_share": 1.0}
    assert jobs["vfpt", "dtd"].cfg.method_options == {"prompt_length": 10} and jobs["vfpt", "dtd"].cfg.batch_size == 64
    fgvc = benchmark.plan("fgvc", [], ["e2vpt"], ["CUB_200_2011"], [], tmp_path)[0].cfg
    assert (fgvc.batch_size, fgvc.method_options["prompt_length"], fgvc.method_options["prune"]) == (128, 5, True)
    # p = 10: 9 token levels x 8 piece levels, each a 100-epoch rewind, and one scoring pass
    cost = benchmark.job_cost(jobs["e2vpt", "dtd"], "sha", (1, 1))
    assert cost["rewind_epochs"] == 9 * 8 * 100 + 1 and cost["runs"] == cost["grid_points"] + 72 + cost["seeds"]
    assert benchmark.job_cost(jobs["vfpt", "dtd"], "sha", (1, 1))["rewind_epochs"] == 0


@pytest.mark.parametrize("when", ["as a pair finishes", "before a pair starts"])
def test_a_signal_lets_no_further_pair_start(finished, tmp_path, monkeypatch, when):
    """SIGTERM just after a pair's tuning finished (so no run of it could answer it): the benchmark starts no
    next pair and exits 75. SIGTERM just before a pair's tuning: the tuner takes the stop over and trains
    nothing. Either way the same command then finishes what is missing."""
    import os
    import signal

    from ivpt.engine import study

    root, _ = finished
    out, real, calls = tmp_path / "out", study.tune, []

    def tune_signalled(cfg, folder, **options):
        calls.append(folder)
        if when == "before a pair starts":
            os.kill(os.getpid(), signal.SIGTERM)
        summary = real(cfg, folder, **options)
        os.kill(os.getpid(), signal.SIGTERM)
        return summary

    monkeypatch.setattr(study, "tune", tune_signalled)
    assert main(command(root, out)) == 75
    assert len(calls) == 1 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    trained = sorted(p.parent.parent.name for p in out.rglob("results.json"))
    assert trained == ([] if when == "before a pair starts" else ["final", "grid", "grid"])  # one pair: 2 lrs, 1 seed
    monkeypatch.setattr(study, "tune", real)
    assert main(command(root, out)) == 0
    assert len(list(out.rglob("summary.json"))) == len(METHODS) * len(TASKS)
