"""ivpt tune on Optuna: the full grid's choice, workers sharing one study, a killed worker, pruning, bad input."""
import dataclasses
import functools
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import optuna
import pytest
import torch
import yaml

from conftest import tuning_recipe
from ivpt.engine.config import ConfigError
from ivpt.engine.loop import train
from ivpt.engine.preemption import EXIT_PREEMPTED, Preempted
from ivpt.engine.protocol import choose, final_jobs, grid_jobs
from ivpt.engine.runlock import LOCK_NAME
from ivpt.engine.study import tune

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture
def recipe(tmp_path):
    return tuning_recipe(tmp_path)


@pytest.fixture(scope="module")
def full_grid(tmp_path_factory):
    """The test recipe tuned once with --pruner none by one worker nobody stops: the reference of every
    other way to tune it (the weights are seeded, so every test's recipe trains alike). Its output folder
    and summary."""
    folder = tmp_path_factory.mktemp("full-grid")
    return folder / "tune", tune(tuning_recipe(folder), folder / "tune", pruner="none")


def test_full_grid_gives_the_plain_protocols_choice_and_scores(recipe, tmp_path, full_grid):
    """--pruner none: every grid point to the end; the choice and the test scores of running the protocol by hand."""
    _, summary = full_grid
    by_hand = [train(dataclasses.replace(cfg, output=str(tmp_path / "hand" / run.name)), quiet=True)
               for run, cfg in grid_jobs(recipe, tmp_path / "hand-grid")]
    choice = choose(by_hand)
    assert {k: summary["chosen"][k] for k in ("lr", "weight_decay")} == {k: choice[k] for k in ("lr", "weight_decay")}
    finals = [train(dataclasses.replace(cfg, output=str(tmp_path / "hand-final" / run.name)), quiet=True)
              for run, cfg in final_jobs(recipe, tmp_path / "x", choice["lr"], choice["weight_decay"])]
    assert summary["test_top1"] == [f["test"]["top1"] for f in finals]
    assert summary["pruned"] == 0 and summary["epochs_trained"] == 2 * (4 + 2)


def _without_times(log):
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in log]


def test_successive_halving_goes_rung_by_rung_and_survivors_equal_unpruned_runs(recipe, tmp_path, full_grid):
    """sha: every point to the rung (epoch 1 of 2), the best third (here one) on from its checkpoint to the end.

    The survivor is the point the full grid's epoch-1 val ranks first (ties: smaller lr, larger wd), its
    run equals the unpruned run of its config, the others stop at the rung; two workers do the same.
    """
    full_out, full = full_grid
    sha = tune(recipe, tmp_path / "sha", pruner="sha")
    jobs = {run.name: cfg for run, cfg in grid_jobs(recipe, full_out)}
    logs = {name: json.loads((full_out / "grid" / name / "results.json").read_text())["log"] for name in jobs}
    first = max(jobs, key=lambda n: (round(logs[n][0]["val_top1"], 6), -jobs[n].lr, jobs[n].weight_decay))
    assert [(g["lr"], g["weight_decay"]) for g in sha["grid"]] == [(jobs[first].lr, jobs[first].weight_decay)]
    survivor = json.loads((tmp_path / "sha" / "grid" / first / "results.json").read_text())
    assert _without_times(survivor["log"]) == _without_times(logs[first])  # paused at the rung, then resumed: the same run
    for name in set(jobs) - {first}:
        run = tmp_path / "sha" / "grid" / name
        assert not (run / "results.json").exists() and json.loads((run / "checkpoint.json").read_text())["epoch"] == 1
    assert sha["pruned"] == 3 and sha["epochs_trained"] == 4 * 1 + 1 + 2 * 2 < full["epochs_trained"]
    # a pruned run's epochs are kept in the study: they still count once its folder is gone
    import shutil

    for name in set(jobs) - {first}:
        shutil.rmtree(tmp_path / "sha" / "grid" / name)
    again = tune(recipe, tmp_path / "sha", pruner="sha")
    assert (again["epochs_trained"], again["chosen"], again["test_top1"]) == (sha["epochs_trained"], sha["chosen"], sha["test_top1"])
    # two workers share each rung (a barrier between rungs): the same pruning, choice and scores
    two = tune(recipe, tmp_path / "two", pruner="sha", workers=2)
    assert (two["epochs_trained"], two["chosen"], two["test_top1"]) == (sha["epochs_trained"], sha["chosen"], sha["test_top1"])


def test_asynchronous_halving_prunes_and_survivors_equal_unpruned_runs(recipe, tmp_path, full_grid):
    _, full = full_grid
    asha = tune(recipe, tmp_path / "asha", pruner="asha")
    assert asha["pruned"] >= 1 and asha["epochs_trained"] < full["epochs_trained"]
    survivors = {(g["lr"], g["weight_decay"]): g["val_top1"] for g in asha["grid"]}
    everyone = {(g["lr"], g["weight_decay"]): g["val_top1"] for g in full["grid"]}
    assert survivors and all(everyone[k] == v for k, v in survivors.items())  # the same schedule, the same result


def test_asynchronous_halving_never_prunes_a_run_at_its_last_epoch(recipe, tmp_path):
    """At 3 epochs the last epoch is an asha rung: a run trained to it completes (its val counts in the
    grid), and a pruned run stopped before the end; eval_every 0 (val at the end only) is refused."""
    three = dataclasses.replace(recipe, epochs=3)
    summary = tune(three, tmp_path / "t", pruner="asha")
    import optuna

    from ivpt.engine.study import open_storage, study_key

    trials = optuna.load_study(study_name=f"grid-{study_key(three)}",
                               storage=open_storage(None, tmp_path / "t", 30.0)).get_trials()
    assert summary["pruned"] == sum(t.state.name == "PRUNED" for t in trials) >= 1
    assert all(t.user_attrs["epochs"] < 3 for t in trials if t.state.name == "PRUNED")
    assert len(summary["grid"]) == sum(t.state.name == "COMPLETE" for t in trials)
    with pytest.raises(ConfigError, match=r"eval_every 0: --pruner asha judges the grid points on val at epochs \[1\]"):
        tune(dataclasses.replace(three, eval_every=0), tmp_path / "e", pruner="asha")


@pytest.mark.parametrize("pruner", ["asha", "hyperband"])
def test_a_dead_attempt_does_not_count_twice_at_the_rungs(pruner):
    """A dead worker's failed attempt keeps its rung values and the point's new trial reports them again
    (it replays the run's log): the next point is judged as if the point had reported once."""
    import optuna

    from ivpt.engine.study import GridHalving

    lrs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]

    def next_point_pruned(pruner_of_study, died: bool) -> bool:
        study = optuna.create_study(direction="maximize", pruner=pruner_of_study)

        def reach_rung(lr, value):  # a trial of point lr at epoch 1, the first rung of every bracket here
            study.enqueue_trial({"lr": lr})
            trial = study.ask()
            trial.suggest_categorical("lr", lrs)  # the queued lr
            trial.report(value, 1)
            return trial, trial.should_prune()

        for lr, value in zip(lrs[:4], (0.8, 0.7, 0.6, 0.5)):
            trial, _ = reach_rung(lr, value)
            study.tell(trial, value)
        if died:  # point 0.5 passed rung 1, then its worker died (failed, and the point queued anew)
            trial, _ = reach_rung(0.5, 0.9)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        reach_rung(0.5, 0.9)  # the point's live trial (its retry, if it died) at rung 1
        return reach_rung(0.6, 0.85)[1]

    ours = GridHalving.named(pruner, 9)
    if pruner == "hyperband":  # the scenario needs every point in the bracket that judges at epoch 1
        ours.shares = [1, 0, 0]
    assert next_point_pruned(ours, died=True) == next_point_pruned(ours, died=False) is False
    if pruner == "asha":  # the scenario matters: Optuna's own pruner counts the point twice and prunes the next one
        plain = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
        assert next_point_pruned(plain, died=True) and not next_point_pruned(plain, died=False)


def test_hyperband_keeps_a_point_in_its_bracket_and_prunes_only_at_that_brackets_rungs():
    from ivpt.engine.study import GridHalving

    pruner = GridHalving.named("hyperband", 27)
    assert pruner.shares == [27, 12, 6, 4] and [pruner.rungs(b) for b in range(4)] == [[1, 3, 9], [3, 9], [9], []]
    points = [{"lr": lr, "wd": wd} for lr in (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
              for wd in (0.01, 0.001, 0.0001, 0.0)]
    brackets = [pruner.bracket(p) for p in points]
    assert brackets == [pruner.bracket(dict(p)) for p in points] and len(set(brackets)) > 1
    assert brackets.count(0) > brackets.count(2)  # the early-judging bracket gets the most points


def test_a_study_pruned_one_way_is_not_finished_another_way(recipe, tmp_path):
    one = dataclasses.replace(recipe, protocol={**recipe.protocol, "lrs": [0.03]})
    tune(one, tmp_path / "t", pruner="asha")
    with pytest.raises(ConfigError, match="--pruner none: the study .* was run with --pruner asha"):
        tune(one, tmp_path / "t", pruner="none")


def test_workers_of_one_study_share_its_heartbeat(recipe, tmp_path):
    """Each worker judges the others dead by its own --heartbeat: a worker with a shorter one would fail
    live trials of the study's workers, so it is refused before it takes a trial."""
    one = dataclasses.replace(recipe, protocol={**recipe.protocol, "lrs": [0.03], "seeds": [1]})
    tune(one, tmp_path / "t", pruner="none", heartbeat=5)
    with pytest.raises(ConfigError, match=r"--heartbeat 1: the study .* was run with --heartbeat 5;"):
        tune(one, tmp_path / "t", pruner="none", heartbeat=1)
    assert tune(one, tmp_path / "t", pruner="none", heartbeat=5)["chosen"]["lr"] == 0.03  # the same one goes on


def test_a_point_enqueued_twice_is_trained_and_counted_once(recipe, tmp_path):
    """Two workers that see the same points missing both enqueue them (the race CI once hit): each run is
    trained once (the second trial reads the first one's result back), and the grid counts each point once."""
    import optuna

    from ivpt.engine.study import open_storage, study_key

    out = tmp_path / "tune"
    out.mkdir()
    storage = open_storage(None, out, 30.0)
    study = optuna.create_study(study_name=f"grid-{study_key(recipe)}", storage=storage, direction="maximize")
    for lr in recipe.protocol["lrs"]:  # what two racing workers leave in the queue
        for _ in range(2):
            study.enqueue_trial({"lr": lr, "wd": 0.0}, user_attrs={"point": {"lr": lr, "wd": 0.0}})
    summary = tune(recipe, out, pruner="none")
    complete = [t.params["lr"] for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    assert set(complete) == set(recipe.protocol["lrs"])  # a copy left queued once its point is done is never run
    for run in (out / "grid").iterdir():
        assert [e["epoch"] for e in json.loads((run / "results.json").read_text())["log"]] == [1, 2]
    assert sorted(g["lr"] for g in summary["grid"]) == sorted(recipe.protocol["lrs"])


def test_a_study_left_by_an_earlier_ivpt_resumes(recipe, tmp_path):
    """Output folders tuned before the study moved to Optuna's public API keep their studies (same names
    and keys): a finished point is read back, never trained again, and a point still waiting in Optuna's
    queue (queued without the point as a user attribute) is trained once."""
    import optuna

    from ivpt.engine.study import open_storage, study_key

    two = dataclasses.replace(recipe, protocol={**recipe.protocol, "lrs": [0.3, 0.03], "seeds": [1]})
    out = tmp_path / "tune"
    (done_run, done_cfg), (queued_run, _) = grid_jobs(two, out)
    finished = train(done_cfg, quiet=True)  # what the earlier ivpt trained for its first trial
    before = (done_run / "results.json").read_text()
    study = optuna.create_study(study_name=f"grid-{study_key(two)}", storage=open_storage(None, out, 30.0),
                                direction="maximize")
    space = {"lr": optuna.distributions.CategoricalDistribution([0.3, 0.03]),
             "wd": optuna.distributions.CategoricalDistribution([0.0])}
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.3, "wd": 0.0}, distributions=space,
                                              value=finished["val"]["top1"], user_attrs={"run": str(done_run)}))
    study.enqueue_trial({"lr": 0.03, "wd": 0.0})  # the earlier ivpt's queue entry
    summary = tune(two, out, pruner="none")
    assert (done_run / "results.json").read_text() == before  # read back, not trained again
    assert [e["epoch"] for e in json.loads((queued_run / "results.json").read_text())["log"]] == [1, 2]
    assert sorted(g["lr"] for g in summary["grid"]) == [0.03, 0.3]


def tune_without_hanging(*args, **kwargs):
    """tune(), failing instead of waiting forever on a dead worker's trial."""
    def hung(*_):
        raise TimeoutError("the stage waited on a dead worker's trial")

    signal.signal(signal.SIGALRM, hung)
    signal.alarm(300)
    try:
        return tune(*args, **kwargs)
    finally:
        signal.alarm(0)


def test_a_dead_workers_trial_on_a_journal_file_is_retried(recipe, tmp_path):
    """Optuna's journal storage has no heartbeats: a trial left running by a dead worker (its run folder's
    lock free) is failed and its point trained by the next worker instead of blocking the stage forever."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    from ivpt.engine.study import study_key

    one = dataclasses.replace(recipe, protocol={**recipe.protocol, "lrs": [0.03], "seeds": [1]})
    journal = tmp_path / "journal.log"
    study = optuna.create_study(study_name=f"grid-{study_key(one)}", direction="maximize",
                                storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal))))
    study.enqueue_trial({"lr": 0.03, "wd": 0.0}, user_attrs={"point": {"lr": 0.03, "wd": 0.0}})  # as ivpt queues it
    dead = study.ask()  # popped by a worker that then died: running forever, its run never started
    dead.set_user_attr("run", str(tmp_path / "tune" / "grid" / "lr0.03_wd0"))
    time.sleep(1.1)

    summary = tune_without_hanging(one, tmp_path / "tune", storage=f"journal:{journal}", pruner="none", heartbeat=0.5)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    assert states == ["FAIL", "COMPLETE"] and summary["chosen"]["lr"] == 0.03


def test_a_trial_popped_by_a_worker_killed_before_its_first_heartbeat_is_retried(recipe, tmp_path):
    """SQLite (heartbeats): a trial left running with no heartbeat and no run (its worker died between
    Optuna's ask and the heartbeat thread) is failed after the grace and its point trained, not waited on."""
    import optuna

    from ivpt.engine.study import open_storage, study_key

    one = dataclasses.replace(recipe, protocol={**recipe.protocol, "lrs": [0.03], "seeds": [1]})
    out = tmp_path / "tune"
    out.mkdir()
    study = optuna.create_study(study_name=f"grid-{study_key(one)}", storage=open_storage(None, out, 0.5),
                                direction="maximize")
    study.enqueue_trial({"lr": 0.03, "wd": 0.0}, user_attrs={"point": {"lr": 0.03, "wd": 0.0}})  # as ivpt queues it
    study.ask()  # popped; no heartbeat was ever recorded for it
    time.sleep(1.1)

    summary = tune_without_hanging(one, out, pruner="none", heartbeat=0.5)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    assert states == ["FAIL", "COMPLETE"] and summary["chosen"]["lr"] == 0.03


def test_a_live_trial_of_another_machine_is_left_to_its_heartbeat(tmp_path):
    """Two machines on one PostgreSQL study need not share a filesystem: a running trial whose run folder
    is not here (so no lock is held on it here) but whose heartbeat is fresh is alive, never failed."""
    import threading

    import optuna

    from ivpt.engine.study import StudySettings, _fail_orphans

    settings = StudySettings(heartbeat=0.5)
    study = optuna.create_study(study_name="s", storage=settings.open(tmp_path), direction="maximize")
    elsewhere = tmp_path / "on-the-other-machine" / "lr0.03"
    checked = threading.Event()

    def other_machines_objective(trial):  # runs inside Optuna's heartbeat thread, as a worker's trial does
        trial.set_user_attr("run", str(elsewhere))
        checked.wait(30)
        return 0.5

    worker = threading.Thread(target=study.optimize, args=(other_machines_objective,), kwargs={"n_trials": 1})
    worker.start()
    try:
        while not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            time.sleep(0.05)
        _fail_orphans(study, settings, {0: time.monotonic() - 2.0})  # seen running for longer than the grace
        assert study.get_trials(deepcopy=False)[0].state.name == "RUNNING"
    finally:
        checked.set()
        worker.join()
    assert not elsewhere.parent.exists()  # nor does a worker make folders for another machine's runs


def test_a_popped_trial_stamped_by_another_clock_is_judged_by_how_long_this_worker_saw_it(tmp_path):
    """Optuna stamps a trial's start in the popping machine's local time: a machine five hours behind (or
    in another time zone) makes a trial it popped a moment ago look hours old. Its age is this worker's
    own observation: not failed at first sight, failed once seen running, runless, for the grace."""
    import sqlite3

    import optuna

    from ivpt.engine.study import StudySettings, _fail_orphans, open_storage

    settings = StudySettings(heartbeat=0.5)
    study = optuna.create_study(study_name="s", storage=open_storage(None, tmp_path, 0.5), direction="maximize")
    study.enqueue_trial({"lr": 0.03})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.ask()  # popped on the other machine, which has not named its run yet
    db = next(tmp_path.glob("*.db"))
    with sqlite3.connect(db) as connection:
        assert connection.execute("UPDATE trials SET datetime_start = '2026-01-01 00:00:00'").rowcount == 1
    here = optuna.load_study(study_name="s", storage=open_storage(None, tmp_path, 0.5))
    assert here.get_trials(deepcopy=False)[0].datetime_start.year == 2026
    seen: dict[int, float] = {}
    _fail_orphans(here, settings, seen)
    assert here.get_trials(deepcopy=False)[0].state.name == "RUNNING" and list(seen) == [0]
    time.sleep(1.1)
    _fail_orphans(here, settings, seen)
    assert here.get_trials(deepcopy=False)[0].state.name == "FAIL" and seen == {0: seen[0]}
    _fail_orphans(here, settings, seen)
    assert seen == {}  # no longer running: forgotten


def test_a_live_trial_failed_by_another_worker_is_finished_by_its_retry(recipe, tmp_path, monkeypatch):
    """A late heartbeat: another worker fails this worker's trial in the middle of its run. This worker
    stops that trial with a warning instead of crashing, and the point's retry resumes the run."""
    import optuna

    import ivpt.engine.loop as loop

    one = dataclasses.replace(recipe, protocol={**recipe.protocol, "lrs": [0.03], "seeds": [1]})
    real_train, calls = loop.train, []

    def train(cfg, *, on_epoch=None, **kwargs):
        calls.append(cfg.train_split)
        if len(calls) > 1 or on_epoch is None:
            return real_train(cfg, on_epoch=on_epoch, **kwargs)

        def late_heartbeat(entry):  # epoch 1 done: the trial is failed under this worker
            if entry["epoch"] == 1:
                other = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'tune' / 'study.db'}")
                running = [(study, t.number) for s in optuna.get_all_study_summaries(other)
                           for study in [optuna.load_study(study_name=s.study_name, storage=other)]
                           for t in study.trials if t.state.name == "RUNNING"]
                study, number = running[0]
                study.tell(number, state=optuna.trial.TrialState.FAIL)
            on_epoch(entry)
        return real_train(cfg, on_epoch=late_heartbeat, **kwargs)

    monkeypatch.setattr(loop, "train", train)
    with pytest.warns(UserWarning, match="was ended by another worker while this one ran it"):
        summary = tune(one, tmp_path / "tune", pruner="none")
    log = json.loads((tmp_path / "tune" / "grid" / "lr0.03_wd0" / "results.json").read_text())["log"]
    assert [e["epoch"] for e in log] == [1, 2] and summary["chosen"]["lr"] == 0.03


def test_a_storage_shared_by_two_outputs_is_refused_unless_the_seed_differs(recipe, tmp_path):
    one = dataclasses.replace(recipe, protocol={**recipe.protocol, "lrs": [0.03], "seeds": [1]})
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    tune(one, tmp_path / "a", storage=storage, pruner="none")
    with pytest.raises(ConfigError, match="--storage: .* has no results.json .*another --output"):
        tune(one, tmp_path / "b", storage=storage, pruner="none")
    other_seed = tune(dataclasses.replace(one, seed=7), tmp_path / "c", storage=storage, pruner="none")
    assert json.loads((tmp_path / "c" / "grid" / "lr0.03_wd0" / "results.json").read_text())["config"]["seed"] == 7
    assert other_seed["chosen"]["lr"] == 0.03


POSTGRES_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))


def _postgres_tool(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in reversed(POSTGRES_BIN) if os.path.exists(f"{d}/{name}")), None)


@pytest.fixture(scope="module")
def postgresql():
    """A PostgreSQL server of its own, started as a user would (initdb, pg_ctl on a Unix socket, createdb):
    its SQLAlchemy URL. As root (initdb refuses root) the server runs as the system user 'postgres' that
    Debian's package creates, like Debian's own clusters."""
    tools = {name: _postgres_tool(name) for name in ("initdb", "pg_ctl", "createdb")}
    if None in tools.values():
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl/createdb; Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is not installed: pip install 'ivpt[postgres]'")
    as_user = []
    if os.geteuid() == 0:
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and PostgreSQL's initdb refuses root; no 'postgres' user to run it as")
        as_user = ["runuser", "-u", "postgres", "--"]
    home = tempfile.mkdtemp(prefix="ivpt-pg-")  # short: a Unix socket's path has at most 107 characters
    if as_user:
        os.chown(home, owner.pw_uid, owner.pw_gid)
    run = functools.partial(subprocess.run, check=True, capture_output=True, timeout=60)
    data = f"{home}/data"
    run([*as_user, tools["initdb"], "-D", data, "-U", "ivpt", "--auth=trust", "--no-sync"])
    run([*as_user, tools["pg_ctl"], "-D", data, "-l", f"{home}/server.log", "-w", "start",
         "-o", f"-k {home} -c listen_addresses='' -c fsync=off"])
    try:
        run([*as_user, tools["createdb"], "-h", home, "-U", "ivpt", "ivpt"])
        yield f"postgresql+psycopg://ivpt@/ivpt?host={home}"
    finally:
        run([*as_user, tools["pg_ctl"], "-D", data, "-m", "immediate", "stop"])
        shutil.rmtree(home, ignore_errors=True)


def _storage_url(kind: str, folder, request) -> str:
    if kind == "postgresql":
        return request.getfixturevalue("postgresql")
    return f"sqlite:///{folder / 'shared.db'}" if kind == "sqlite" else f"journal:{folder / 'shared.journal'}"


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_two_workers_on_one_storage_one_killed_train_every_point_once(kind, recipe, tmp_path, full_grid, request):
    """Two `ivpt tune` processes (two machines' worth) on one study; one is SIGKILLed in the middle of a grid
    run. The other notices (a stale heartbeat; on a journal file the run's free lock), resumes that run
    from its checkpoint and finishes the protocol: every grid run trained once, start to end, and the
    choice and test scores of an uninterrupted run."""
    storage = _storage_url(kind, tmp_path, request)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(recipe.to_dict()))))
    command = [sys.executable, "-m", "ivpt.cli", "tune", str(path), "--output", str(tmp_path / "shared"),
               "--storage", storage, "--pruner", "none", "--heartbeat", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    doomed, survivor = (subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         start_new_session=True) for _ in range(2))
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not _mid_run(tmp_path / "shared" / "grid", doomed.pid):
            assert doomed.poll() is None, doomed.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        assert doomed.poll() is None, "the tuning finished before it could be killed mid-run"
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()
        _, err = survivor.communicate(timeout=300)
        assert survivor.returncode == 0, err.decode()[-2000:]
    finally:
        for proc in (doomed, survivor):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    for run in (tmp_path / "shared" / "grid").iterdir():
        log = json.loads((run / "results.json").read_text())["log"]
        assert [e["epoch"] for e in log] == [1, 2]  # each epoch once: the killed run resumed, not restarted
    summary = json.loads((tmp_path / "shared" / "summary.json").read_text())
    assert (summary["chosen"], summary["test_top1"]) == (full_grid[1]["chosen"], full_grid[1]["test_top1"])


def _mid_run(grid, pid: int) -> bool:
    """Whether process ``pid`` holds a grid run that has a checkpoint and no result yet."""
    for lock in grid.glob(f"*/{LOCK_NAME}") if grid.exists() else ():
        run = lock.parent
        try:
            holder = json.loads(lock.read_text() or "{}").get("pid")
        except ValueError:  # being written
            continue
        if holder == pid and (run / "checkpoint.json").exists() and not (run / "results.json").exists():
            return True
    return False


def test_a_signal_during_a_runs_last_evaluation_starts_no_new_run(recipe, tmp_path, full_grid, monkeypatch):
    """SIGTERM while a grid run makes its final evaluation: that run finishes (its results are complete), and
    the tuner then trains no other point but stops with Preempted; the same call again finishes the protocol
    with an uninterrupted run's choice and scores."""
    from ivpt.engine import loop

    real, calls = loop._finish, []

    def finish_signalled(run, done):
        calls.append(run.out)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(run, done)

    monkeypatch.setattr(loop, "_finish", finish_signalled)
    with pytest.raises(Preempted, match="tuning stopped by SIGTERM between runs"):
        tune(recipe, tmp_path / "t", pruner="none")
    assert len(calls) == 1 and [r.parent.name for r in (tmp_path / "t" / "grid").glob("*/results.json")] == \
        [calls[0].name]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    summary = tune(recipe, tmp_path / "t", pruner="none")
    assert (summary["chosen"], summary["test_top1"]) == (full_grid[1]["chosen"], full_grid[1]["test_top1"])


def test_a_stopped_run_whose_trial_another_worker_failed_still_stops_the_tuner(recipe, tmp_path, monkeypatch):
    """A run stops on a signal (Preempted) while another worker has failed its trial meanwhile, so Optuna refuses
    to record the failure: the stop still ends the tuning (the worker exits 75) instead of being swallowed with
    Optuna's refusal while the worker trains on."""
    from ivpt.engine import loop

    real, calls = loop.train, []

    def stopped_after_its_trial_was_failed(cfg, **kwargs):
        calls.append(cfg.output)
        if len(calls) > 1:
            return real(cfg, **kwargs)
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 't' / 'study.db'}")
        for study in storage.get_all_studies():
            for trial in storage.get_all_trials(study._study_id, states=(optuna.trial.TrialState.RUNNING,)):
                storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        raise Preempted("stopped by SIGTERM after step 1/1 of epoch 1", cfg.output)

    monkeypatch.setattr(loop, "train", stopped_after_its_trial_was_failed)
    with pytest.raises(Preempted, match="stopped by SIGTERM after step"):
        tune(recipe, tmp_path / "t", pruner="none")
    assert len(calls) == 1


def test_a_signal_while_a_worker_starts_reaches_it(recipe, tmp_path, monkeypatch):
    """SIGTERM while the first worker is being started, before it has a pid to pass the signal to: it gets
    the signal once started, no other worker starts, and tune stops instead of waiting while that worker
    trains the whole study."""
    import multiprocessing.context

    real = multiprocessing.context.SpawnProcess.start

    def start_signalled(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", start_signalled)
    with pytest.raises(Preempted, match=r"1 of 2 workers stopped"):
        tune(recipe, tmp_path / "t", workers=2, pruner="none")
    assert not list((tmp_path / "t").rglob("results.json"))


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (from /proc; a zombie counts as ended)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            state, ppid = open(stat).read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):  # ended meanwhile
            continue
        if int(ppid) == pid and state != "Z":
            found.append(int(stat.split("/")[2]))
    return found


def _ended(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_tuner_leaves_no_worker_training(signum, recipe, tmp_path, full_grid):
    """`ivpt tune --workers 2` stopped in the middle of a grid run by a signal to its main process alone (as
    Kubernetes signals PID 1, or `kill PID`). SIGTERM: passed on, the workers checkpoint and the main process
    exits 75 once they have stopped. SIGKILL: the workers notice their parent is gone and stop the same way.
    Either way none trains on; after SIGTERM the same tuning then finishes: each epoch trained once, and the
    choice and test scores of an uninterrupted run."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(recipe.to_dict()))))
    command = [sys.executable, "-m", "ivpt.cli", "tune", str(path), "--output", str(tmp_path / "t"),
               "--pruner", "none", "--workers", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    main = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not any(_mid_run(tmp_path / "t" / "grid", pid) for pid in _children(main.pid)):
            assert main.poll() is None, main.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        children = _children(main.pid)  # the two workers and multiprocessing's resource tracker
        workers = [pid for pid in children if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]
        assert main.poll() is None and len(workers) == 2, "the tuning finished before it could be stopped mid-run"
        os.kill(main.pid, signum)
        _, err = main.communicate(timeout=120)
        if signum == signal.SIGTERM:
            assert main.returncode == EXIT_PREEMPTED, err.decode()[-2000:]
            assert "2 of 2 workers stopped" in err.decode() and "run the same command again" in err.decode()
            assert all(_ended(pid) for pid in workers)  # it waited for them
        deadline = time.time() + 60
        while time.time() < deadline and not all(_ended(pid) for pid in children):
            time.sleep(0.1)
        assert all(_ended(pid) for pid in children), "a worker trains on after its parent was stopped"
        assert not (tmp_path / "t" / "summary.json").exists()  # they stopped, not finished the protocol
    finally:
        try:  # whatever is left of its session (start_new_session): nothing, when it passed
            os.killpg(main.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if signum == signal.SIGKILL:
        return  # what a rerun finds is the same either way: checked once, below
    summary = tune(recipe, tmp_path / "t", pruner="none")  # the rerun (here, in one process)
    for run in (tmp_path / "t" / "grid").iterdir():
        log = json.loads((run / "results.json").read_text())["log"]
        assert [e["epoch"] for e in log] == [1, 2]  # each epoch once: the stopped runs resumed, not restarted
    assert (summary["chosen"], summary["test_top1"]) == (full_grid[1]["chosen"], full_grid[1]["test_top1"])


def test_bad_storage_and_devices_are_named(recipe, tmp_path):
    with pytest.raises(ConfigError, match="--storage"):
        tune(recipe, tmp_path / "t", storage="nosuchdb://x/y")
    with pytest.raises(ConfigError, match=r"eval_every 0: --pruner sha judges the grid points on val at epochs \[1\]"):
        tune(dataclasses.replace(recipe, eval_every=0), tmp_path / "t", pruner="sha")
    with pytest.raises(ConfigError, match="--pruner 'fast'"):
        tune(recipe, tmp_path / "t", pruner="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--devices: device '0' does not exist"):
            tune(recipe, tmp_path / "t", devices=["0"], workers=2)


def test_a_finished_run_of_another_recipe_is_not_reused(recipe, tmp_path):
    """Same output folder, a longer schedule: the old grid runs' results.json must not stand in for the new ones."""
    from ivpt.engine.checkpoint import CheckpointError

    small = dataclasses.replace(recipe, protocol={**recipe.protocol, "lrs": [0.03]})
    tune(small, tmp_path / "tune", pruner="none")
    with pytest.raises(CheckpointError, match=r"lr0.03_wd0/results.json is a finished run of another config.*epochs"):
        tune(dataclasses.replace(small, epochs=3), tmp_path / "tune", pruner="none")


OPEN_TOGETHER = """
import sys, time
from pathlib import Path
from ivpt.engine.study import open_storage
folder, url, index, count = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
(folder / f"ready-{index}").touch()
while len(list(folder.glob("ready-*"))) < count:  # every process imported: open at the same moment
    time.sleep(0.001)
open_storage(url, folder, 1.0)
"""


def test_workers_opening_a_new_sqlite_storage_at_once_all_open_it(tmp_path):
    """Processes started together on a new database race to create Optuna's tables ('table studies already
    exists' for all but one); each loser looks again and finds them (what two `ivpt tune` started together
    on one new --storage meet)."""
    url, count = f"sqlite:///{tmp_path / 'new.db'}", 4
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_TOGETHER, str(tmp_path), url, str(i), str(count)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(count)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-600:] for e in errors if e]
