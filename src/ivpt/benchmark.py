"""``ivpt benchmark``: VPT's protocol on every (method, task) of VTAB-1k, FGVC or the offline suite, and the table.

Three steps, each usable alone: ``plan`` builds one config per (method, task) from the packaged (or given)
recipes; ``run`` tunes each through ``ivpt.engine.study.tune`` into ``OUTPUT/<method>/<task>/`` (a pair
whose ``summary.json`` exists and matches its config is not touched; everything else resumes, so many
machines sharing one ``--storage`` and one output folder finish it together); ``table`` reads the
``summary.json`` files back and writes ``table.{md,csv,json,png}`` with the published figures beside ours.
``estimate`` is the dry run: runs, epochs and GPU-hours from FLOPs measured on the real architecture.
"""
from __future__ import annotations

import json
import statistics
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .data.check import FGVC_SPLIT_SIZES, VTAB_TEST_SIZES
from .data.fgvc import FGVC_DATASETS
from .data.suite import SUITE_TASKS
from .data.vtab import GROUPS, VTAB_TASKS
from .engine.config import ConfigError, TrainConfig, apply_overrides, load_config, read_recipe
from .engine.protocol import VPT_LRS, VPT_SEEDS, VPT_WDS, grid_edge_warning, grid_edges

MODULE_METHODS = ("lora", "adapter", "adaptformer", "ssf", "bitfit")
# The offline suite's recipes hold the prompts' lrs; full fine-tuning moves every weight and the module
# methods change the blocks' own activations, so they train at scaled lrs (as benchmarks/accuracy.py did).
SUITE_LR_SCALE = {"full": 0.01, **dict.fromkeys(MODULE_METHODS, 0.1)}
# iVPT's ablations: a method with switches, training at the lr and wd full iVPT chose on the same task
VARIANTS = {"cdc-static": ("ivpt", {"da": "static", "ar": False}), "cdc-da": ("ivpt", {"da": "gate", "ar": False}),
            "ar-only": ("ivpt", {"cdc": False})}
REUSE_CHOICE = dict.fromkeys(VARIANTS, "ivpt")
# prompt methods whose official code trains its own way: their protocol layer per benchmark, and their per-task
# options in the packaged reference/task_options.json (every_task, then the task's entry)
METHOD_PROTOCOLS = {("vfpt", "vtab-1k"): "protocols/vfpt.yaml", ("vfpt", "fgvc"): "protocols/vfpt.yaml",
                    ("e2vpt", "vtab-1k"): "protocols/e2vpt.yaml", ("e2vpt", "fgvc"): "protocols/e2vpt-fgvc.yaml"}
# The dry run's assumption: sustained training throughput of one GPU on these fp32 recipes (an H100's fp32
# peak is about 67 TFLOP/s, an A100's 19.5); a measurement on your GPU replaces it (--tflops).
ASSUMED_TFLOPS = 30.0


@dataclass(frozen=True)
class Family:
    """A benchmark: its tasks (task -> group), how a recipe names one, its packaged recipes and split sizes."""
    name: str
    tasks: dict[str, str]
    task_field: str                       # data.task or data.dataset
    per_task_recipes: str | None          # packaged folder of one recipe per task (configs/vtab)
    default_recipe: str | None            # packaged recipe every task shares (the suite)
    petl_protocol: str | None             # the module methods' protocol, layered over each recipe
    sizes: dict[str, tuple[int, int, int]]  # task -> (train, val, test) images; train+val is the final runs'
    groups: tuple[str, ...] = ()


# the split sizes data check verifies (one table: ivpt.data.check)
VTAB_TEST = VTAB_TEST_SIZES
FGVC_SIZES = {name: (n["train"], n["val"], n["test"]) for name, n in FGVC_SPLIT_SIZES.items()}

FAMILIES = {
    "vtab-1k": Family("vtab-1k", {t: g for t, (_, g) in VTAB_TASKS.items()}, "task", "vtab", None,
                      "protocols/vtab-petl.yaml", {t: (800, 200, n) for t, n in VTAB_TEST.items()}, GROUPS),
    "fgvc": Family("fgvc", dict.fromkeys(FGVC_DATASETS, "fgvc"), "dataset", "fgvc", None,
                   "protocols/fgvc-petl.yaml", FGVC_SIZES),
    "suite": Family("suite", {t: g for t, (g, _) in SUITE_TASKS.items()}, "task", None, "suite/protocol.yaml",
                    None, dict.fromkeys(SUITE_TASKS, (800, 200, 2000)), GROUPS),  # test: at most 2,000
}


def packaged(relative: str) -> Path:
    """A file under the package's configs/ (the recipes ship with ivpt, so no checkout is needed)."""
    return Path(str(resources.files("ivpt") / "configs" / relative))


def published_reference() -> dict:
    """The published figures shipped with ivpt (ivpt/reference/published.json): never an iVPT number."""
    return json.loads((resources.files("ivpt") / "reference" / "published.json").read_text())


@dataclass
class Job:
    """One (method, task) of a benchmark: its config, its folder, and the method whose choice it reuses (or None)."""
    benchmark: str
    method: str
    task: str
    group: str
    cfg: TrainConfig
    folder: Path
    reuse_from: str | None = None


# -- plan ----------------------------------------------------------------------------------------------
def resolve_recipe(text: str, family: Family) -> list[Path] | str:
    """A recipe argument: a file, a packaged recipe's name (suite/protocol, protocols/vtab-petl), a path
    under a checkout's configs/ read from the package when there is no checkout, or a benchmark's name
    (vtab-1k, fgvc, suite: its packaged per-task recipes, returned as the family's name)."""
    if text in FAMILIES:
        if text != family.name:
            raise ConfigError(f"recipe {text!r} is the {text} benchmark's; this is {family.name}")
        return family.name
    path = Path(text).expanduser()
    if path.is_file():
        return [path]
    name = text[len("configs/"):] if text.startswith("configs/") else text
    for candidate in (name, f"{name}.yaml"):
        if packaged(candidate).is_file():
            return [packaged(candidate)]
    raise FileNotFoundError(f"recipe {text!r}: no such file, and no packaged recipe of that name (e.g. "
                            f"{family.name}, suite/protocol, protocols/vtab-petl or a YAML file)")


def task_recipes(family: Family, task: str, recipes: list[str]) -> list[Path]:
    """The layers of one task's config: the per-task recipe where a benchmark's name (or nothing) is given,
    then the given files in order (a later file's fields replace an earlier one's)."""
    layers: list[Path] = []
    for text in recipes or [family.name]:
        resolved = resolve_recipe(text, family)
        if resolved == family.name:
            layers.append(packaged(f"{family.per_task_recipes}/{task}.yaml") if family.per_task_recipes
                          else packaged(family.default_recipe))
        else:
            layers.extend(resolved)
    return layers


def official_task_options(method: str, family: Family, task: str) -> dict:
    """What the official code of ``method`` sets for ``task`` (reference/task_options.json), or nothing."""
    if (method, family.name) not in METHOD_PROTOCOLS:
        return {}
    table = json.loads((resources.files("ivpt") / "reference" / "task_options.json").read_text())[method]
    return {**table.get("every_task", {}), **table.get(family.name, {}).get(task, {})}


def method_fields(family: Family, name: str, base: TrainConfig, lrs_given: bool,
                  task: str | None = None) -> tuple[list[Path], dict]:
    """A method's protocol layer and fields: the module methods' protocol file (VTAB-1k, FGVC), a prompt method's
    own protocol and per-task options where its code publishes them (E2VPT, VFPT), or the suite's lr scale; a
    variant's switches; prompt methods keep the recipe's prompt length unless their per-task options set one."""
    from .methods import METHODS, prompt_options

    method, extra = VARIANTS.get(name, (name, None))
    if method not in METHODS:
        raise ConfigError(f"--methods {name!r}: expected one of {', '.join([*METHODS, *VARIANTS])}")
    # the recipe's own method keeps all its options; another method keeps only the prompt length, if it has prompts
    own = (dict(base.method_options) if method == base.method
           else prompt_options(method, int(base.method_options.get("prompt_length", 10))))
    official = official_task_options(method, family, task) if task is not None else {}
    fields: dict[str, Any] = {"method": method, "method_options": {**own, **official, **(extra or {})}}
    layers = []
    if family.petl_protocol and method in MODULE_METHODS:
        layers.append(packaged(family.petl_protocol))
    elif (method, family.name) in METHOD_PROTOCOLS:
        layers.append(packaged(METHOD_PROTOCOLS[method, family.name]))
    elif family.name == "suite" and method in SUITE_LR_SCALE and not lrs_given:
        scale = SUITE_LR_SCALE[method]
        fields["protocol"] = {**base.protocol, "lrs": [float(f"{lr * scale:.3g}") for lr in base.protocol.get("lrs", VPT_LRS)]}
    elif method == "full" and family.name != "suite" and not lrs_given:
        raise ConfigError(f"--methods full: ivpt ships no {family.name} protocol for full fine-tuning (the recipes' "
                          "lrs are the prompts', up to 50 with SGD); run it on its own with --set protocol.lrs=[...]")
    return layers, fields


def job_config(family: Family, task: str, name: str, recipes: list[str], overrides: list[str], output: Path) -> TrainConfig:
    """One (method, task)'s config: recipe layers, the method's layer and fields, the task, then --set."""
    layers = task_recipes(family, task, recipes)
    base = load_config(layers)
    lrs_given = any(o.split("=", 1)[0] in ("protocol", "protocol.lrs") for o in overrides)
    method_layers, fields = method_fields(family, name, base, lrs_given, task)
    raw: dict[str, Any] = {}
    for path in [*layers, *method_layers]:
        raw.update(read_recipe(path) or {})
    raw.update(fields)
    raw["data"] = {**raw.get("data", {}), family.task_field: task}
    raw["output"] = str(output / name / task)
    raw = apply_overrides(raw, overrides)
    if raw.get("output") != str(output / name / task):
        raise ConfigError("--set output=...: each (method, task) is written to OUTPUT/<method>/<task>; use --output")
    return load_config(None, fields=raw)


def check_names(flag: str, given: list[str], known) -> None:
    unknown = [n for n in given if n not in known]
    if unknown:
        raise ConfigError(f"{flag} {unknown[0]!r}: expected any of {', '.join(known)}")
    if len(set(given)) != len(given):
        twice = next(n for n in given if given.count(n) > 1)
        raise ConfigError(f"{flag}: {twice!r} is listed twice; list each once")


def plan(benchmark: str, recipes: list[str], methods: list[str], tasks: list[str] | None, overrides: list[str],
         output: str | Path) -> list[Job]:
    """Every (method, task) of a benchmark as a Job, in the order asked."""
    if benchmark not in FAMILIES:
        raise ConfigError(f"benchmark {benchmark!r}: expected one of {', '.join(FAMILIES)}")
    family, output = FAMILIES[benchmark], Path(output).expanduser()
    tasks = list(family.tasks) if not tasks else tasks
    check_names("--tasks", tasks, list(family.tasks))
    if not methods:
        raise ConfigError("--methods: name at least one method")
    if any(o.split("=", 1)[0].split(".")[0] == "method" for o in overrides):
        raise ConfigError("--set method=...: the methods are given by --methods")
    check_names("--methods", methods, methods)  # refuses a method listed twice
    return [Job(benchmark, m, t, family.tasks[t], job_config(family, t, m, recipes, overrides, output), output / m / t,
                REUSE_CHOICE.get(m)) for m in methods for t in tasks]


# -- run -----------------------------------------------------------------------------------------------
def read_summary(folder: Path) -> dict | None:
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def summary_differences(summary: dict, job: Job) -> list[str]:
    """Where a finished (method, task)'s records differ from its config: the summary's method, options, data
    and seeds, and, where its final runs are still there, every field that changes a result but the lr and wd
    chosen, the seed and the splits."""
    from .engine.config import as_started
    from .engine.loop import config_differences

    cfg = as_started(job.cfg)
    wanted = {"method": cfg.method, "method_options": cfg.method_options,
              "seeds": [int(s) for s in cfg.protocol.get("seeds", VPT_SEEDS)]}
    normal = lambda value: json.loads(json.dumps(value))  # noqa: E731  tuples and lists alike
    diff = [k for k, v in wanted.items() if normal(summary.get(k)) != normal(v)]
    runs = sorted((job.folder / "final").glob("seed*/results.json"))
    if runs:
        saved = json.loads(runs[0].read_text()).get("config") or {}
        skipped = {"lr", "weight_decay", "seed", "train_split", "eval_split", "test_split"}
        diff += [k for k in config_differences(saved, cfg) if k not in skipped and k not in diff]
    elif {k: v for k, v in normal(summary.get("data") or {}).items() if k not in ("root", "holdout_rule")} != \
            {k: v for k, v in normal(cfg.data).items() if k not in ("root", "holdout_rule")}:
        diff.append("data")  # moved summaries: the data root may be another machine's
    return diff


def finished(job: Job) -> dict | None:
    """The job's summary when it is finished with this config; another config's is refused by name."""
    summary = read_summary(job.folder)
    if summary is None:
        return None
    diff = summary_differences(summary, job)
    if diff:
        raise ConfigError(f"{job.folder / 'summary.json'} is a finished tuning of another config (it differs in "
                          f"{', '.join(diff)}): remove that folder or choose another --output")
    return summary


def record_seconds(folder: Path) -> None:
    """Add the training time the runs logged to a summary.json written before tune recorded it itself."""
    from .engine.checkpoint import atomic_write
    from .engine.study import training_seconds

    summary = read_summary(folder)
    if summary is None or "training_seconds" in summary or not any(folder.rglob("metrics.jsonl")):
        return
    summary["training_seconds"] = round(training_seconds(folder), 3)
    atomic_write(folder / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))


def reused_choice(job: Job) -> dict:
    source = read_summary(job.folder.parent.parent / job.reuse_from / job.task)
    if source is None:
        raise ConfigError(f"{job.method} on {job.task} trains at the lr and wd {job.reuse_from} chose on val, but "
                          f"{job.folder.parent.parent / job.reuse_from / job.task / 'summary.json'} does not exist: "
                          f"add {job.reuse_from} to --methods")
    chosen = source["chosen"]
    return {"lr": chosen["lr"], "weight_decay": chosen["weight_decay"], "from": job.reuse_from,
            "source_val_top1": chosen.get("val_top1")}


def check_data(job: Job) -> None:
    """A task's list files read through its loader (no image opened): a missing task folder or split is said
    before any (method, task) trains, not hours later when its turn comes."""
    from .data import fgvc, vtab_1k
    from .data.fgvc import FGVC_SPLITS
    from .data.vtab import VTAB_SPLITS

    data = job.cfg.data
    if data.get("kind") == "vtab":
        for split in VTAB_SPLITS:
            vtab_1k(data["root"], data["task"], split)
    elif data.get("kind") == "fgvc":
        for split in FGVC_SPLITS:
            fgvc(data["root"], data["dataset"], split)


def check_jobs(jobs: list[Job]) -> None:
    """Every job's input files (recipe paths, weights) and every task's list files, before anything trains."""
    from .engine.config import as_started, check_inputs

    for job in jobs:
        check_inputs(as_started(job.cfg))
    for job in {(j.cfg.data.get("root"), j.task): j for j in jobs}.values():  # each task once
        check_data(job)


def run(jobs: list[Job], *, storage: str | None = None, workers: int = 1, devices: list[str] | None = None,
        pruner: str = "sha", heartbeat: float = 30.0, log=print) -> dict[tuple[str, str], dict]:
    """Tune every job not finished yet; returns the summaries by (method, task). Every job's inputs and list
    files are checked first, so a missing task folder is said before hours of training, not after."""
    from .engine.preemption import Preempted, StopRequest

    check_jobs(jobs)
    jobs = sorted(jobs, key=lambda j: j.method not in REUSE_CHOICE.values())  # whose choice others reuse first
    options = dict(storage=storage, pruner=pruner, heartbeat=heartbeat, workers=workers, devices=devices)
    done = {}
    with StopRequest() as stop:  # a signal that a pair's tuning finished despite: no next pair is started
        for number, job in enumerate(jobs, start=1):
            if stop.requested:
                raise Preempted(f"benchmark stopped by {stop.signal} before {job.method} on {job.task}; every "
                                "finished pair is kept: run the same command again to continue")
            done[(job.method, job.task)] = _run_job(job, f"[{number}/{len(jobs)}]", log, options)
    return done


def _run_job(job: Job, label: str, log, options: dict) -> dict:
    """One (method, task): tuned unless finished; its summary."""
    from .engine.study import tune

    if finished(job) is not None:
        log(f"{label} {job.method} on {job.task}: finished, not touched")
    else:
        log(f"{label} {job.method} on {job.task}: tuning into {job.folder}")
        chosen = reused_choice(job) if job.reuse_from else None
        if chosen is not None:  # a reused choice leaves only the seeds' runs: tune runs those in one process
            options = {k: v for k, v in options.items() if k not in ("workers", "devices")}
        summary = tune(job.cfg, job.folder, chosen=chosen, **options)
        edge = None if chosen else grid_edge_warning(summary["chosen"], job.cfg.protocol.get("lrs", VPT_LRS),
                                                     job.cfg.protocol.get("wds", VPT_WDS))
        if edge:
            warnings.warn(f"{job.method} on {job.task}: {edge}")
    record_seconds(job.folder)
    return read_summary(job.folder)


# -- table ---------------------------------------------------------------------------------------------
def pct(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 6)  # % to 6 places: the records' own figures, not a display


def task_row(job: Job, summary: dict | None, status: str, reference: dict) -> dict:
    """One (method, task): ours in %, the published figure and the difference, the choice and its grid edges."""
    published = reference.get(job.method, {}).get("tasks", {}).get(job.task)
    row = {"method": job.method, "task": job.task, "group": job.group, "status": status,
           "published": published, "source": reference.get(job.method, {}).get("source")}
    if summary is None:
        return row
    lrs, wds = job.cfg.protocol.get("lrs", VPT_LRS), job.cfg.protocol.get("wds", VPT_WDS)
    chosen = summary["chosen"]
    seconds = summary.get("training_seconds")
    row.update(test_mean=pct(summary["test_mean"]), test_std=pct(summary["test_std"]), seeds=len(summary["test_top1"]),
               lr=chosen["lr"], weight_decay=chosen["weight_decay"], val_top1=pct(chosen.get("val_top1")),
               grid_edges=[] if "from" in chosen else grid_edges(chosen, lrs, wds), choice_from=chosen.get("from"),
               tuned=summary["parameters"]["tuned"], tuned_without_head=summary["parameters"].get("tuned_without_head"),
               gpu_hours=None if seconds is None else round(seconds / 3600, 4))
    row["difference"] = None if published is None else round(row["test_mean"] - published, 6)
    return row


def aggregate(rows: list[dict], family: Family, reference: dict) -> dict:
    """A method's group means, mean of groups and plain mean (VTAB-1k's 19-task mean; FGVC's 5-dataset mean),
    each None until every task in it is finished, and the published ones beside them: as published where the
    reference gives them, else computed from the published per-task figures (``published_computed`` names those)."""
    ours = {r["task"]: r.get("test_mean") for r in rows}
    pub = {r["task"]: r["published"] for r in rows}
    ref = reference.get(rows[0]["method"], {}) if rows else {}

    def mean(values):
        return None if not values or any(v is None for v in values) else round(statistics.fmean(values), 6)

    out: dict[str, Any] = {"groups": {}, "published_groups": {}, "published_computed": []}
    for group in family.groups:
        tasks = [t for t in family.tasks if family.tasks[t] == group]
        if not all(t in ours for t in tasks):
            continue  # a group this table does not cover
        out["groups"][group] = mean([ours[t] for t in tasks])
        out["published_groups"][group] = ref.get("groups", {}).get(group, mean([pub[t] for t in tasks]))
        if group not in ref.get("groups", {}) and out["published_groups"][group] is not None:
            out["published_computed"].append(group)
    complete = set(ours) == set(family.tasks)
    out["mean_of_groups"] = out["published_mean_of_groups"] = None
    if family.groups and complete:
        out["mean_of_groups"] = mean(list(out["groups"].values()))
        out["published_mean_of_groups"] = ref.get("mean_of_groups", mean(list(out["published_groups"].values())))
        if "mean_of_groups" not in ref and out["published_mean_of_groups"] is not None:
            out["published_computed"].append("mean of groups")
    out["mean"] = mean(list(ours.values())) if complete else None
    out["published_mean"] = ref.get("mean") if complete else None
    out["finished"] = sum(v is not None for v in ours.values())
    out["task_count"] = len(ours)
    hours = [r.get("gpu_hours") for r in rows if r["status"] == "finished"]
    out["gpu_hours"] = round(sum(h for h in hours if h is not None), 3) if any(h is not None for h in hours) else None
    tuned = [r["tuned_without_head"] for r in rows if r.get("tuned_without_head") is not None]
    out["tuned_without_head_mean"] = round(statistics.fmean(tuned)) if tuned else None
    out["published_params"] = ref.get("params")
    return out


def job_status(job: Job) -> tuple[dict | None, str]:
    """A job's summary and status for the table: finished, unfinished, or another config's (then no numbers)."""
    summary = read_summary(job.folder)
    if summary is None:
        return None, "unfinished"
    diff = summary_differences(summary, job)
    return (None, f"another config's (differs in {', '.join(diff)})") if diff else (summary, "finished")


def table(jobs: list[Job], benchmark: str) -> dict:
    """The table of every job from its summary.json alone (unfinished jobs named so)."""
    family = FAMILIES[benchmark]
    reference = published_reference()["benchmarks"].get(benchmark, {}).get("methods", {})
    methods = list(dict.fromkeys(j.method for j in jobs))
    rows = [task_row(j, *job_status(j), reference) for j in jobs]
    result = {"benchmark": benchmark, "metric": "test top-1 (%), mean and std over seeds", "methods": {}}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        result["methods"][method] = {"tasks": {r["task"]: r for r in mine}, **aggregate(mine, family, reference)}
    sources = {r["source"] for r in rows if r["source"]}
    result["sources"] = {s: published_reference()["sources"][s] for s in sorted(sources)}
    return result


def cell(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def signed(value) -> str:
    return "-" if value is None else f"{value:+.2f}"


def markdown(result: dict) -> str:
    family = FAMILIES[result["benchmark"]]
    lines = [f"# ivpt benchmark {result['benchmark']}", "", f"{result['metric']}; published figures beside ours "
             "(ivpt/reference/published.json), difference = ours - published. `edge`: the chosen lr or wd is the "
             "largest or smallest of its grid (the optimum may lie outside it). hours: the training time the runs "
             "logged (grid points and seeds; GPU-hours when they ran on one GPU each).", ""]
    lines += overview(result, family)
    for method, entry in result["methods"].items():
        lines += ["", f"## {method}", "", "| task | group | ours | published | difference | lr | wd | tuned | hours |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for task, r in entry["tasks"].items():
            if r["status"] != "finished":
                lines.append(f"| {task} | {r['group']} | {r['status']} | {cell(r['published'], 1)} | - | - | - | - | - |")
                continue
            edge = lambda name: " (edge)" if any(e.startswith(name + " ") for e in r["grid_edges"]) else ""  # noqa: E731
            reused = f" ({r['choice_from']}'s)" if r["choice_from"] else ""
            lines.append(f"| {task} | {r['group']} | {cell(r['test_mean'])} ± {cell(r['test_std'])} | "
                         f"{cell(r['published'], 1)} | {signed(r['difference'])} | {r['lr']:g}{edge('lr')}{reused} | "
                         f"{r['weight_decay']:g}{edge('wd')} | {r['tuned']} | {cell(r['gpu_hours'], 3)} |")
    if result["sources"]:
        lines += ["", "Sources of the published figures:"] + [f"- {k}: {v}" for k, v in result["sources"].items()]
    return "\n".join(lines) + "\n"


def mean_columns(family: Family) -> list[str]:
    plain = {"vtab-1k": "19-task mean", "fgvc": "5-dataset mean"}.get(family.name, f"{len(family.tasks)}-task mean")
    return [*family.groups, *(["mean of groups"] if family.groups else []), plain]


def mean_cells(entry: dict, family: Family) -> list[str]:
    """A method's means, each as ``ours (published, difference)`` where a published one exists."""
    ours = [entry["groups"].get(g) for g in family.groups] + [entry["mean_of_groups"]] * bool(family.groups) + [entry["mean"]]
    published = ([entry["published_groups"].get(g) for g in family.groups]
                 + [entry["published_mean_of_groups"]] * bool(family.groups) + [entry["published_mean"]])
    return [cell(o) if o is None or p is None else f"{cell(o)} ({cell(p)}, {signed(o - p)})" for o, p in zip(ours, published)]


def overview(result: dict, family: Family) -> list[str]:
    """One line per method: tasks finished, group means, mean of groups and plain mean, tuned parameters, hours."""
    columns = mean_columns(family)
    lines = ["| method | finished | " + " | ".join(columns) + " | tuned (w/o head) | hours |",
             "|---|---|" + "---|" * len(columns) + "---|---|"]
    for method, e in result["methods"].items():
        tuned = "-" if e["tuned_without_head_mean"] is None else e["tuned_without_head_mean"]
        lines.append(f"| {method} | {e['finished']}/{e['task_count']} | " + " | ".join(mean_cells(e, family))
                     + f" | {tuned} | {cell(e['gpu_hours'], 3)} |")
    lines += ["", "A mean is shown once every task in it is finished."]
    if result["sources"]:
        lines[-1] += (" Means with a published figure read: ours (published, difference). Published group means of "
                      "methods other than full, VPT-shallow and VPT-deep are computed from their published per-task "
                      "figures.")
    return lines


def csv_rows(result: dict) -> list[dict]:
    rows = []
    for method, e in result["methods"].items():
        for r in e["tasks"].values():
            rows.append({k: (";".join(v) if isinstance(v, list) else v) for k, v in r.items()})
        for name, ours, pub in ([(f"mean:{g}", e["groups"].get(g), e["published_groups"].get(g)) for g in e["groups"]]
                                + [("mean of groups", e["mean_of_groups"], e["published_mean_of_groups"]),
                                   ("mean", e["mean"], e["published_mean"])]):
            rows.append({"method": method, "task": name, "status": "aggregate", "test_mean": ours, "published": pub,
                         "difference": None if ours is None or pub is None else round(ours - pub, 6)})
    return rows


def write_table(result: dict, output: Path, log=print) -> None:
    from .engine.checkpoint import atomic_write
    from .tables import write_csv

    output.mkdir(parents=True, exist_ok=True)
    atomic_write(output / "table.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    atomic_write(output / "table.md", lambda tmp: tmp.write_text(markdown(result)))
    write_csv(output / "table.csv", csv_rows(result), first=("method", "task", "group", "status", "test_mean", "test_std",
                                                             "published", "difference"))
    try:
        plot(result, output / "table.png")
    except ImportError:
        log("matplotlib is not installed (pip install 'ivpt[explain]'): table.png not written")


def plot(result: dict, path: Path) -> None:
    """Bars of ours (mean ± std over seeds) per task and method, the published figure as a black tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(t for e in result["methods"].values() for t in e["tasks"]))
    names = list(result["methods"])
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(tasks) * max(1, len(names)) ** 0.5 + 4), 5))
    for i, name in enumerate(names):
        rows = result["methods"][name]["tasks"]
        xs = [j + i * width for j in range(len(tasks))]
        means = [(rows.get(t) or {}).get("test_mean") for t in tasks]
        ax.bar(xs, [m or 0 for m in means], width, yerr=[(rows.get(t) or {}).get("test_std") or 0 for t in tasks],
               label=name, capsize=1)
        pub = [(x, rows[t]["published"]) for x, t in zip(xs, tasks) if t in rows and rows[t]["published"] is not None]
        if pub:
            labelled = "published" in ax.get_legend_handles_labels()[1]
            ax.scatter(*zip(*pub), marker="_", color="black", s=120, zorder=3, label=None if labelled else "published")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"ivpt benchmark {result['benchmark']}: mean ± std over seeds (black: published)")
    ax.legend(fontsize=7, ncol=min(len(names) + 1, 8))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- dry run -------------------------------------------------------------------------------------------
def grid_epochs(points: int, epochs: int, pruner: str) -> int:
    """Epochs the grid stage trains: every point to the end (``none``), or synchronous successive halving's
    rule (``sha``, ivpt tune's default): every point to r = epochs/9, the best third on to 3r, ..., the last
    survivors to the end. asha and hyperband decide as results come in: the full grid bounds them."""
    if pruner != "sha":
        return points * epochs
    alive, total, reached, rung = points, 0, 0, max(1, round(epochs / 9))
    while rung < epochs and alive > 1:
        total += alive * (rung - reached)
        alive, reached, rung = max(1, alive // 3), rung, rung * 3
    return total + alive * (epochs - reached)


def flops_per_image(cfg: TrainConfig, num_classes: int) -> tuple[int, int]:
    """FLOPs of one training step (forward and backward) and of one evaluation forward, per image, counted by
    PyTorch's FlopCounterMode on the recipe's architecture with the method attached (random weights: nothing
    is downloaded, and FLOPs do not depend on the weights)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .factory import create_model

    arch = cfg.backbone.split(".", 1)[0]  # the architecture alone: a shipped or Hub name would load weights
    model = create_model(arch, cfg.method, num_classes, pretrained=False, timm_kwargs=cfg.backbone_options,
                         **cfg.method_options)
    size = model.backbone.patch_embed.img_size
    image = torch.randn(1, 3, *size)
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(image).logsumexp(-1).sum().backward()
    train = counter.get_total_flops()
    model.eval()
    with FlopCounterMode(display=False) as counter:  # grad mode on: its module tracker fails under no_grad
        model(image)
    return train, counter.get_total_flops()


def rewind_count(cfg: TrainConfig) -> int:
    """How many rewinds E2VPT's pruning stage trains for this recipe (0 where it does not prune)."""
    from .engine import pruning
    from .methods import METHODS

    if not pruning.prunes(cfg):
        return 0
    options = METHODS["e2vpt"].config_class(**cfg.method_options)
    token_levels, piece_levels = pruning.levels(cfg, options.prompt_length, options.mask_pieces)
    return len(token_levels) * len(piece_levels)


def job_cost(job: Job, pruner: str, flops: tuple[int, int]) -> dict:
    """One (method, task)'s runs, epochs and FLOPs under the protocol (val after every grid epoch, test once)."""
    family = FAMILIES[job.benchmark]
    train_n, val_n, test_n = family.sizes[job.task]
    lrs, wds = job.cfg.protocol.get("lrs", VPT_LRS), job.cfg.protocol.get("wds", VPT_WDS)
    seeds = job.cfg.protocol.get("seeds", VPT_SEEDS)
    points = 0 if job.reuse_from else len(lrs) * len(wds)
    grid = grid_epochs(points, job.cfg.epochs, pruner)
    final = len(seeds) * job.cfg.epochs
    rewinds = rewind_count(job.cfg)
    rewind = rewinds * job.cfg.epochs + bool(rewinds)  # E2VPT's rewinds (train -> val) and its one scoring pass
    train_flops, eval_flops = flops
    total = ((grid + rewind) * (train_n * train_flops + val_n * eval_flops) + final * (train_n + val_n) * train_flops
             + len(seeds) * test_n * eval_flops)
    return {"method": job.method, "task": job.task, "runs": points + rewinds + len(seeds), "grid_points": points,
            "seeds": len(seeds), "epochs": grid + rewind + final, "grid_epochs": grid, "rewind_epochs": rewind,
            "final_epochs": final, "flops": total,
            "train_gflops_per_image": round(train_flops / 1e9, 3), "finished": read_summary(job.folder) is not None}


def estimate(jobs: list[Job], pruner: str = "sha", tflops: float = ASSUMED_TFLOPS) -> dict:
    """The dry run: every job's cost, each distinct model measured once; GPU-hours = FLOPs / assumed throughput."""
    measured: dict[str, tuple[int, int]] = {}
    rows = []
    for job in jobs:
        key = json.dumps([job.cfg.backbone, job.cfg.backbone_options, job.cfg.method, job.cfg.method_options],
                         sort_keys=True, default=str)
        if key not in measured:  # a 100-class head for every task: a head is under 0.01% of ViT-B's FLOPs
            measured[key] = flops_per_image(job.cfg, 100)
        rows.append(job_cost(job, pruner, measured[key]))
    for row in rows:
        row["gpu_hours"] = round(row["flops"] / (tflops * 1e12) / 3600, 3)
    return {"pruner": pruner, "assumed_tflops": tflops, "jobs": rows,
            "runs": sum(r["runs"] for r in rows), "epochs": sum(r["epochs"] for r in rows),
            "gpu_hours": round(sum(r["gpu_hours"] for r in rows), 2),
            "left_gpu_hours": round(sum(r["gpu_hours"] for r in rows if not r["finished"]), 2)}


def plan_text(result: dict, jobs: list[Job]) -> str:
    """The dry run as printed: per method, then the total, and the assumption behind the hours."""
    lines = [f"{'method':<12} {'tasks':>5} {'runs':>6} {'epochs':>8} {'GFLOPs/img':>12} {'GPU-h':>8}  backbone"]
    for method in dict.fromkeys(r["method"] for r in result["jobs"]):
        rows = [r for r in result["jobs"] if r["method"] == method]
        backbone = next(j.cfg.backbone for j in jobs if j.method == method)
        gflops = sorted({r["train_gflops_per_image"] for r in rows})
        shown = f"{gflops[0]:.1f}" if gflops[-1] - gflops[0] < 0.05 else f"{gflops[0]:.1f}-{gflops[-1]:.1f}"
        lines.append(f"{method:<12} {len(rows):>5} {sum(r['runs'] for r in rows):>6} {sum(r['epochs'] for r in rows):>8} "
                     f"{shown:>12} {sum(r['gpu_hours'] for r in rows):>8.1f}  {backbone}")
    lines.append(f"{'total':<12} {len(result['jobs']):>5} {result['runs']:>6} {result['epochs']:>8} {'':>12} "
                 f"{result['gpu_hours']:>8.1f}  ({result['left_gpu_hours']:.1f} left: finished pairs are not trained again)")
    lines.append(f"GFLOPs/img: one training step (forward + backward) per image, measured with "
                 f"torch.utils.flop_counter on the architecture with the method attached (prompt lengths vary by task). "
                 f"Epochs: grid stage with --pruner {result['pruner']} (and E2VPT's rewinds) plus the seeds' runs; val after every grid "
                 f"epoch and test once per seed are counted. GPU-h = FLOPs / {result['assumed_tflops']:g} TFLOP/s, an "
                 f"assumed sustained throughput of one GPU on fp32 recipes (not a measurement; --tflops sets yours); "
                 f"data loading is not counted.")
    return "\n".join(lines)
