"""Does the input pipeline keep up? Images per second delivered, cold and from the tensor cache.

    python benchmarks/input_pipeline.py            # 800 DTD and 800 CIFAR-10 JPEGs at 224 px
    python benchmarks/input_pipeline.py --quick    # 64 images, a smoke run

A VTAB-1k-like split of real JPEGs (the shared dtd10 images, short side 256, and CIFAR-10's 32 px
images, both resized to 224 x 224 by VTAB's transform) is read through a DataLoader at 0, 1 and 2
workers: cold (decode + resize + normalise per access, as before the cache) and from the decoded
tensor cache (memory-mapped uint8, normalised per batch). Beside it, the rate a VPT-deep training
step consumes images on the default backbone (its 32 px input, batch 64) and on ViT-B/16 (224 px,
batch 8), on the same cores. Every configuration runs in this one process; cold and cached rounds
alternate. Results: benchmarks/results/input_pipeline.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from common import header, write_json
from torch.utils.data import DataLoader

import ivpt
from ivpt.data.cache import cached, to_device
from ivpt.data.datasets import ImageListDataset
from ivpt.data.paths import data_file
from ivpt.data.transforms import vtab_transform

BATCH = 64


def extract(archive: str, inner: str, count: int, out: Path) -> tuple[Path, list[tuple[str, int]]]:
    """The first ``count`` JPEGs (round-robin over classes) of a shared archive, as files on disk."""
    with tarfile.open(data_file(archive)) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg") and m.name.startswith(inner)]
        by_class: dict[str, list] = {}
        for m in members:
            by_class.setdefault(Path(m.name).parent.name, []).append(m)
        chosen, rows = [], list(by_class.values())
        while len(chosen) < count and any(rows):
            for row in rows:
                if row and len(chosen) < count:
                    chosen.append(row.pop(0))
        tar.extractall(out, members=chosen, filter="data")
    classes = sorted(by_class)
    items = [(str(Path(m.name).relative_to(inner)), classes.index(Path(m.name).parent.name)) for m in chosen]
    _EXTRACTED[str(out)] = items
    return out / inner, items


_EXTRACTED: dict[str, list] = {}


def extract_cached(folder: Path, inner: str):
    return folder / inner, _EXTRACTED[str(folder)]


def rate(dataset, workers: int, normalise_here: bool = True) -> float:
    """Images per second through a DataLoader. normalise_here: a cached split's /255 and Normalize on this CPU
    too (CPU training); without, the uint8 batches as a GPU run receives them (it normalises on the device)."""
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers, persistent_workers=False)
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        if normalise_here:
            images = to_device(images, dataset, torch.device("cpu"))
        seen += len(images)
    return seen / (time.perf_counter() - start)


def consumption(backbone: str, size: int, batch: int, rounds: int) -> float:
    """Images per second a VPT-deep training step takes in on this machine."""
    torch.manual_seed(0)
    model = ivpt.create_model(backbone, "vpt-deep", 10, prompt_length=10, timm_kwargs={"img_size": size}).train()
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(list(model.tuned_parameters().values()), lr=0.01, momentum=0.9)

    def step():
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    count, rounds = (64, 1) if args.quick else (800, args.rounds)
    report = {**header(), "images": count, "batch": BATCH, "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = (("dtd @224", "dtd10-256.tar.gz", "dtd10", 224), ("cifar10 @224", "cifar10-jpg.tar.gz", "cifar10/train", 224),
                ("cifar10 @32", "cifar10-jpg.tar.gz", "cifar10/train", 32))  # @32: the default backbone's input
        for name, archive, inner, size in sets:
            folder = tmp / inner.replace("/", "_")
            root, items = extract(archive, inner, count, folder) if not folder.exists() else extract_cached(folder, inner)
            plain = ImageListDataset(root, items, [str(i) for i in range(10)], vtab_transform(size))
            start = time.perf_counter()
            served = cached(plain, tmp / "cache")
            build_s = time.perf_counter() - start
            entry = {"build_seconds": build_s, "cold": {}, "cached": {}, "cached_uint8": {}}
            for workers in (0, 1, 2):
                cold, warm, raw = [], [], []
                for _ in range(rounds):  # alternating, so a slow phase of the machine hits all alike
                    cold.append(rate(plain, workers))
                    warm.append(rate(served, workers))
                    raw.append(rate(served, workers, normalise_here=False))
                for key, values in (("cold", cold), ("cached", warm), ("cached_uint8", raw)):
                    entry[key][workers] = statistics.median(values)
                print(f"{name} workers {workers}: cold {entry['cold'][workers]:.0f} img/s, cached {entry['cached'][workers]:.0f}"
                      f" img/s (uint8 for the device: {entry['cached_uint8'][workers]:.0f})", flush=True)
            entry["cached_vs_cold_best"] = max(entry["cached"].values()) / max(entry["cold"].values())
            entry["cached_uint8_vs_cold_best"] = max(entry["cached_uint8"].values()) / max(entry["cold"].values())
            report["sets"][name] = entry
    sizes = [("vit_mini_patch4_32.ivpt_cifar10", 32, 64), ("vit_base_patch16_224", 224, 8)]
    report["consumption"] = {f"{b} @{s}": consumption(b, s, n, 2 if args.quick else 3) for b, s, n in sizes}
    print("training step consumes (img/s):", json.dumps({k: round(v, 1) for k, v in report["consumption"].items()}))
    write_json("input_pipeline_quick.json" if args.quick else "input_pipeline.json", report)


if __name__ == "__main__":
    main()
