"""One writer per run folder."""
import json
import os
import socket
import subprocess
import sys

import pytest

from ivpt import cli
from ivpt.engine.loop import train
from ivpt.engine.runlock import LOCK_NAME, RunLock, RunLockedError
from conftest import config


def test_a_second_writer_fails_at_once_naming_the_holder(setup, capsys):
    tmp_path, folder = setup
    cfg = config(tmp_path, folder, epochs=1, warmup_epochs=0)
    child = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom ivpt.engine.runlock import RunLock\n"
                              f"lock = RunLock({cfg.output!r}).acquire()\nprint('held', flush=True)\ntime.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"in use by another ivpt process \(pid {child.pid} on "
                                                 rf"{socket.gethostname()}"):
            train(cfg, quiet=True)
        assert not (tmp_path / "run" / "checkpoint.json").exists()  # nothing was written
        assert cli.main(["train", "--set", f"output={cfg.output}", "data.kind=folder", f"data.root={folder}",
                         f"weights={cfg.weights}", "backbone=vit_mini_patch4_32",
                         "backbone_options={embed_dim: 32, depth: 2, num_heads: 2}", "epochs=1",
                         "warmup_epochs=0"]) == 1
        assert f"pid {child.pid}" in capsys.readouterr().err
    finally:
        child.kill()
        child.wait()
    # the holder was killed: its lock file stays, its lock does not; the run goes ahead
    assert (tmp_path / "run" / LOCK_NAME).is_file()
    results = train(cfg, quiet=True)
    assert results["epochs_run"] == 1
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_lock_is_released_after_the_run(tmp_path):
    with RunLock(tmp_path / "r"):
        with pytest.raises(RunLockedError):
            RunLock(tmp_path / "r").acquire()
    with RunLock(tmp_path / "r"):  # free again
        pass
