"""VPT's protocol on Optuna: one study per stage, any number of workers and machines, pruning, retries.

The grid stage (lr x wd on train -> val) is an Optuna study with a GridSampler over the recipe's
grid; the final stage (one run per seed on train+val -> test, at the chosen lr and wd) is another.
Studies live in ``--storage`` (default: SQLite in the output folder; any RDB URL such as
PostgreSQL, or ``journal:PATH`` for Optuna's journal file on a shared filesystem), so every process
that runs the same command joins the same studies. Each trial trains one run folder with
``train(..., resume=True)``: a finished run is never trained again (its results.json is read), an
interrupted one resumes from its own checkpoint. Workers send heartbeats; a trial whose worker died
(SIGKILL, a lost node) is marked failed after the grace period and retried by whoever runs next.
With a pruner (``sha``: successive halving, default; ``hyperband``) grid points report val at every
epoch and the weaker ones stop early; survivors train to the end exactly as an unpruned run of the
same config (same schedule). ``none`` trains the full grid: the same choice as before.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

from ..extras import require
from .checkpoint import atomic_write
from .config import ConfigError, TrainConfig
from .protocol import VPT_LRS, VPT_SEEDS, VPT_WDS, _check_finals, choose, final_jobs, grid_jobs
from .runlock import RunLockedError

PRUNERS = ("none", "sha", "hyperband")


def _done(run: Path) -> dict | None:
    path = run / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def study_key(cfg: TrainConfig) -> str:
    """What makes two tuning runs the same protocol stage: every result field but lr, wd, seed and output."""
    fields = {k: v for k, v in cfg.to_dict().items()
              if k not in ("lr", "weight_decay", "seed", "output", "device", "workers", "threads", "compile", "cache",
                           "train_split", "eval_split", "test_split", "eval_every")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_storage(url: str | None, out: Path, heartbeat: float):
    optuna = require("optuna", "ivpt tune")
    url = url or f"sqlite:///{(out / 'study.db').resolve()}"
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):]))
        with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
            warnings.simplefilter("ignore")
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=5)
            return optuna.storages.RDBStorage(url, heartbeat_interval=max(1, int(heartbeat)),
                                              grace_period=max(2, int(2 * heartbeat)),
                                              heartbeat_stale_trial_callback=retry)
    except Exception as err:  # sqlalchemy's and optuna's errors alike: name the field
        raise ConfigError(f"--storage {url!r}: cannot open it as an Optuna storage ({type(err).__name__}: {err}); "
                          "expected e.g. sqlite:///PATH, postgresql://USER@HOST/DB or journal:PATH") from None


def _pruner(name: str, epochs: int):
    import optuna

    if name not in PRUNERS:
        raise ConfigError(f"--pruner {name!r}: expected one of {', '.join(PRUNERS)}")
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "sha":  # rungs at r, 3r, 9r, ... epochs; the best third of each rung goes on
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, round(epochs / 9)), reduction_factor=3)
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)


def _objective(jobs: dict, space: dict[str, list], split: str, report: bool):
    """One trial = one run folder, trained (or resumed, or read back) by this worker."""
    import optuna

    from .loop import train

    def objective(trial):
        if not trial._fixed_params:  # Optuna's queued values (no public accessor on a live Trial)
            raise _NotQueued("no queued point left for this trial")
        point = tuple(trial.suggest_categorical(name, space[name]) for name in sorted(space))  # the queued values
        run, cfg = jobs[point]
        trial.set_user_attr("run", str(run))

        def on_epoch(entry):  # val after every epoch: the pruner's rungs
            value = next((v for k, v in entry.items() if k.startswith(f"{cfg.eval_split}_") and k != f"{cfg.eval_split}_loss"), None)
            if report:  # kept in the study: a pruned run's epochs count even when its folder is gone
                trial.set_user_attr("epochs", entry["epoch"])
            if report and value is not None:
                trial.report(value, entry["epoch"])
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {entry['epoch']} (val {value:.4f})")

        while True:
            done = _done(run)
            if done is not None:  # finished earlier (by anyone): never trained again, if it is this run
                _check_same_run(run, done, cfg)
                return done[split][done.get("primary_metric", "top1")]
            try:
                train(cfg, resume=True, quiet=True, on_epoch=on_epoch)
            except RunLockedError:  # another worker trains this run (a duplicate trial): wait for its result
                time.sleep(2)
    return objective


def _check_same_run(run: Path, done: dict, cfg: TrainConfig) -> None:
    """A results.json left by another recipe in the same folder must not stand in for this run."""
    from .checkpoint import CheckpointError
    from .loop import config_differences

    diff = config_differences(done.get("config") or {}, cfg)
    if diff:
        raise CheckpointError(f"{run / 'results.json'} is a finished run of another config (it differs in "
                              f"{', '.join(diff)}): remove that folder or choose another output")


class _NotQueued(Exception):
    """A trial that did not come from the stage's queue (two workers raced for its last point)."""


def run_stage(name: str, storage, space: dict[str, list], jobs: dict, split: str, pruner, workers_here: bool,
              heartbeat: float) -> list:
    """Work on one stage until every grid point is complete or pruned; returns its finished trials.

    Every point is enqueued once as a trial with fixed parameters; a worker only takes queued trials
    (Optuna pops each for one worker), so no point is trained twice; a dead worker's trial is failed
    by its stale heartbeat and queued again, and points failed beyond the retries are queued anew.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                pruner=pruner)
    objective = _objective(jobs, space, split, report=not isinstance(pruner, optuna.pruners.NopPruner))
    states = optuna.trial.TrialState
    names = sorted(space)

    def point(trial):
        return tuple(trial.params.get(n, trial.system_attrs.get("fixed_params", {}).get(n)) for n in names)

    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)  # trials of dead workers: failed, then queued again
        trials = study.get_trials(deepcopy=False)
        finished = {point(t) for t in trials if t.state in (states.COMPLETE, states.PRUNED)}
        if set(jobs) <= finished:
            return [t for t in trials if t.state in (states.COMPLETE, states.PRUNED)]
        pending = {point(t) for t in trials if t.state in (states.WAITING, states.RUNNING)}
        for missing in sorted(set(jobs) - finished - pending):
            study.enqueue_trial(dict(zip(names, missing)))
        if workers_here and any(t.state == states.WAITING for t in study.get_trials(deepcopy=False)):
            study.optimize(objective, n_trials=1, catch=(_NotQueued,))
            continue
        time.sleep(max(1.0, heartbeat / 2))  # others' trials are running: wait for them (or for their heartbeats)


def tune_study(cfg: TrainConfig, out: Path, *, storage: str | None = None, pruner: str = "sha",
               heartbeat: float = 30.0, workers_here: bool = True, chosen: dict | None = None) -> dict[str, Any]:
    """The grid stage, the choice and the final stage; the summary ``ivpt tune`` writes."""
    out.mkdir(parents=True, exist_ok=True)
    store = open_storage(storage, out, heartbeat)
    key = study_key(cfg)
    lrs, wds = cfg.protocol.get("lrs", VPT_LRS), cfg.protocol.get("wds", VPT_WDS)
    grid_results = []
    if chosen is None:
        grid = {(float(lr), float(wd)): job for (lr, wd), job in zip([(lr, wd) for lr in lrs for wd in wds],
                                                                       grid_jobs(cfg, out))}
        # params sorted by name: "lr" < "wd"
        trials = run_stage(f"grid-{key}", store, {"lr": [float(v) for v in lrs], "wd": [float(v) for v in wds]},
                           grid, "val", _pruner(pruner, cfg.epochs), workers_here, heartbeat)
        complete = [_done(grid[(t.params["lr"], t.params["wd"])][0]) for t in trials if t.state.name == "COMPLETE"]
        grid_results = [r for r in complete if r is not None]
        choice = choose(grid_results)
        pruned = sum(t.state.name == "PRUNED" for t in trials)
    else:
        choice, pruned = dict(chosen), 0
    seeds = [int(s) for s in cfg.protocol.get("seeds", VPT_SEEDS)]
    finals = {(seed,): job for seed, job in zip(seeds, final_jobs(cfg, out, choice["lr"], choice["weight_decay"]))}
    _check_finals(list(finals.values()), choice)
    import optuna

    run_stage(f"final-{key}-lr{choice['lr']:g}-wd{choice['weight_decay']:g}", store, {"seed": seeds}, finals,
              "test", optuna.pruners.NopPruner(), workers_here, heartbeat)
    final_results = [_done(run) for run, _ in finals.values()]
    metric = final_results[0].get("primary_metric", "top1")
    tests = [r["test"][metric] for r in final_results]
    recorded = {t.user_attrs.get("run"): t.user_attrs.get("epochs", 0) for t in (trials if chosen is None else [])}
    epochs_trained = sum(len((_done(run) or {}).get("log", [])) or _checkpoint_epochs(run) or recorded.get(str(run), 0)
                         for run, _ in list(grid.values() if chosen is None else []) + list(finals.values()))
    summary = {
        "data": cfg.data, "method": cfg.method, "method_options": cfg.method_options, "metric": metric,
        "grid": [{"lr": r["config"]["lr"], "weight_decay": r["config"]["weight_decay"], "val_top1": r["val"][metric]}
                 for r in grid_results],
        "pruner": pruner, "pruned": pruned, "epochs_trained": epochs_trained,
        "chosen": choice, "seeds": [r["config"]["seed"] for r in final_results], "test_top1": tests,
        "test_mean": statistics.fmean(tests), "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
        "parameters": final_results[0]["parameters"],
    }
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    return summary


def _checkpoint_epochs(run: Path) -> int:
    meta = run / "checkpoint.json"
    if not meta.is_file():
        return 0
    try:
        return int(json.loads(meta.read_text()).get("epoch", 0))
    except (ValueError, OSError):
        return 0


def worker_main(cfg_dict: dict, out: str, storage: str | None, pruner: str, heartbeat: float, device: str | None,
                workers: int = 1):
    """A ``--workers`` process: pinned to one device when given, then the same stages as the main process."""
    os.environ.setdefault("IVPT_PROCESSES", str(workers))  # the workers here divide the cores
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    cfg = TrainConfig(**cfg_dict)
    if device is not None:
        cfg = dataclasses.replace(cfg, device="cuda:0")
    tune_study(cfg, Path(out), storage=storage, pruner=pruner, heartbeat=heartbeat)


def tune(cfg: TrainConfig, output: str | Path, *, storage: str | None = None, workers: int = 1,
         devices: list[str] | None = None, pruner: str = "sha", heartbeat: float = 30.0,
         chosen: dict | None = None) -> dict[str, Any]:
    """The protocol on Optuna (ivpt.engine.study): grid on train -> val, choice, seeds on train+val -> test.

    workers: processes started here (each pinned to one of ``devices`` in turn, on a GPU machine);
    processes on other machines join by running the same command with the same ``storage``.
    ``chosen`` ({"lr", "weight_decay"}) skips the grid: e.g. an ablation reusing its method's choice.
    """
    out = Path(output)
    if workers < 1:
        raise ValueError(f"--workers {workers}: expected at least 1")
    if devices:
        import torch

        available = torch.cuda.device_count()
        bad = [d for d in devices if not d.isdigit() or int(d) >= available]
        if bad:
            raise ValueError(f"--devices: device {bad[0]!r} does not exist here ({available} CUDA device(s))")
    if workers == 1 and not devices:
        return tune_study(cfg, out, storage=storage, pruner=pruner, heartbeat=heartbeat, chosen=chosen)
    if chosen is not None:
        raise ValueError("a given choice (chosen=) runs in one process; drop --workers")
    import multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    open_storage(storage, out, heartbeat)  # a bad --storage fails here, once, not in every worker
    context = mp.get_context("spawn")
    procs = [context.Process(target=worker_main, args=(cfg.to_dict(), str(out), storage, pruner, heartbeat,
                                                       devices[i % len(devices)] if devices else None, workers))
             for i in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        raise RuntimeError(f"{len(failed)} of {workers} tuning workers failed (exit {failed[0]}); run the same "
                           "command again to finish what is missing")
    return json.loads((out / "summary.json").read_text())
