"""VPT's protocol on Optuna: one study per stage, any number of workers and machines, pruning, retries.

The grid stage (lr x wd on train -> val) is an Optuna study whose trials are the recipe's grid
points; the final stage (one run per seed on train+val -> test at the chosen lr and wd) is another.
Studies live in ``--storage`` (default: SQLite in the output folder; any RDB URL such as PostgreSQL,
or ``journal:PATH`` on a shared filesystem), so every process that runs the same command joins them.

The study is a work list, not a guard: a trial trains one run folder with ``train(resume=True)``,
and the run's lock (ivpt.engine.runlock) and results.json already make that idempotent (a finished
run is read back, an interrupted one resumes, a point queued twice is trained by the trial that
holds its run's lock while the other steps aside). The study only
knows which points are finished, which are queued or running, and queues again those whose worker
died (a stale heartbeat or, on a journal file, a free run lock).

Pruners: ``sha`` (default) is synchronous successive halving: every point trains to the first rung
(r epochs, r = epochs / 9), the best third goes on to 3r, ..., the survivors to the end; a run waits
at its checkpoint between rungs, so a survivor equals an unpruned run of its config. Each rung is a
stage of its own, shared by workers anywhere. ``asha`` and ``hyperband`` judge points as they run
(:class:`GridHalving`); ``none`` trains the full grid.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import statistics
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..card import as_typed
from .config import NOT_RESULT_FIELDS, ConfigError, TrainConfig, as_started, check_inputs
from . import pruning
from .preemption import EXIT_PREEMPTED, SIGNALS as STOP_SIGNALS, Preempted, StopRequest
from .protocol import VPT_LRS, VPT_SEEDS, VPT_WDS, check_finals, choose, final_jobs, grid_jobs
from .runlock import RunLock, RunLockedError

PRUNERS = ("none", "sha", "asha", "hyperband")
ETA = 3  # successive halving's reduction factor: the best third of a rung goes on
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """How ``ivpt tune`` runs its studies: the same for every stage, every worker and every machine.

    storage: an Optuna storage URL (``sqlite:///PATH``, ``postgresql+psycopg://USER@HOST/DB``, any
    SQLAlchemy URL) or ``journal:PATH``; None keeps SQLite in the output folder. pruner: one of
    ``PRUNERS``. heartbeat: seconds between a worker's heartbeats; a trial silent for twice that is
    taken as dead. device: the ``--devices`` entry a worker process is pinned to (None: as started).
    """
    storage: str | None = None
    pruner: str = "sha"
    heartbeat: float = 30.0
    device: str | None = None

    def __post_init__(self):
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner {self.pruner!r}: expected one of {', '.join(PRUNERS)}")
        if not self.heartbeat > 0:
            raise ConfigError(f"--heartbeat {self.heartbeat:g}: expected a positive number of seconds")

    @property
    def heartbeats(self) -> bool:
        """Whether the storage keeps heartbeats (an RDB does; Optuna's journal file does not)."""
        return not (self.storage or "").startswith("journal:")

    @property
    def grace(self) -> float:
        """How long a running trial may go unheard of before it is taken as dead."""
        return 2 * self.heartbeat

    def open(self, out: Path):
        return open_storage(self.storage, out, self.heartbeat)


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
    """The Optuna storage behind ``--storage`` (None: ``study.db`` in ``out``), or a ConfigError naming it."""
    url = url or f"sqlite:///{(out / 'study.db').resolve()}"
    for prefix in ("sqlite:///", "journal:"):  # a file path inside the URL: ~ as everywhere else
        if url.startswith(prefix + "~"):
            url = prefix + os.path.expanduser(url[len(prefix):])
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):]))
        return _rdb_storage(url, heartbeat)
    except Exception as err:  # sqlalchemy's and optuna's errors alike: name the field
        raise ConfigError(f"--storage {url!r}: cannot open it as an Optuna storage ({type(err).__name__}: {err}); "
                          "expected e.g. sqlite:///PATH, postgresql+psycopg://USER@HOST/DB (pip install "
                          "'ivpt[postgres]') or journal:PATH") from None


def _rdb_storage(url: str, heartbeat: float, tries: int = 3):
    """Optuna's RDBStorage with heartbeats; no failed_trial_callback (RetryFailedTrialCallback): its retry
    copies the dead trial's attributes, and run_stage queues every missing point anyway.

    Workers started at once on a new database race to create Optuna's tables, and all but one fail
    (a unique constraint on PostgreSQL; 'table ... already exists' or a locked file on SQLite); the
    tables exist when they look again.
    """
    for attempt in range(tries):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(url, heartbeat_interval=max(1, int(heartbeat)),
                                                  grace_period=max(2, int(2 * heartbeat)))
        except Exception as err:
            if attempt == tries - 1 or not _lost_table_race(err):
                raise
            time.sleep(0.5 + attempt)


def _lost_table_race(err: Exception) -> bool:
    """Another process created Optuna's tables in the same moment (not a bad URL or a missing driver)."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    if isinstance(err, (IntegrityError, ProgrammingError)):
        return True
    text = str(err).lower()
    return isinstance(err, OperationalError) and ("already exists" in text or "database is locked" in text)


def rung_epochs(epochs: int) -> list[int]:
    """Successive halving's rungs: r, 3r, 9r, ... epochs before the schedule's end (r = epochs / 9, at least 1)."""
    rung, rungs = max(1, round(epochs / ETA ** 2)), []
    while rung < epochs:
        rungs.append(rung)
        rung *= ETA
    return rungs


def pruner_rungs(name: str, epochs: int) -> list[int]:
    """The epochs at which a pruner judges a grid point (so val must be scored there)."""
    if name in ("sha", "asha"):
        return rung_epochs(epochs)
    if name == "hyperband":  # its brackets start at 1, 3, 9, ... epochs
        return [ETA ** k for k in range(epochs) if ETA ** k < epochs]
    return []


class GridHalving(optuna.pruners.BasePruner):
    """Asynchronous successive halving over grid points (``asha``), or Hyperband's brackets of it.

    At each of its rungs a point goes on if its val is among the best third (at least the best one)
    of the points that have reached that rung, each point counted once and failed trials left out:
    a dead worker's attempt and its point's retry (which replays the run's log) report the same
    values, and Optuna's own pruners, which count every trial, would count the point twice. Judged
    from the reported values alone, so nothing is kept between calls.
    ``brackets`` > 1 is Hyperband: bracket b starts judging at ``first_rung * ETA**b`` epochs, and a
    point's bracket, drawn from its parameters, stays the same for its retries; brackets that start
    later get fewer points (n ETA^s / (s + 1) of them for s = brackets - 1 - b, as in Hyperband).
    """

    def __init__(self, first_rung: int, epochs: int, brackets: int = 1):
        self.first_rung, self.epochs, self.brackets = first_rung, epochs, brackets
        self.shares = [math.ceil(brackets * ETA ** s / (s + 1)) for s in reversed(range(brackets))]

    @classmethod
    def named(cls, name: str, epochs: int) -> "GridHalving | None":
        """The pruner of ``--pruner name`` for the grid stage (None where no trial is judged as it runs)."""
        if name in ("none", "sha"):  # sha judges between stages
            return None
        if epochs < 2:
            raise ConfigError(f"--pruner {name}: epochs {epochs} leaves no rung to prune at; use --pruner none")
        if name == "asha":  # the same rungs as sha
            return cls(rung_epochs(epochs)[0], epochs)
        return cls(1, epochs, brackets=math.floor(math.log(epochs, ETA) + 1e-9) + 1)

    def bracket(self, params: dict) -> int:
        draw = zlib.crc32(json.dumps(params, sort_keys=True).encode()) % sum(self.shares)
        for bracket, share in enumerate(self.shares):
            draw -= share
            if draw < 0:
                return bracket
        raise AssertionError("unreachable: the draw is below the shares' sum")

    def rungs(self, bracket: int) -> list[int]:
        rung, rungs = self.first_rung * ETA ** bracket, []
        while rung < self.epochs:
            rungs.append(rung)
            rung *= ETA
        return rungs

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        epoch, bracket = trial.last_step, self.bracket(trial.params)
        if epoch not in self.rungs(bracket):
            return False
        reached = {json.dumps(t.params, sort_keys=True): t.intermediate_values[epoch]
                   for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, *FINISHED))
                   if epoch in t.intermediate_values and self.bracket(t.params) == bracket}
        value = reached[json.dumps(trial.params, sort_keys=True)] = trial.intermediate_values[epoch]
        best = sorted(reached.values(), reverse=True)[:max(1, len(reached) // ETA)]
        return value < best[-1]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One study: its grid points, each trained in its own run folder, and what a trial returns.

    space: parameter -> values (Optuna's categorical choices); jobs: point (the values in the order
    of sorted(space)) -> (run folder, config); split: the score a finished run returns; stop_at:
    train only to that epoch (a rung of synchronous successive halving) and return its val score;
    pruner: judges trials as they run; pruner_name: recorded, so that a study is finished as it began.
    """
    name: str
    space: dict[str, list]
    jobs: dict[tuple, tuple[Path, TrainConfig]]
    split: str = "val"
    stop_at: int | None = None
    pruner: optuna.pruners.BasePruner | None = None
    pruner_name: str | None = None

    @property
    def names(self) -> list[str]:
        return sorted(self.space)

    def point(self, trial) -> tuple | None:
        """A trial's grid point: its parameters, or, while queued, the point it was queued with."""
        params = trial.params or trial.user_attrs.get("point") or {}
        return tuple(params[n] for n in self.names) if set(params) == set(self.names) else None


def _done(run: Path) -> dict | None:
    path = run / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _entry_value(entry: dict, split: str) -> float | None:
    """An epoch's primary score on ``split`` (top-1 or mIoU) in a run's log entry."""
    return next((v for k, v in entry.items() if k.startswith(f"{split}_") and k != f"{split}_loss"), None)


def _rung_value(entry: dict, split: str, epoch: int, run: Path) -> float:
    value = _entry_value(entry, split)
    if value is None:
        raise ConfigError(f"{run}: no {split} score at epoch {epoch}, a rung of successive halving; "
                          "set eval_every to 1 (or a divisor of every rung) or use --pruner none")
    return value


class _RungReached(Exception):
    """A run paused at its rung (its checkpoint kept): the epoch's val score, for the ranking."""

    def __init__(self, value: float):
        super().__init__(value)
        self.value = value


class _NotQueued(Exception):
    """A trial with no point of its own: Optuna made it afresh because another worker took the last
    queued point first, or its point's run is held by another worker's trial (both queued it)."""


class _TakenOver(Exception):
    """This worker's trial was finished by another worker while its run went on (a late heartbeat, or one
    trial popped by two workers): the run is kept and the point's retry reads it back. Raised instead of
    returning a value whose tell would fail inside Optuna (5.1 then asserts "Should not reach"); Optuna's
    tell of the failure is refused in turn, which _train_one turns into a warning."""


class _Objective:
    """Optuna's objective for one stage: a trial is one grid point, whose run is trained, resumed or read back.

    Keeps the number of the trial it runs and what that trial raised, so that run_stage can tell the
    run's own errors from Optuna refusing a trial another worker failed meanwhile.
    """

    def __init__(self, stage: Stage):
        self.stage, self.number, self.raised = stage, None, None

    def __call__(self, trial: optuna.Trial) -> float:
        self.number, self.raised = trial.number, None
        try:
            value = self.run(trial)
            state = _state(trial.study, trial.number)
            if state != TrialState.RUNNING:
                raise _TakenOver(f"trial {trial.number} is {state.name} in the study")
            return value
        except BaseException as err:
            self.raised = err
            raise

    def run(self, trial: optuna.Trial) -> float:
        from .loop import train

        if "point" not in trial.user_attrs:
            raise _NotQueued("no queued point left for this trial")
        stage = self.stage
        point = tuple(trial.suggest_categorical(name, stage.space[name]) for name in stage.names)  # the queued values
        run, cfg = stage.jobs[point]
        trial.set_user_attr("run", str(run))  # from here on the run's lock (or its heartbeat) tells whether it lives
        if _done(run) is None:  # else finished earlier (by anyone): read back, never trained again
            try:
                train(cfg, resume=True, quiet=True, on_epoch=self.reporter(trial, run, cfg))
            except _RungReached as reached:
                return reached.value
            except RunLockedError:  # another worker trains this point (both queued it): leave it to that trial
                time.sleep(2)  # (a run held by something else than a trial is not tried again at once)
                raise _NotQueued(f"{run} is being trained by another worker") from None
        done = _done(run)
        _check_same_run(run, done, cfg)
        if stage.stop_at is not None:
            entry = next(e for e in done["log"] if e["epoch"] == stage.stop_at)
            return _rung_value(entry, cfg.eval_split, stage.stop_at, run)
        return done[stage.split][done.get("primary_metric", "top1")]

    def reporter(self, trial: optuna.Trial, run: Path, cfg: TrainConfig):
        """The run's on_epoch (called for every epoch, also while a resumed run replays its log)."""
        stop_at, judged = self.stage.stop_at, self.stage.pruner is not None

        def on_epoch(entry: dict) -> None:
            if judged or stop_at:  # kept in the study: a pruned run's epochs count even when its folder is gone
                trial.set_user_attr("epochs", entry["epoch"])
            if stop_at is not None and entry["epoch"] >= stop_at:
                raise _RungReached(_rung_value(entry, cfg.eval_split, stop_at, run))
            value = _entry_value(entry, cfg.eval_split)
            if judged and value is not None:
                trial.report(value, entry["epoch"])
                # the last epoch is trained already: a run that reached it completes, it is not pruned
                if entry["epoch"] < cfg.epochs and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {entry['epoch']} (val {value:.4f})")
        return on_epoch


def _check_same_run(run: Path, done: dict, cfg: TrainConfig) -> None:
    """A results.json left by another recipe in the same folder must not stand in for this run."""
    from .checkpoint import CheckpointError
    from .loop import config_differences, resume_hint

    diff = config_differences(done.get("config") or {}, cfg)
    if diff:
        raise CheckpointError(f"{run / 'results.json'} is a finished run of another config (it differs in "
                              f"{', '.join(diff)}): remove that folder or choose another output"
                              + resume_hint(done.get("config") or {}, diff))


def _fail_orphans(study: optuna.Study, settings: StudySettings, seen: dict[int, float]) -> None:
    """Fail the running trials of dead workers that no heartbeat can tell of (their points are queued anew).

    On a storage without heartbeats (Optuna's journal file) a trial is alive while its run folder's
    lock is held (a kernel lock that dies with its process) or while this worker has seen it running
    for less than the grace (popped, not yet training). A live trial misjudged in the instant between
    its training and its report only loses its bookkeeping: its retry finds the run's results.json.
    On an RDB storage heartbeats judge every trial that got as far as naming its run (the objective
    runs inside Optuna's heartbeat thread); one popped by a worker killed before that has no heartbeat
    that could go stale: it is failed after the grace.
    Age is measured on this worker's own monotonic clock from when it first saw the trial running
    (``seen``: trial number -> that moment, kept by the caller across calls), never from the trial's
    start time, which Optuna stamps in the popping machine's local time.
    """
    now = time.monotonic()
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for number in set(seen) - {t.number for t in running}:
        del seen[number]  # finished or failed meanwhile
    for trial in running:
        if now - seen.setdefault(trial.number, now) < settings.grace:
            continue
        run = trial.user_attrs.get("run")
        if run is not None:
            if settings.heartbeats:
                continue  # fail_stale_trials judges it by its heartbeat (the run folder may be on another machine)
            try:
                RunLock(run).acquire().release()
            except RunLockedError:
                continue  # its worker (or another trial of the same point) trains it now
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)


def _same_setting(study: optuna.Study, option: str, value) -> None:
    """A setting every worker of a study must share: recorded by the first, refused when another differs."""
    used = study.user_attrs.get(option)
    if used is None:
        study.set_user_attr(option, value)
    elif used != value:
        shown = (lambda v: f"{v:g}") if isinstance(value, float) else str
        raise ConfigError(f"--{option} {shown(value)}: the study {study.study_name!r} in this storage was run with "
                          f"--{option} {shown(used)}; use that, or another --output / --storage")


def _finished(stage: Stage, trials: list) -> dict[tuple, optuna.trial.FrozenTrial]:
    """Each finished point's trial (a completed one before a pruned one, where a point has two)."""
    finished = {}
    for trial in sorted((t for t in trials if t.state in FINISHED), key=lambda t: t.state != TrialState.COMPLETE):
        finished.setdefault(stage.point(trial), trial)
    return {point: trial for point, trial in finished.items() if point in stage.jobs}


def _state(study: optuna.Study, number: int | None) -> TrialState | None:
    """Trial ``number``'s state in the study now (another worker may have ended it); None: no such trial."""
    return next((t.state for t in study.get_trials(deepcopy=False) if t.number == number), None)


def _train_one(study: optuna.Study, objective: _Objective) -> None:
    """One queued trial, in Optuna's optimize (which runs the heartbeat thread beside it)."""
    objective.number, objective.raised = None, None  # not a previous trial's, should optimize fail before it
    try:
        study.optimize(objective, n_trials=1, catch=(_NotQueued, _TakenOver))
    # AssertionError: Optuna's "Should not reach" when a trial is finished by another worker between the
    # objective's return and its tell (a race _TakenOver narrows but cannot close)
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError, AssertionError) as err:
        # Optuna refusing to update or tell a trial another worker failed, not the run's own errors
        from_optuna = err is not objective.raised or isinstance(err, optuna.exceptions.UpdateFinishedTrialError)
        state = _state(study, objective.number)
        if not (from_optuna and state not in (None, TrialState.RUNNING)):
            raise
        refusals = (_NotQueued, _TakenOver, optuna.TrialPruned, optuna.exceptions.UpdateFinishedTrialError)
        if objective.raised is not None and not isinstance(objective.raised, refusals):
            raise objective.raised from err  # the run's own end (a stop, an error) matters, not Optuna's refusal
        warnings.warn(f"trial {objective.number} of {study.study_name} was ended by another worker while this one "
                      f"ran it (a late heartbeat, or one trial popped by two workers); its retry reads the run back "
                      f"({err})")


def run_stage(stage: Stage, storage, settings: StudySettings) -> dict[tuple, optuna.trial.FrozenTrial]:
    """Work on one stage until every grid point is complete or pruned; returns each point's finished trial.

    Every point missing (never queued, or its trial failed with its worker) is queued; this worker
    trains queued trials one by one and, once none is left, waits for the others' running ones.
    """
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial: ivpt says why, once (not Optuna beside it)
    study = optuna.create_study(study_name=stage.name, storage=storage, direction="maximize", load_if_exists=True,
                                pruner=stage.pruner)
    if stage.pruner_name is not None:  # a stage pruned one way is not finished by another: its pruned points differ
        _same_setting(study, "pruner", stage.pruner_name)
    # Every worker judges the others' liveness by its own --heartbeat: one study, one heartbeat
    _same_setting(study, "heartbeat", float(settings.heartbeat))
    objective, first_seen_running = _Objective(stage), {}
    with StopRequest() as stop:  # a signal between runs, or one a run finished despite: no new run is started
        while not stop.requested:
            finished = _run_stage_step(study, stage, objective, settings, first_seen_running, stop)
            if finished is not None:
                return finished
    raise Preempted(f"tuning stopped by {stop.signal} between runs; every finished run is kept: run the same "
                    "command again to continue")


def _run_stage_step(study: optuna.Study, stage: Stage, objective: _Objective, settings: StudySettings,
                    first_seen_running: dict, stop: StopRequest) -> dict | None:
    """One look at the stage: its finished trials once all are, else (after queuing what is missing) one
    queued trial trained, or a short wait while the others' trials run."""
    with warnings.catch_warnings():  # heartbeats are experimental in Optuna
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)  # trials of dead workers: failed (queued anew below)
    _fail_orphans(study, settings, first_seen_running)
    trials = study.get_trials(deepcopy=False)
    finished = _finished(stage, trials)
    if len(finished) == len(stage.jobs):
        return finished
    queued = {stage.point(t) for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)}
    for point in sorted(set(stage.jobs) - set(finished) - queued):
        params = dict(zip(stage.names, point))
        study.enqueue_trial(params, user_attrs={"point": params})
    if stop.requested:  # came while the storage was read: no run is started
        return None
    if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        _train_one(study, objective)
    else:
        time.sleep(min(2.0, settings.heartbeat / 2))  # others' trials are running: look again soon (a rung's barrier)
    return None


def successive_halving(key: str, storage, settings: StudySettings, grid: dict, space: dict[str, list],
                       epochs: int) -> tuple[dict, int, dict[str, int]]:
    """Synchronous successive halving on the grid; returns the last stage's trials, the points pruned and
    the epochs each run trained as the study recorded them.

    Rung k is a stage: every surviving point trains to that rung's epoch and pauses at its checkpoint;
    the best third by val (ties as the choice: the smaller lr, then the larger wd) goes on. Once one
    point is left, or the rungs are done, the survivors train to the end in the stage ``sha-KEY-end``.
    """
    survivors, recorded = sorted(grid), {}
    for rung in rung_epochs(epochs):
        if len(survivors) <= 1:
            break
        trials = run_stage(Stage(f"sha-{key}-epoch{rung}", space, {p: grid[p] for p in survivors}, stop_at=rung),
                           storage, settings)
        for trial in trials.values():
            run = trial.user_attrs.get("run")
            recorded[run] = max(recorded.get(run, 0), trial.user_attrs.get("epochs", 0))
        ranked = sorted(survivors, key=lambda p: (-round(trials[p].value, 6), p[0], -p[1]))
        survivors = sorted(ranked[:max(1, len(ranked) // ETA)])
    trials = run_stage(Stage(f"sha-{key}-end", space, {p: grid[p] for p in survivors}), storage, settings)
    return trials, len(grid) - len(survivors), recorded


def _grid_stage(cfg: TrainConfig, out: Path, key: str, storage, settings: StudySettings) -> tuple[list, int, dict]:
    """The grid's finished runs' results, the points pruned and the epochs the study recorded per run."""
    lrs, wds = cfg.protocol.get("lrs", VPT_LRS), cfg.protocol.get("wds", VPT_WDS)
    grid = {(float(lr), float(wd)): job for (lr, wd), job in zip([(lr, wd) for lr in lrs for wd in wds],
                                                                   grid_jobs(cfg, out))}
    space = {"lr": [float(v) for v in lrs], "wd": [float(v) for v in wds]}  # points in sorted names: (lr, wd)
    pruner = GridHalving.named(settings.pruner, cfg.epochs)
    rungs = pruner_rungs(settings.pruner, cfg.epochs)
    if rungs and (not cfg.eval_every or any(r % cfg.eval_every for r in rungs)):
        raise ConfigError(f"eval_every {cfg.eval_every}: --pruner {settings.pruner} judges the grid points on val at "
                          f"epochs {rungs}; set eval_every to 1 or use --pruner none")
    if settings.pruner == "sha":
        trials, pruned, recorded = successive_halving(key, storage, settings, grid, space, cfg.epochs)
    else:
        trials = run_stage(Stage(f"grid-{key}", space, grid, pruner=pruner, pruner_name=settings.pruner),
                           storage, settings)
        pruned = sum(t.state == TrialState.PRUNED for t in trials.values())
        recorded = {t.user_attrs.get("run"): t.user_attrs.get("epochs", 0) for t in trials.values()}
    complete = [grid[point][0] for point, t in sorted(trials.items()) if t.state == TrialState.COMPLETE]
    return _finished_runs(complete, out), pruned, recorded


def training_seconds(folder: Path) -> float:
    """Seconds of training every run under a tuning folder logged (grid points and seeds, one line per epoch).

    Each run is one process, so these are core-seconds when every process has one thread; an epoch that an
    interruption cut short and a resumed run trained again counts once."""
    total = 0.0
    for path in sorted(Path(folder).rglob("metrics.jsonl")):
        total += sum(json.loads(line).get("seconds", 0.0) for line in path.read_text().splitlines() if line.strip())
    return total


def tune_study(cfg: TrainConfig, out: Path, settings: StudySettings = StudySettings(), *,
               chosen: dict | None = None) -> dict[str, Any]:
    """The grid stage, the choice and the final stage; the summary ``ivpt tune`` writes."""
    with StopRequest():  # a signal between stages (the choice, pruning's scores) lets no later stage start
        return _tune_stages(cfg, out, settings, chosen)


def _tune_stages(cfg: TrainConfig, out: Path, settings: StudySettings, chosen: dict | None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    storage, key = settings.open(out), study_key(cfg)
    if chosen is None:
        grid_results, pruned, recorded = _grid_stage(cfg, out, key, storage, settings)
        choice = choose(grid_results)
    else:
        grid_results, choice, pruned, recorded = [], dict(chosen), 0, {}
    final_cfg, pruning_record, rewinds = cfg, None, []
    if pruning.prunes(cfg):  # E2VPT: score the chosen run's masks, rewind every level, train the seeds at the best one
        final_cfg, pruning_record, rewinds = _pruning_stage(cfg, out, key, choice, storage, settings)
    seeds = [int(s) for s in cfg.protocol.get("seeds", VPT_SEEDS)]
    finals = {(seed,): job for seed, job in zip(seeds, final_jobs(final_cfg, out, choice["lr"],
                                                                  choice["weight_decay"]))}
    check_finals(list(finals.values()), choice)
    run_stage(Stage(f"final-{key}-lr{choice['lr']:g}-wd{choice['weight_decay']:g}", {"seed": seeds}, finals,
                    split="test"), storage, settings)
    final_results = _finished_runs([run for run, _ in finals.values()], out)
    metric = final_results[0].get("primary_metric", "top1")
    tests = [r["test"][metric] for r in final_results]
    grid_runs = [run for run, _ in grid_jobs(cfg, out)] if chosen is None else []
    epochs_trained = sum(len((_done(run) or {}).get("log", [])) or _checkpoint_epochs(run) or recorded.get(str(run), 0)
                         for run in grid_runs + rewinds + [run for run, _ in finals.values()])
    summary = {
        "data": cfg.data, "method": cfg.method, "method_options": cfg.method_options, "metric": metric,
        "grid": [{"lr": r["config"]["lr"], "weight_decay": r["config"]["weight_decay"], "val_top1": r["val"][metric]}
                 for r in grid_results],
        "pruner": settings.pruner, "pruned": pruned, "epochs_trained": epochs_trained,
        "chosen": choice, "seeds": [r["config"]["seed"] for r in final_results], "test_top1": tests,
        "test_mean": statistics.fmean(tests), "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
        "parameters": final_results[0]["parameters"],
        "training_seconds": round(training_seconds(out), 3), "study_key": key,
    }
    if pruning_record is not None:
        summary["pruning"] = pruning_record
    from .checkpoint import atomic_write  # here, not above: opening a study's storage needs no torch

    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    return summary


def _pruning_stage(cfg: TrainConfig, out: Path, key: str, choice: dict, storage,
                   settings: StudySettings) -> tuple[TrainConfig, dict, list[Path]]:
    """E2VPT's pruning (ivpt.engine.pruning): the chosen grid run (trained here if the grid was skipped), its
    masks' importance, one rewind per level as a stage of its own; the final runs' config, what the summary
    records and the rewinds' folders."""
    point = (float(choice["lr"]), float(choice["weight_decay"]))
    chosen_run = {(float(c.lr), float(c.weight_decay)): (run, c) for run, c in grid_jobs(cfg, out)}.get(point)
    if chosen_run is None:
        raise ConfigError(f"pruning: the choice lr {point[0]:g}, wd {point[1]:g} is not a point of the recipe's grid, "
                          "whose run the masks are scored on")
    run_stage(Stage(f"prune-{key}-lr{point[0]:g}-wd{point[1]:g}", {"lr": [point[0]], "wd": [point[1]]},
                    {point: chosen_run}), storage, settings)  # finished already unless the grid was skipped
    scores = pruning.scored(chosen_run[1], chosen_run[0] / "adapter", pruning.stage_folder(out, "pruning", choice))
    jobs = pruning.rewind_jobs(cfg, out, choice, scores)
    trials = run_stage(Stage(f"rewind-{key}-lr{point[0]:g}-wd{point[1]:g}",
                             {"pieces": sorted({p for p, _ in jobs}), "tokens": sorted({t for _, t in jobs})}, jobs),
                       storage, settings)
    values = {point: trial.value for point, trial in trials.items()}
    best = pruning.choose_rewind(values)
    options = jobs[best][1].method_options
    record = {
        "scored": scores["scored"], "token_scores": scores["token_scores"], "piece_scores": scores["piece_scores"],
        "rewinds": [{"tokens": t, "pieces": p, "val_top1": values[(p, t)]} for p, t in sorted(jobs, key=lambda x: x[::-1])],
        "chosen": {"tokens": best[1], "pieces": best[0], "pruned_tokens": options["pruned_tokens"],
                   "pruned_pieces": options["pruned_pieces"]},
    }
    final_cfg = dataclasses.replace(cfg, method_options=options)
    return final_cfg, record, [run for run, _ in jobs.values()]


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


def worker_main(cfg_dict: dict, out: str, settings: StudySettings, workers: int = 1):
    """A ``--workers`` process: pinned to its device when given, then the same stages as the main process.

    A signal (its own, or passed on by the parent) checkpoints the run it trains and ends the process
    with EXIT_PREEMPTED; so does the parent's death, which would otherwise leave it training unwatched.
    """
    os.environ.setdefault("IVPT_PROCESSES", str(workers))  # the workers here divide the cores
    _stop_with_parent()
    cfg = TrainConfig(**cfg_dict)
    if settings.device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_device(settings.device)
        cfg = dataclasses.replace(cfg, device="cuda:0")
    try:
        tune_study(cfg, Path(out), settings)
    except Preempted as stop:
        print(f"ivpt tuning worker {os.getpid()}: {stop}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)


def _stop_with_parent() -> None:
    """SIGTERM to this worker once its parent is gone (killed outright, e.g. SIGKILL or out of memory):
    the run it trains checkpoints and stops instead of training on for a parent nobody waits for."""
    import multiprocessing
    import threading

    parent = multiprocessing.parent_process()
    if parent is None or not STOP_SIGNALS:
        return

    def watch():
        parent.join()  # returns when the parent ends (its sentinel closes): no polling
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="ivpt-parent-watch", daemon=True).start()


def _check_devices(devices: list[str] | None) -> None:
    if devices:
        import torch

        available = torch.cuda.device_count()
        bad = [d for d in devices if not d.isdigit() or int(d) >= available]
        if bad:
            raise ValueError(f"--devices: device {bad[0]!r} does not exist here ({available} CUDA device(s))")


def tune(cfg: TrainConfig, output: str | Path, *, storage: str | None = None, workers: int = 1,
         devices: list[str] | None = None, pruner: str = "sha", heartbeat: float = 30.0,
         chosen: dict | None = None) -> dict[str, Any]:
    """The protocol on Optuna (ivpt.engine.study): grid on train -> val, choice, seeds on train+val -> test.

    workers: processes started here (each pinned to one of ``devices`` in turn, on a GPU machine);
    processes on other machines join by running the same command with the same ``storage``.
    ``chosen`` ({"lr", "weight_decay"}) skips the grid: e.g. an ablation reusing its method's choice.
    Returns the summary it writes to ``output/summary.json``.
    """
    cfg = as_started(cfg.validate())  # paths absolute before the study's key and every run are made of them
    check_inputs(cfg)  # a missing data folder said before any trial downloads weights or builds a model
    settings = StudySettings(storage=storage, pruner=pruner, heartbeat=heartbeat)
    out = Path(output).expanduser()
    if workers < 1:
        raise ValueError(f"--workers {workers}: expected at least 1")
    _check_devices(devices)
    if workers == 1 and not devices:
        return tune_study(cfg, out, settings, chosen=chosen)
    if chosen is not None:
        raise ValueError("a given choice (chosen=) runs in one process; drop --workers")
    import multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    settings.open(out)  # a bad --storage fails here, once, not in every worker
    context = mp.get_context("spawn")
    procs = [context.Process(target=worker_main, args=(cfg.to_dict(), str(out), dataclasses.replace(
                 settings, device=devices[i % len(devices)] if devices else None), workers))
             for i in range(workers)]
    _run_workers(procs, out)
    return json.loads((out / "summary.json").read_text())


def _run_workers(procs: list, out: Path) -> None:
    """Start the workers and wait for them. A SIGTERM / SIGUSR1 to this process is passed on to each worker
    (which checkpoints and exits), and this one waits for them, then stops with EXIT_PREEMPTED: dying at
    once would leave them training, orphaned, beside the rerun that a stopped job gets."""
    def pass_on(signum: int) -> None:
        for proc in procs:
            if proc.pid is not None and proc.exitcode is None:
                os.kill(proc.pid, signum)

    with StopRequest(then=pass_on) as stopper:
        for proc in procs:
            if not stopper.requested:  # none started after a stop
                proc.start()
        if stopper.requested:  # again: one that came during a start found no pid to pass it to
            pass_on(signal.Signals[stopper.signal])
        for proc in procs:
            if proc.pid is not None:
                proc.join()
    codes = [p.exitcode for p in procs if p.pid is not None]
    failed = [code for code in codes if code]
    # EXIT_PREEMPTED: checkpointed and stopped; killed by the signal itself: stopped outside a training run
    stopped = [code for code in failed if code == EXIT_PREEMPTED or -code in STOP_SIGNALS]
    if len(stopped) < len(failed):
        raise RuntimeError(f"{len(failed) - len(stopped)} of {len(procs)} tuning workers failed (exit codes {codes}); "
                           "run the same command again to finish what is missing")
    if stopped or (stopper.requested and not (out / "summary.json").is_file()):
        raise Preempted(f"tuning stopped by {stopper.signal or 'a signal'}: {len(stopped)} of {len(procs)} workers "
                        f"stopped (exit codes {codes}), their runs checkpointed; run the same command again to "
                        "continue", str(out))
