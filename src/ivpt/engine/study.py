"""VPT's protocol on Optuna: one study per stage, any number of workers and machines, pruning, retries.

The grid stage (lr x wd on train -> val) is an Optuna study whose trials are the recipe's grid
points, each enqueued with fixed values; the final stage (one run per seed on train+val -> test, at
the chosen lr and wd) is another.
Studies live in ``--storage`` (default: SQLite in the output folder; any RDB URL such as
PostgreSQL, or ``journal:PATH`` for Optuna's journal file on a shared filesystem), so every process
that runs the same command joins the same studies. Each trial trains one run folder with
``train(..., resume=True)``: a finished run is never trained again (its results.json is read), an
interrupted one resumes from its own checkpoint. Workers send heartbeats; a trial whose worker died
(SIGKILL, a lost node) is marked failed after the grace period and retried by whoever runs next.
Pruners: ``sha`` (default) is synchronous successive halving on the grid: every point trains to the
first rung (r epochs, r = epochs / 9), the best third goes on to 3r, ..., and the last survivors train
to the end; between rungs a run waits at its checkpoint and resumes from it, so a survivor equals an
unpruned run of its config (same schedule). A rung is a stage of its own, so workers anywhere share
it. ``asha`` is Optuna's asynchronous successive halving (a point is judged against the points that
reached its rung before it: no waiting, but with few points and few workers most go on) and
``hyperband`` Optuna's Hyperband. ``none`` trains the full grid: the same choice as before.
"""
from __future__ import annotations

import dataclasses
import functools
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
from ..card import as_typed
from .config import NOT_RESULT_FIELDS, ConfigError, TrainConfig, as_started, check_inputs
from .protocol import VPT_LRS, VPT_SEEDS, VPT_WDS, check_finals, choose, final_jobs, grid_jobs
from .runlock import RunLockedError

PRUNERS = ("none", "sha", "asha", "hyperband")
ETA = 3  # successive halving's reduction factor: the best third of a rung goes on


def _done(run: Path) -> dict | None:
    path = run / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def study_key(cfg: TrainConfig) -> str:
    """What makes two tuning runs the same protocol stage: every result field but lr, wd, seed and output,
    with paths as typed (so that workers in other directories, or on machines that mount the data
    elsewhere, join the same study)."""
    fields = {k: v for k, v in as_typed(cfg.to_dict()).items()
              if k not in (*NOT_RESULT_FIELDS, "lr", "weight_decay", "seed", "train_split", "eval_split", "test_split")}
    data = fields.get("data")
    if isinstance(data, dict) and data.get("holdout_rule") == 1:  # studies from before the field keep their keys
        fields["data"] = {k: v for k, v in data.items() if k != "holdout_rule"}
    if cfg.seed != TrainConfig.seed:  # the grid runs' seed; left out at its default, so earlier studies keep their keys
        fields["grid_seed"] = cfg.seed
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_storage(url: str | None, out: Path, heartbeat: float):
    optuna = require("optuna", "ivpt tune")
    url = url or f"sqlite:///{(out / 'study.db').resolve()}"
    for prefix in ("sqlite:///", "journal:"):  # a file path inside the URL: ~ as everywhere else
        if url.startswith(prefix + "~"):
            url = prefix + os.path.expanduser(url[len(prefix):])
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):]))
        # No retry callback: Optuna's copies the dead trial's attributes (its run, its rung values) into
        # the retry, which then counts twice at the pruner's rungs and, named a run before its worker
        # started, could never be told dead; run_stage queues the failed point anew as a clean trial.
        with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
            warnings.simplefilter("ignore")
            return optuna.storages.RDBStorage(url, heartbeat_interval=max(1, int(heartbeat)),
                                              grace_period=max(2, int(2 * heartbeat)))
    except Exception as err:  # sqlalchemy's and optuna's errors alike: name the field
        raise ConfigError(f"--storage {url!r}: cannot open it as an Optuna storage ({type(err).__name__}: {err}); "
                          "expected e.g. sqlite:///PATH, postgresql://USER@HOST/DB or journal:PATH") from None


def rung_epochs(epochs: int) -> list[int]:
    """Successive halving's rungs: r, 3r, 9r, ... epochs before the schedule's end (r = epochs / 9, at least 1)."""
    rung, rungs = max(1, round(epochs / ETA ** 2)), []
    while rung < epochs:
        rungs.append(rung)
        rung *= ETA
    return rungs


def _pruner(name: str, epochs: int):
    """The Optuna pruner of the grid stage's trials (synchronous ``sha`` prunes between stages: none here)."""
    import optuna

    if name not in PRUNERS:
        raise ConfigError(f"--pruner {name!r}: expected one of {', '.join(PRUNERS)}")
    if name in ("none", "sha"):
        return optuna.pruners.NopPruner()
    if name in ("asha", "hyperband") and epochs < 2:
        raise ConfigError(f"--pruner {name}: epochs {epochs} leaves no rung to prune at; use --pruner none")
    if name == "asha":  # the same rungs as sha; a point goes on if it is in the best third of those already there
        return _live_pruner(optuna.pruners.SuccessiveHalvingPruner)(min_resource=rung_epochs(epochs)[0], reduction_factor=ETA)
    return _live_pruner(optuna.pruners.HyperbandPruner)(min_resource=1, max_resource=epochs, reduction_factor=ETA)


def pruner_rungs(name: str, epochs: int) -> list[int]:
    """The epochs at which a pruner judges a grid point (so val must be scored there)."""
    if name in ("sha", "asha"):
        return rung_epochs(epochs)
    if name == "hyperband":  # its brackets start at 1, 3, 9, ... epochs
        return [ETA ** k for k in range(epochs) if ETA ** k < epochs]
    return []


class _LiveTrialsStorage:
    """A view of an Optuna storage without its failed trials, for the pruners.

    Optuna's pruners rank a trial against every trial's rung values, failed ones included; a dead
    worker's failed attempt keeps its values and the point's new trial reports them again (it replays
    the run's log), so the point would count twice at every rung it had passed.
    """

    def __init__(self, storage):
        self._storage = storage

    def __getattr__(self, name):
        return getattr(self._storage, name)

    def get_all_trials(self, study_id, deepcopy=True, states=None):
        import optuna

        return [t for t in self._storage.get_all_trials(study_id, deepcopy=deepcopy, states=states)
                if t.state != optuna.trial.TrialState.FAIL]


def _without_failed_trials(study):
    import optuna

    return optuna.Study(study.study_name, _LiveTrialsStorage(study._storage), sampler=study.sampler,
                        pruner=study.pruner)


def _live_pruner(base):
    class Live(base):
        def prune(self, study, trial):
            return super().prune(_without_failed_trials(study), trial)

    Live.__name__ = Live.__qualname__ = f"Live{base.__name__}"
    return Live


def _entry_value(entry: dict, split: str) -> float | None:
    """An epoch's primary score on ``split`` (top-1 or mIoU) in a run's log entry."""
    return next((v for k, v in entry.items() if k.startswith(f"{split}_") and k != f"{split}_loss"), None)


class _RungReached(Exception):
    """A run paused at its rung (its checkpoint kept): the epoch's val score, for the ranking."""

    def __init__(self, value: float):
        super().__init__(value)
        self.value = value


def _objective(jobs: dict, space: dict[str, list], split: str, report: bool, stop_at: int | None = None):
    """One trial = one run folder, trained (or resumed, or read back) by this worker.

    stop_at: train only to that epoch (a rung of synchronous successive halving) and return its val
    score; the run stays at its checkpoint, from which the next rung resumes it.
    """
    import optuna

    from .loop import train

    names = sorted(space)

    def objective(trial):
        objective.current, objective.failed = trial.number, None
        try:
            return run_trial(trial)
        except BaseException as err:  # kept: run_stage tells this worker's errors from Optuna's own
            objective.failed = err
            raise

    def run_trial(trial):
        if not trial._fixed_params:  # Optuna's queued values (no public accessor on a live Trial)
            raise _NotQueued("no queued point left for this trial")
        point = tuple(trial.suggest_categorical(name, space[name]) for name in names)  # the queued values
        twin = _taken_by(trial, point, names)
        if twin is not None:
            trial.set_user_attr("duplicate_of", twin)
            raise _NotQueued(f"point {point} is trial {twin}'s (enqueued twice by racing workers)")
        run, cfg = jobs[point]
        trial.set_user_attr("run", str(run))

        def on_epoch(entry):  # val after every epoch: the pruner's rungs
            value = _entry_value(entry, cfg.eval_split)
            if report or stop_at:  # kept in the study: a pruned run's epochs count even when its folder is gone
                trial.set_user_attr("epochs", entry["epoch"])
            if stop_at is not None and entry["epoch"] >= stop_at:  # also while a resumed run replays its log
                raise _RungReached(_rung_value(entry, cfg.eval_split, stop_at, run))
            if report and value is not None:
                trial.report(value, entry["epoch"])
                # the last epoch is trained already: a run that reached it completes, it is not pruned
                if entry["epoch"] < cfg.epochs and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {entry['epoch']} (val {value:.4f})")

        while True:
            done = _done(run)
            if done is not None:  # finished earlier (by anyone): never trained again, if it is this run
                _check_same_run(run, done, cfg)
                if stop_at is not None:
                    return _rung_value(next(e for e in done["log"] if e["epoch"] == stop_at), cfg.eval_split, stop_at, run)
                return done[split][done.get("primary_metric", "top1")]
            try:
                train(cfg, resume=True, quiet=True, on_epoch=on_epoch)
            except _RungReached as reached:
                return reached.value
            except RunLockedError:  # another worker trains this run (a duplicate trial): wait for its result
                time.sleep(2)
    objective.current = objective.failed = None
    return objective


def _rung_value(entry: dict, split: str, epoch: int, run: Path) -> float:
    value = _entry_value(entry, split)
    if value is None:
        raise ConfigError(f"{run}: no {split} score at epoch {epoch}, a rung of successive halving; "
                          "set eval_every to 1 (or a divisor of every rung) or use --pruner none")
    return value


def _check_same_run(run: Path, done: dict, cfg: TrainConfig) -> None:
    """A results.json left by another recipe in the same folder must not stand in for this run."""
    from .checkpoint import CheckpointError
    from .loop import config_differences, resume_hint

    diff = config_differences(done.get("config") or {}, cfg)
    if diff:
        raise CheckpointError(f"{run / 'results.json'} is a finished run of another config (it differs in "
                              f"{', '.join(diff)}): remove that folder or choose another output"
                              + resume_hint(done.get("config") or {}, diff))


def _fail_orphans(study, grace: float, seen: dict[int, float]) -> None:
    """Fail the running trials of dead workers that no heartbeat can tell of.

    On a storage without heartbeats (Optuna's journal file) a trial is alive while its run folder's
    lock is held (ivpt.engine.runlock: a kernel lock that dies with its process) or while this worker
    has seen it running for less than ``grace`` seconds (popped, not yet training). A live trial misjudged
    in the instant between its training and its report only loses its bookkeeping: its retry finds the
    run's results.json.
    On an RDB storage heartbeats judge every trial that got as far as naming its run (the objective
    runs inside Optuna's heartbeat thread); one popped by a worker killed before that has no heartbeat
    that could go stale, and would hold its point, and the stage, forever: it is failed after ``grace``.
    Age is measured on this worker's own monotonic clock from when it first saw the trial running
    (``seen``: trial number -> that moment, kept by the caller across calls), never from the trial's
    start time: Optuna stamps that in the popping machine's local time, and another machine's clock or
    time zone would make a trial just popped there look hours old here.
    """
    import optuna

    from .runlock import RunLock

    # Optuna wraps an RDBStorage in a cache; asking for its heartbeat interval sees through that
    heartbeats = getattr(study._storage, "get_heartbeat_interval", lambda: None)() is not None
    now = time.monotonic()
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for number in set(seen) - {t.number for t in running}:
        del seen[number]  # finished or failed meanwhile
    for trial in running:
        if now - seen.setdefault(trial.number, now) < grace:
            continue
        run = trial.user_attrs.get("run")
        if run is not None:
            if heartbeats:
                continue  # fail_stale_trials judges it by its heartbeat (the run folder may be on another machine)
            try:
                RunLock(run).acquire().release()
            except RunLockedError:
                continue  # its worker (or another trial of the same point) trains it now
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)  # run_stage queues it anew


def _taken_over(study, number: int | None) -> bool:
    """Whether this worker's trial was finished by someone else (failed as stale) while it ran."""
    import optuna

    if number is None:
        return False
    return study.get_trials(deepcopy=False)[number].state != optuna.trial.TrialState.RUNNING


class _NotQueued(Exception):
    """A trial that did not come from the stage's queue, or whose point another trial holds (two workers
    raced for the last point, or enqueued the same missing point at once)."""


def _trial_point(trial, names: list[str]) -> tuple:
    """A trial's grid point: its parameters, or the queued ones while it has not suggested them yet."""
    fixed = trial.system_attrs.get("fixed_params", {})
    return tuple(trial.params.get(n, fixed.get(n)) for n in names)


def _taken_by(trial, point: tuple, names: list[str]) -> int | None:
    """The number of another trial that holds ``point``: finished, or running with a smaller number.

    Popping a queued trial is atomic in Optuna's storages, but two workers that see the same point
    missing both enqueue it. Of two running copies the older one trains and the younger steps aside;
    whichever looks second sees the other running (or done), so exactly one of them goes on.
    """
    import optuna

    states = optuna.trial.TrialState
    for other in trial.study.get_trials(deepcopy=False, states=(states.RUNNING, states.COMPLETE, states.PRUNED)):
        if other.number == trial.number or _trial_point(other, names) != point:
            continue
        if other.state != states.RUNNING or other.number < trial.number:
            return other.number
    return None


def run_stage(name: str, storage, space: dict[str, list], jobs: dict, split: str, pruner, workers_here: bool,
              heartbeat: float, stop_at: int | None = None, pruner_name: str | None = None) -> list:
    """Work on one stage until every grid point is complete or pruned; returns its finished trials.

    Every point is enqueued once as a trial with fixed parameters; a worker only takes queued trials
    (Optuna pops each for one worker), so no point is trained twice; a dead worker's trial is failed
    by its stale heartbeat (or, without heartbeats, by _fail_orphans) and its point queued anew.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial: ivpt says why, once (not Optuna beside it)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                pruner=pruner)
    if pruner_name is not None:  # a stage pruned one way is not finished by another: its pruned points differ
        _same_setting(study, "pruner", pruner_name)
    # Every worker judges the others' liveness by its own --heartbeat: one study, one heartbeat
    _same_setting(study, "heartbeat", float(heartbeat))
    objective = _objective(jobs, space, split, report=not isinstance(pruner, optuna.pruners.NopPruner), stop_at=stop_at)
    states = optuna.trial.TrialState
    names = sorted(space)
    point = functools.partial(_trial_point, names=names)

    first_seen_running: dict[int, float] = {}
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)  # trials of dead workers: failed (queued anew below)
        _fail_orphans(study, 2 * heartbeat, first_seen_running)
        trials = study.get_trials(deepcopy=False)
        finished = {point(t) for t in trials if t.state in (states.COMPLETE, states.PRUNED)}
        if set(jobs) <= finished:
            return [t for t in trials if t.state in (states.COMPLETE, states.PRUNED)]
        pending = {point(t) for t in trials if t.state in (states.WAITING, states.RUNNING)}
        for missing in sorted(set(jobs) - finished - pending):
            study.enqueue_trial(dict(zip(names, missing)))
        if workers_here and any(t.state == states.WAITING for t in study.get_trials(deepcopy=False)):
            try:
                study.optimize(objective, n_trials=1, catch=(_NotQueued,))
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as err:
                # Optuna's refusal to update or tell a trial another worker failed; not the run's own errors
                from_optuna = err is not objective.failed or isinstance(err, optuna.exceptions.UpdateFinishedTrialError)
                if not (from_optuna and _taken_over(study, objective.current)):
                    raise
                warnings.warn(f"trial {objective.current} of {name} was failed by another worker while this one "
                              f"ran it (a late heartbeat?); its retry reads the run back ({err})")
            continue
        time.sleep(max(1.0, heartbeat / 2))  # others' trials are running: wait for them (or for their heartbeats)


def _same_setting(study, option: str, value) -> None:
    """A setting every worker of a study must share: recorded by the first, refused when another differs."""
    used = study.user_attrs.get(option)
    if used is None:
        study.set_user_attr(option, value)
    elif used != value:
        shown = (lambda v: f"{v:g}") if isinstance(value, float) else str
        raise ConfigError(f"--{option} {shown(value)}: the study {study.study_name!r} in this storage was run with "
                          f"--{option} {shown(used)}; use that, or another --output / --storage")


def successive_halving(key: str, storage, space: dict[str, list], grid: dict, epochs: int, workers_here: bool,
                       heartbeat: float) -> tuple[list, int, dict[str, int]]:
    """Synchronous successive halving on the grid; returns the last stage's trials, the points pruned and
    the epochs each run trained as the study recorded them.

    Rung k is a stage: every surviving point trains to that rung's epoch and pauses at its checkpoint;
    the best third by val (ties as the choice: the smaller lr, then the larger wd) goes on. Once one
    point is left, or the rungs are done, the survivors train to the end in the stage ``sha-KEY-end``.
    """
    import optuna

    survivors, recorded = sorted(grid), {}
    for rung in rung_epochs(epochs):
        if len(survivors) <= 1:
            break
        trials = run_stage(f"sha-{key}-epoch{rung}", storage, space, {p: grid[p] for p in survivors}, "val",
                           optuna.pruners.NopPruner(), workers_here, heartbeat, stop_at=rung)
        value = {(t.params["lr"], t.params["wd"]): t.value for t in trials}
        for t in trials:
            run = t.user_attrs.get("run")
            recorded[run] = max(recorded.get(run, 0), t.user_attrs.get("epochs", 0))
        ranked = sorted(survivors, key=lambda p: (-round(value[p], 6), p[0], -p[1]))
        survivors = sorted(ranked[:max(1, len(ranked) // ETA)])
    trials = run_stage(f"sha-{key}-end", storage, space, {p: grid[p] for p in survivors}, "val",
                       optuna.pruners.NopPruner(), workers_here, heartbeat)
    return trials, len(grid) - len(survivors), recorded


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
        space = {"lr": [float(v) for v in lrs], "wd": [float(v) for v in wds]}  # params sorted by name: "lr" < "wd"
        optuna_pruner = _pruner(pruner, cfg.epochs)
        rungs = pruner_rungs(pruner, cfg.epochs)
        if rungs and (not cfg.eval_every or any(r % cfg.eval_every for r in rungs)):
            raise ConfigError(f"eval_every {cfg.eval_every}: --pruner {pruner} judges the grid points on val at "
                              f"epochs {rungs}; set eval_every to 1 or use --pruner none")
        if pruner == "sha":
            trials, pruned, recorded = successive_halving(key, store, space, grid, cfg.epochs, workers_here, heartbeat)
        else:
            trials = run_stage(f"grid-{key}", store, space, grid, "val", optuna_pruner, workers_here, heartbeat,
                               pruner_name=pruner)
            pruned = sum(t.state.name == "PRUNED" for t in trials)
            recorded = {t.user_attrs.get("run"): t.user_attrs.get("epochs", 0) for t in trials}
        grid_results = _finished_runs([grid[(t.params["lr"], t.params["wd"])][0] for t in trials
                                       if t.state.name == "COMPLETE"], out)
        choice = choose(grid_results)
    else:
        choice, pruned, recorded = dict(chosen), 0, {}
    seeds = [int(s) for s in cfg.protocol.get("seeds", VPT_SEEDS)]
    finals = {(seed,): job for seed, job in zip(seeds, final_jobs(cfg, out, choice["lr"], choice["weight_decay"]))}
    check_finals(list(finals.values()), choice)
    import optuna

    run_stage(f"final-{key}-lr{choice['lr']:g}-wd{choice['weight_decay']:g}", store, {"seed": seeds}, finals,
              "test", optuna.pruners.NopPruner(), workers_here, heartbeat)
    final_results = _finished_runs([run for run, _ in finals.values()], out)
    metric = final_results[0].get("primary_metric", "top1")
    tests = [r["test"][metric] for r in final_results]
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


def _finished_runs(runs: list[Path], out: Path) -> list[dict]:
    """The results of runs their study counts as finished; a study shared by outputs that are not is refused."""
    results = [_done(run) for run in runs]
    missing = [run for run, result in zip(runs, results) if result is None]
    if missing:
        raise ConfigError(f"--storage: its study counts {missing[0]} as finished, but that folder has no "
                          f"results.json (removed, or the storage's studies were run into another --output). Workers must share "
                          f"one output folder (a shared filesystem); for a new output use a new storage "
                          f"(the default keeps it in {out / 'study.db'})")
    return results


def _checkpoint_epochs(run: Path) -> int:
    meta = run / "checkpoint.json"
    if not meta.is_file():
        return 0
    try:
        return int(json.loads(meta.read_text()).get("epoch", 0))
    except (ValueError, OSError):
        return 0


def visible_device(index: str) -> str:
    """CUDA_VISIBLE_DEVICES for a worker on ``--devices`` entry ``index``: an index into the devices this
    process sees, so under a scheduler's CUDA_VISIBLE_DEVICES=4,5 the entry 1 is GPU 5, not GPU 1."""
    parent = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return parent[int(index)] if parent else index


def worker_main(cfg_dict: dict, out: str, storage: str | None, pruner: str, heartbeat: float, device: str | None,
                workers: int = 1):
    """A ``--workers`` process: pinned to one device when given, then the same stages as the main process."""
    os.environ.setdefault("IVPT_PROCESSES", str(workers))  # the workers here divide the cores
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_device(device)
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
    cfg = as_started(cfg.validate())  # paths absolute before the study's key and every run are made of them
    check_inputs(cfg)  # a missing data folder said before any trial downloads weights or builds a model
    out = Path(output).expanduser()
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
