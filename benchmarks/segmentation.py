"""CamVid segmentation with the default backbone: linear (frozen encoder + decoder), VPT-deep, iVPT.

    python benchmarks/segmentation.py            # the protocol of configs/segmentation/camvid.yaml
    python benchmarks/segmentation.py --quick    # 1 epoch, 1 seed: checks the pipeline

Same decoder for every method; lr chosen on val mIoU, then 3 seeds trained on train+val and
evaluated on test, single scale (mIoU-SS) and multi-scale + flip (mIoU-MS at BENCH_SCALES: three
scales instead of mmseg's six, to fit 2 CPU cores; `ivpt eval --multiscale` uses all six). Writes benchmarks/results/segmentation.{json,csv} and example
predictions (image | truth | prediction per method) to benchmarks/results/segmentation_examples.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ivpt import load_adapter
from ivpt.palette import palette
from ivpt.data.segmentation import IGNORE_INDEX, SegEvalTransform, camvid_dataset
from ivpt.engine.checkpoint import atomic_write
from ivpt.engine.config import load_config
from ivpt.engine.distributed import Dist
from ivpt.engine.loop import evaluate, loader_for
from ivpt.engine.study import tune
from ivpt.engine.segdata import build_segmentation_data
from ivpt.engine.tasks import SegmentationTask
from ivpt.segmentation import slide_inference
from ivpt.tables import write_csv
from common import RESULTS, ROOT, STATE, header, write_json
BENCH_SCALES = (0.75, 1.0, 1.25)
METHODS = {"linear": ("linear", {}), "vpt-deep": ("vpt-deep", None), "ivpt": ("ivpt", None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "segmentation" / "camvid.yaml"))
    parser.add_argument("--runs", default=str(STATE / "segmentation"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    base = load_config(args.recipe)
    runs = Path(args.runs) / ("quick" if args.quick else "full")
    report, rows = {**header(), "recipe": base.to_dict(), "methods": {}}, []
    for name, (method, options) in METHODS.items():
        cfg = dataclasses.replace(base, method=method,
                                  method_options=base.method_options if options is None else options)
        if args.quick:
            cfg = dataclasses.replace(cfg, epochs=1, warmup_epochs=0,
                                      protocol={"lrs": cfg.protocol["lrs"][:1], "wds": [0.0], "seeds": [42]})
        summary = tune(cfg.validate(), runs / name, pruner="none")
        summary["test_ms"] = multiscale_test(cfg, runs / name, summary["seeds"])
        summary["test_ms_mean"] = float(np.mean(summary["test_ms"]))
        summary["test_ms_std"] = float(np.std(summary["test_ms"], ddof=1)) if len(summary["test_ms"]) > 1 else 0.0
        report["methods"][name] = summary
        rows.append({"method": name, "test_mIoU_mean": summary["test_mean"], "test_mIoU_std": summary["test_std"],
                     "test_mIoU_ms_mean": summary["test_ms_mean"], "test_mIoU_ms_std": summary["test_ms_std"],
                     "lr": summary["chosen"]["lr"], "decoder_params": summary["parameters"]["decoder"],
                     "prompt_side_params": summary["parameters"]["prompt_side"]})
        print(f"{name}: test mIoU-SS {100 * summary['test_mean']:.2f} ± {100 * summary['test_std']:.2f}, "
              f"mIoU-MS {100 * summary['test_ms_mean']:.2f} ± {100 * summary['test_ms_std']:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    write_json(f"segmentation{suffix}.json", report)
    write_csv(RESULTS / f"segmentation{suffix}.csv", rows)
    examples(runs, RESULTS / f"segmentation_examples{suffix}.png", tuple(base.segmentation["base_size"]))


def multiscale_test(cfg, runs: Path, seeds: list[int]) -> list[float]:
    """mIoU-MS on test of each final seed's adapter, in the order of ``seeds`` (cached as test_ms.json)."""
    scores = []
    for seed in seeds:
        adapter = runs / "final" / f"seed{seed}" / "adapter"
        cached = adapter.parent / "test_ms.json"
        if not cached.is_file() or tuple(json.loads(cached.read_text())["scales"]) != BENCH_SCALES:
            model = load_adapter(adapter).eval()
            data = build_segmentation_data(cfg, model.encoder.backbone.pretrained_cfg, model.patch_size)
            task = SegmentationTask()
            task.ignore_index, task.multiscale = data.ignore_index, BENCH_SCALES
            loader = loader_for(data.splits["test"], 1, Dist(), 0, False, 0)
            metrics = evaluate(model, loader, len(data.classes), torch.device("cpu"), precision=cfg.precision,
                               desc="test (multi-scale + flip)", task=task)
            atomic_write(cached, lambda tmp, m=metrics: tmp.write_text(json.dumps({**m, "scales": BENCH_SCALES})))
        scores.append(json.loads(cached.read_text())["mIoU"])
    return scores


def examples(runs: Path, path: Path, base_size: tuple[int, int], count: int = 3) -> None:
    """Test images, their ground truth and each method's prediction (first seed), side by side."""
    from PIL import Image

    test = camvid_dataset("test")
    models = {}
    for name in METHODS:
        adapters = sorted((runs / name / "final").glob("seed*/adapter"))
        if adapters:
            models[name] = load_adapter(adapters[0]).eval()
    if not models:
        return
    colours = np.array(palette(11) + [(0, 0, 0)] * (256 - 11), dtype=np.uint8)
    tile_rows = []
    for index in np.linspace(0, len(test) - 1, count).astype(int):
        image, mask = test.load(int(index))
        tiles = [np.asarray(image), colours[np.where(mask == IGNORE_INDEX, 255, mask)]]
        for model in models.values():
            cfg = model.encoder.backbone.pretrained_cfg
            x, _ = SegEvalTransform(base_size, cfg["mean"], cfg["std"], model.patch_size)(image, mask)
            with torch.no_grad():
                logits = slide_inference(model, x[None])
            pred = F.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=False).argmax(1)[0].numpy()
            tiles.append(colours[pred])
        tile_rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(tile_rows, axis=0)
    # a header naming each column, and a legend strip of the class colours
    from PIL import ImageDraw

    names = ["image", "truth", *models]
    width = grid.shape[1] // len(names)
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + 40), "white")
    canvas.paste(Image.fromarray(grid), (0, 20))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(names):
        draw.text((i * width + 6, 4), name, fill="black")
    step = grid.shape[1] // len(test.classes)
    for i, name in enumerate(test.classes):
        draw.rectangle([i * step + 2, grid.shape[0] + 24, i * step + 12, grid.shape[0] + 34], fill=tuple(colours[i]))
        draw.text((i * step + 15, grid.shape[0] + 23), name, fill="black")
    canvas.save(path)
    print(f"examples: {path} (columns: image, truth, {', '.join(models)})")


if __name__ == "__main__":
    main()
