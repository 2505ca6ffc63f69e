"""Pause the long benchmark runs at a session's end and stage their state for a commit.

    python benchmarks/pause.py          # SIGTERM the shards, wait, stage benchmarks/state/suite-protocol; then git commit

The shards (benchmarks/tuner.py, benchmarks/accuracy.py) get SIGTERM: each run checkpoints at its next
step boundary and stops (ivpt's preemption). Then every record under --state is staged (git add -A:
its .gitignore keeps tensors and checkpoints out), and for each interrupted run (a checkpoint, no
results.json) that was training when the signal came (its run lock was held) its checkpoint.json and
tensors are staged as well when the tensors are small (prompt and module methods: a few hundred KB;
full fine-tuning's tens of MB stay out and that run starts again), so the next session resumes it where
it stopped instead of from epoch 0. Runs paused or pruned at a rung keep no tensors in git: the study
records their epochs, and a pruned run never trains again.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARDS = ("benchmarks/tuner.py", "benchmarks/accuracy.py")


def shard_pids() -> list[int]:
    pids = []
    for script in SHARDS:
        found = subprocess.run(["pgrep", "-f", script], capture_output=True, text=True).stdout.split()
        pids += [int(p) for p in found if int(p) != os.getpid()]
    return pids


def stop_shards(timeout: float) -> None:
    pids = shard_pids()
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while shard_pids() and time.time() < deadline:
        time.sleep(1)
    left = shard_pids()
    if left:
        raise SystemExit(f"shards still running after {timeout:.0f} s: {left}; nothing staged")
    print(f"stopped {len(pids)} shard(s)")


def training_now(state: Path) -> list[Path]:
    """Run folders whose lock a live process holds (ivpt.engine.runlock: a kernel file lock)."""
    from ivpt.engine.runlock import LOCK_NAME, RunLock, RunLockedError

    busy = []
    for lock in state.rglob(LOCK_NAME):
        try:
            RunLock(lock.parent).acquire().release()
        except RunLockedError:
            busy.append(lock.parent)
    return busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", default=str(ROOT / "benchmarks" / "state" / "suite-protocol"))
    parser.add_argument("--max-mb", type=float, default=2.0, help="largest checkpoint tensors file to stage (MB)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the shards to stop")
    args = parser.parse_args()
    state = Path(args.state)
    busy = training_now(state)
    stop_shards(args.timeout)
    subprocess.run(["git", "add", "-A", str(state)], cwd=ROOT, check=True)
    kept, dropped = 0, []
    for run in busy:
        meta = run / "checkpoint.json"
        if (run / "results.json").is_file() or not meta.is_file():
            continue
        tensors = meta.parent / json.loads(meta.read_text())["tensors_file"]
        if tensors.is_file() and tensors.stat().st_size <= args.max_mb * 2 ** 20:
            subprocess.run(["git", "add", "-f", str(meta), str(tensors)], cwd=ROOT, check=True)
            kept += 1
        else:
            dropped.append(str(meta.parent.relative_to(state)))
    print(f"staged {state}: {kept} interrupted run(s) with their checkpoints"
          + (f"; too large to keep, will restart: {', '.join(dropped)}" if dropped else ""))


if __name__ == "__main__":
    main()
