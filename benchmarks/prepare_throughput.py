"""Throughput of `ivpt data prepare vtab-1k` and `ivpt data check` (images per second) on a full-size fixture.

    python benchmarks/prepare_throughput.py                 # the 19 tasks at their real split sizes, 32 px JPEGs
    python benchmarks/prepare_throughput.py --quick         # two tasks (dtd, kitti), 8 px: a smoke run, not a figure

The fixture is VTAB-1k's processed layout at the real counts (19,000 training and 387,905 test images
for all 19 tasks), written once to a temporary folder as one zip (`vtab-1k/<task>/...`, as the shared
archive holds it), with small images of distinct bytes. Then, for each `--workers` setting, a fresh
`prepare_vtab` from that zip (extract, verify: read and sha256 every image, decode it fully, write and
rename each task) and a `check_folder` of the result are timed. Image size matters only for the
decoding share; file count dominates for small images, so this is a bound on the per-file cost.
Results go to benchmarks/results/prepare.json (rendered by benchmarks/report.py in docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from common import RESULTS, machine, today, write_json
from PIL import Image

from ivpt.data.check import VTAB_TEST_SIZES, check_folder
from ivpt.data.prepare import prepare_vtab
from ivpt.data.vtab import VTAB_TASKS

QUICK_TASKS = ("dtd", "kitti")


def base_images(size: int, count: int = 64) -> list[bytes]:
    out = []
    for seed in range(count):
        pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def distinct(bases: list[bytes], number: int) -> bytes:
    """A real JPEG no other file shares: a numbered comment segment right after the start marker."""
    base, note = bases[number % len(bases)], f"{number}".encode()
    return base[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + base[2:]


def write_fixture(path: Path, tasks: list[str], size: int) -> int:
    """The zip of the processed layout at real split sizes; returns the number of images."""
    bases, number = base_images(size), 0
    with zipfile.ZipFile(path, "w") as archive:
        for task in tasks:
            classes, lists = VTAB_TASKS[task][0], {}
            for split, count in (("train800", 800), ("val200", 200), ("test", VTAB_TEST_SIZES[task])):
                lists[split] = []
                for i in range(count):
                    rel = f"images/{split}/{i:06d}.jpg"
                    archive.writestr(f"vtab-1k/{task}/{rel}", distinct(bases, number))
                    lists[split].append(f"{rel} {i % classes}")
                    number += 1
            lists["train800val200"] = lists["train800"] + lists["val200"]
            for split, lines in lists.items():
                archive.writestr(f"vtab-1k/{task}/{split}.txt", "\n".join(lines) + "\n")
    return number


def measure(source: Path, work: Path, tasks: list[str], workers: int, images: int) -> dict:
    out = work / f"prepared-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    prepare_vtab(str(source), out, tasks, workers=workers)
    prepare_s = time.perf_counter() - start
    start = time.perf_counter()
    reports = check_folder(out, workers=workers)
    check_s = time.perf_counter() - start
    assert all(r.ok for r in reports), [str(p) for r in reports for p in r.problems][:5]
    shutil.rmtree(out)
    return {"workers": workers, "images": images, "prepare_s": round(prepare_s, 2),
            "prepare_images_per_s": round(images / prepare_s, 1), "check_s": round(check_s, 2),
            "check_images_per_s": round(images / check_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two tasks at 8 px (smoke run; not written to results)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="worker counts to time (default: 1 and the CPUs available, at most 8)")
    parser.add_argument("--tmp", default=None, help="folder for the fixture (default: the system's temporary folder)")
    parser.add_argument("--output", default=str(RESULTS / "prepare.json"))
    args = parser.parse_args()
    tasks = list(QUICK_TASKS) if args.quick else list(VTAB_TASKS)
    size = 8 if args.quick else args.size
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = args.workers or sorted({1, min(8, cpus)})
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        images = write_fixture(work / "vtab-1k.zip", tasks, size)
        print(f"fixture: {len(tasks)} tasks, {images:,} images of {size} px, "
              f"{(work / 'vtab-1k.zip').stat().st_size / 2**20:.0f} MiB zip, {time.perf_counter() - start:.0f} s",
              flush=True)
        rows = []
        for count in workers:
            rows.append(measure(work / "vtab-1k.zip", work, tasks, count, images))
            print(json.dumps(rows[-1]), flush=True)
    report = {"machine": f"{machine(threads=False, libraries=('PIL',))}, {cpus} CPUs", "date": today(),
              "python": platform.python_version(),
              "command": "python benchmarks/prepare_throughput.py" + (" --quick" if args.quick else ""),
              "tasks": len(tasks), "image_px": size, "runs": rows}
    if args.quick:
        print("--quick: not written to the results (a smoke run)", file=sys.stderr)
        return
    print(f"wrote {write_json(Path(args.output), report)}")


if __name__ == "__main__":
    main()
