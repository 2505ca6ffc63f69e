"""tools/pause.py: a benchmark's run folder, paused and archived, resumes from the archive in another place."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml
from conftest import config, load_script, make_folder

from ivpt.engine.preemption import EXIT_PREEMPTED
from ivpt.engine.study import tune

def load_tool():
    return load_script("tools/pause.py")


def without_times(log):
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in log]


def stopped_mid_run(study: Path) -> bool:
    """One grid run finished and another part-way (a checkpoint, no result): the moment to pause."""
    runs = list(study.glob("grid/*"))
    return any((r / "results.json").exists() for r in runs) and \
        any((r / "checkpoint.json").exists() and not (r / "results.json").exists() for r in runs)


def test_a_paused_tuning_resumes_from_its_archive_on_another_machine(setup, tmp_path):
    """SIGTERM mid-run (as pause.py sends), archive, unpack elsewhere with the first folder gone: the same
    command finishes the study with the uninterrupted result and trains no finished run again."""
    root, _ = setup
    folder = make_folder(root / "more", per_class=40)  # epochs long enough to pause one part-way
    cfg = config(root, folder, method="vpt-deep", method_options={"prompt_length": 2}, epochs=4, warmup_epochs=0,
                 batch_size=4, protocol={"lrs": [0.3, 0.03, 0.003], "wds": [0.0], "seeds": [1]})
    reference = tune(cfg, tmp_path / "reference", pruner="none")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict()))))
    first = tmp_path / "machine-a" / "state" / "run"
    command = [sys.executable, "-m", "ivpt.cli", "tune", str(recipe), "--output", str(first), "--pruner", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not stopped_mid_run(first):
        time.sleep(0.05)
    assert proc.poll() is None, "the tuning ended before a grid run could be paused part-way"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, proc.stderr.read()[-2000:]
    finished = {p.relative_to(first): p.read_bytes() for p in first.glob("*/*/results.json")}
    part_way = [p.parent.relative_to(first) for p in first.glob("grid/*/checkpoint.json")
                if not (p.parent / "results.json").exists()]
    assert finished and part_way and not (first / "summary.json").exists()

    packed = load_tool().archive(first)
    assert packed == first.with_name("run.tar.gz")
    with tarfile.open(packed) as tar:
        names = tar.getnames()
    assert "run/study.db" in names and not any(name.endswith(".ivpt.lock") for name in names)
    second = tmp_path / "machine-b" / "state"
    second.mkdir(parents=True)
    shutil.copy(packed, second)
    shutil.rmtree(tmp_path / "machine-a")
    with tarfile.open(second / "run.tar.gz") as tar:
        tar.extractall(second)

    resumed = tune(cfg, second / "run", pruner="none")
    assert resumed["chosen"] == reference["chosen"] and resumed["test_top1"] == reference["test_top1"]
    for run in part_way:  # paused part-way: it ends as the uninterrupted run did, epoch by epoch
        resumed_log, reference_log = (json.loads((study / run / "results.json").read_text())["log"]
                                      for study in (second / "run", tmp_path / "reference"))
        assert len(resumed_log) == cfg.epochs and without_times(resumed_log) == without_times(reference_log)
    for path, data in finished.items():  # finished before the pause: read back, not trained again
        assert (second / "run" / path).read_bytes() == data
