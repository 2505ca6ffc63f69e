"""Preemption and faults: a run stopped by a signal or killed at any point resumes to the same adapter."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ivpt
from ivpt import cli
from ivpt.backbones import pretrain
from ivpt.engine.checkpoint import checkpoint_meta, load_checkpoint
from ivpt.engine.loop import train
from ivpt.engine.preemption import EXIT_PREEMPTED, Preempted, StepCheckpoints, StopRequest
from conftest import adapter_tensors, config, pretrain_args

COMMON = dict(epochs=3, warmup_epochs=1, method_options={"prompt_length": 3, "ar_gamma_init": 0.1, "prompt_dropout": 0.1})


def signal_at(monkeypatch, global_step: int, signum=signal.SIGTERM):
    """Send ourselves ``signum`` right after training step ``global_step``, as a scheduler would."""
    real = StepCheckpoints.after_step

    def after_step(self, step, epoch_done):
        if step == global_step:
            os.kill(os.getpid(), signum)
        return real(self, step, epoch_done)

    monkeypatch.setattr(StepCheckpoints, "after_step", after_step)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_mid_epoch_checkpoints_that_step_and_resume_is_bit_identical(setup, monkeypatch, signum):
    tmp_path, folder = setup
    reference = train(config(tmp_path, folder, output=str(tmp_path / "ref"), **COMMON), quiet=True)
    cfg = config(tmp_path, folder, **COMMON)  # 3 steps an epoch (24 images, batch 8)
    signal_at(monkeypatch, 4, signum)  # the first step of the second epoch
    with pytest.raises(Preempted, match=f"stopped by {signal.Signals(signum).name} after step 1/3 of epoch 2"):
        train(cfg, quiet=True)
    meta = checkpoint_meta(tmp_path / "run")
    assert (meta["epoch"], meta["step"]) == (1, 1) and not (tmp_path / "run" / "adapter").exists()
    monkeypatch.undo()
    resumed = train(cfg, resume=True, quiet=True)
    a, b = adapter_tensors(tmp_path / "ref"), adapter_tensors(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e["train_loss"] for e in resumed["log"]] == [e["train_loss"] for e in reference["log"]]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the run


def test_cli_exit_code_on_preemption(setup, monkeypatch, capsys):
    tmp_path, folder = setup
    cfg = config(tmp_path, folder, **COMMON)
    (tmp_path / "r.yaml").write_text(json.dumps(cfg.to_dict()))
    signal_at(monkeypatch, 2)
    assert cli.main(["train", str(tmp_path / "r.yaml")]) == EXIT_PREEMPTED == 75
    assert "continue with --resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert cli.main(["train", str(tmp_path / "r.yaml"), "--resume"]) == 0


def test_pretraining_stops_on_a_signal_and_resumes_to_the_same_weights(cifar_tar, tmp_path, monkeypatch):
    full = pretrain.main(pretrain_args(cifar_tar, tmp_path / "a"))
    real = pretrain.augment
    calls = {"n": 0}

    def augment(*a, **k):  # 4 steps an epoch (16 images, batch 4): signal during the 6th step
        calls["n"] += 1
        if calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(pretrain, "augment", augment)
    with pytest.raises(Preempted, match="after step 2/4 of epoch 2"):
        pretrain.main(pretrain_args(cifar_tar, tmp_path / "b"))
    monkeypatch.undo()
    resumed = pretrain.main(pretrain_args(cifar_tar, tmp_path / "b"))
    assert resumed["weights_sha256"] == full["weights_sha256"]


CHILD = """
import json, os, signal, sys
from ivpt.engine.config import TrainConfig
from ivpt.engine.loop import train
target, hit = sys.argv[2], int(sys.argv[3])
real, seen = os.replace, {"n": 0}
def replace(src, dst):
    if os.path.basename(str(dst)) == target:
        seen["n"] += 1
        if seen["n"] == hit:
            os.kill(os.getpid(), signal.SIGKILL)  # between writing the new file and committing it
    return real(src, dst)
os.replace = replace
if target == "step":
    from ivpt.engine import preemption
    step_real = preemption.StepCheckpoints.after_step
    def after_step(self, step, epoch_done):
        if step == hit:
            os.kill(os.getpid(), signal.SIGKILL)
        return step_real(self, step, epoch_done)
    preemption.StepCheckpoints.after_step = after_step
train(TrainConfig(**json.loads(sys.argv[1])), resume=True, quiet=True)
"""


@pytest.mark.parametrize("target,hit", [
    ("step", 5),                      # mid-epoch, with a step checkpoint every 2 steps
    ("checkpoint.json", 2),           # the second checkpoint's tensors written, not yet named
    ("adapter.safetensors", 1),       # the adapter written to its temporary name, not yet committed
    ("adapter_config.json", 1),       # the adapter committed, its readable JSON copy not yet
])
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_adapter(setup, target, hit):
    tmp_path, folder = setup
    common = dict(COMMON, checkpoint_every_steps=2)
    train(config(tmp_path, folder, output=str(tmp_path / "ref"), **common), quiet=True)
    cfg = config(tmp_path, folder, **common)
    env = {k: v for k, v in os.environ.items()}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg.to_dict()), target, str(hit)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    run = tmp_path / "run"
    # whatever was left loads, or says clearly why not
    load_checkpoint(run)
    if target == "step":
        assert checkpoint_meta(run)["step"] == 1  # killed after step 5 = epoch 2's 2nd: step 4 was saved
    if (run / "adapter").exists():
        try:
            ivpt.load_adapter(run / "adapter")
        except FileNotFoundError as err:  # killed before the first adapter was committed: said clearly
            assert "no adapter at" in str(err) and target == "adapter.safetensors"
    train(cfg, resume=True, quiet=True)
    a, b = adapter_tensors(tmp_path / "ref"), adapter_tensors(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["method"] == "ivpt"
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]  # the killed process's temporaries are gone


def _ddp_stop_worker(rank, world, port, cfg_dict, out):
    import torch.distributed  # noqa: F401
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    from ivpt.engine import preemption
    from ivpt.engine.config import TrainConfig

    real = preemption.StepCheckpoints.after_step

    def after_step(self, step, epoch_done):
        if rank == 1 and step == 2:  # only one rank gets the signal
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, step, epoch_done)

    preemption.StepCheckpoints.after_step = after_step
    try:
        train(TrainConfig(**cfg_dict), quiet=True)
        Path(f"{out}.rank{rank}").write_text("finished")
    except Preempted as stop:
        Path(f"{out}.rank{rank}").write_text(str(stop))


def test_under_ddp_every_rank_stops_at_the_same_step(setup):
    import torch.multiprocessing as mp
    from conftest import free_port

    tmp_path, folder = setup
    cfg = config(tmp_path, folder, **COMMON)
    mp.start_processes(_ddp_stop_worker, args=(2, free_port(), cfg.to_dict(), str(tmp_path / "stop")), nprocs=2,
                       join=True, start_method="spawn")
    said = [(tmp_path / f"stop.rank{r}").read_text() for r in (0, 1)]
    # rank 0 never got the signal, yet stopped at the same step
    assert all("after step 2/3 of epoch 1" in text for text in said), said
    assert said[1].startswith("stopped by SIGTERM") and said[0].startswith("stopped by a signal")
    assert checkpoint_meta(tmp_path / "run")["step"] == 2  # written by rank 0


def test_a_request_the_block_did_not_answer_goes_to_the_enclosing_stop_request():
    """A signal that a run finished despite (one during its last evaluation) reaches the tuner's loop around
    it; one the run answered with Preempted does not; with nothing around it (`ivpt train`) nothing happens."""
    with StopRequest() as outer:
        with StopRequest() as inner:
            os.kill(os.getpid(), signal.SIGUSR1)
        assert inner.requested and outer.signal == "SIGUSR1"
    with StopRequest() as outer:
        with pytest.raises(Preempted):
            with StopRequest():
                os.kill(os.getpid(), signal.SIGTERM)
                raise Preempted("stopped", "")
        assert not outer.requested
    with StopRequest() as alone:
        os.kill(os.getpid(), signal.SIGTERM)
    assert alone.requested and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # and this process lives on
    called = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: called.append(a))  # a launcher's own handler
    try:
        with StopRequest():
            os.kill(os.getpid(), signal.SIGUSR1)
        assert called == []  # only an enclosing StopRequest is given the request, never another handler
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_stop_request_opened_after_a_signal_takes_it_over():
    """A run started just after a signal (the tuner was reading its storage) stops after its first step."""
    with StopRequest() as outer:
        os.kill(os.getpid(), signal.SIGUSR1)
        with StopRequest() as inner:
            assert inner.signal == "SIGUSR1"
    assert outer.requested


def test_one_stop_delivered_twice_is_one_request_and_each_is_passed_on():
    """A scheduler's SIGTERM to every process of a job and the parent's passing it on reach a worker
    within moments: one stop (the second would otherwise end the process uncaught)."""
    passed = []
    with StopRequest(then=passed.append) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signal == "SIGTERM" and passed == [signal.SIGTERM]  # the repeat within the window: not again
    # nested as in a tuner (its trial loop around a run): a deliberate second signal still ends it at once
    script = ("import os, signal, time\nfrom ivpt.engine.preemption import SAME_STOP_SECONDS, StopRequest\n"
              "with StopRequest(), StopRequest():\n    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(SAME_STOP_SECONDS + 0.2)\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(5)\n")
    later = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert later.returncode == -signal.SIGTERM, later.stderr.decode()

