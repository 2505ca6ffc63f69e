"""Pause a long benchmark and pack its run state into one archive, to resume it here later or on another machine.

    python tools/pause.py                                   # SIGTERM the shards, wait, write benchmarks/state/suite-protocol.tar.gz
    python tools/pause.py --state benchmarks/state/testbed  # another run folder
    python tools/pause.py --no-stop                         # only the archive (nothing is running)

    # on the next machine, in the repository's root, then the same benchmark command as before:
    mkdir -p benchmarks/state && tar -xzf suite-protocol.tar.gz -C benchmarks/state

The shards (benchmarks/tuner.py, benchmarks/accuracy.py, `ivpt benchmark suite`) get SIGTERM: each run writes a checkpoint at its
next step boundary and stops (ivpt's preemption). Then the whole run folder (the Optuna studies, every
run's results, logs, adapter and checkpoint, tensors included) is written to ``<folder>.tar.gz`` next to
it, without the run locks. Run state is never committed (benchmarks/state/ is ignored); the summaries the
tables are built from are, under benchmarks/results/, so a rerun on a machine without the archive skips
every finished (method, task) but starts an unfinished one from scratch.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the shard scripts, and `ivpt benchmark suite` (whose main process passes the signal on to its --workers)
SHARDS = ("benchmarks/tuner.py", "benchmarks/accuracy.py", r"ivpt(\.cli)? benchmark suite")  # pgrep -f: regexes
LEFT_OUT = (".ivpt.lock", "tuner_wall.lock")  # kernel locks of live processes: meaningless elsewhere


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
        raise SystemExit(f"shards still running after {timeout:.0f} s: {left}; nothing archived")
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


def archive(state: Path, target: Path | None = None) -> Path:
    """``state`` as ``<state>.tar.gz`` next to it (or ``target``), its members relative to its parent folder.

    Written to a temporary name first: an archive cut short by a full disk never replaces a good one."""
    state = state.resolve()
    if not state.is_dir():
        raise SystemExit(f"{state}: no such run folder (the benchmark's --runs)")
    target = (target or state.with_name(state.name + ".tar.gz")).resolve()
    partial = target.with_name(target.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(state, arcname=state.name, filter=lambda member: None if Path(member.name).name in LEFT_OUT else member)
    partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", default=str(ROOT / "benchmarks" / "state" / "suite-protocol"),
                        help="the run folder to archive (the benchmark's --runs)")
    parser.add_argument("--out", default=None, help="the archive to write (default: <state>.tar.gz next to it)")
    parser.add_argument("--no-stop", action="store_true", help="archive only; stop no process")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the shards to stop")
    args = parser.parse_args(argv)
    state = Path(args.state).expanduser()
    if not args.no_stop:
        busy = training_now(state) if state.is_dir() else []
        stop_shards(args.timeout)
        if busy:
            print(f"{len(busy)} run(s) stopped mid-way with a checkpoint: they resume where they stopped")
    target = archive(state, Path(args.out).expanduser() if args.out else None)
    parent = state.resolve().parent
    where = parent.relative_to(ROOT) if parent.is_relative_to(ROOT) else parent
    print(f"wrote {target} ({target.stat().st_size / 2 ** 20:.1f} MiB); on the next machine, in the repository: "
          f"mkdir -p {where} && tar -xzf {target.name} -C {where}, then the same benchmark command")


if __name__ == "__main__":
    main()
