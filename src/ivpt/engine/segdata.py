"""Segmentation data specs: ``{"kind": "camvid"}`` or ``{"kind": "ade20k", "root": ...}``."""
from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import ConcatDataset, Dataset

from ..data.datasets import DataError
from ..data.segmentation import (IGNORE_INDEX, SegEvalTransform, SegTrainTransform, ade20k, camvid_dataset)

SEG_KINDS = ("camvid", "ade20k")


@dataclass
class SegTaskData:
    classes: list[str]
    splits: dict[str, Dataset]
    ignore_index: int = IGNORE_INDEX
    protocol: str = "segmentation"


def base_size(opts: dict, kind: str | None, crop: int) -> tuple[int, int]:
    """The (long, short) side images are rescaled to before cropping or sliding: one rule for training,
    evaluation and ``ivpt predict`` (ADE20K's (2048, 512) as mmseg; else (4 x crop, crop))."""
    return tuple(opts.get("base_size", (2048, 512) if kind == "ade20k" else (4 * crop, crop)))


def build_segmentation_data(cfg, pretrained_cfg: dict, patch: int) -> SegTaskData:
    spec, opts = cfg.data, cfg.segmentation
    kind = spec.get("kind")
    if kind not in SEG_KINDS:
        raise DataError(f"segmentation data kind {kind!r} is unknown; expected one of {', '.join(SEG_KINDS)}")
    mean, std = pretrained_cfg.get("mean"), pretrained_cfg.get("std")
    crop = int(opts.get("crop_size", 512))
    base = base_size(opts, kind, crop)
    train_tf = SegTrainTransform(crop, base, mean, std, tuple(opts.get("ratio_range", (0.5, 2.0))))
    eval_tf = SegEvalTransform(base, mean, std, multiple=patch)
    if kind == "camvid":
        splits = {s: camvid_dataset(s, train_tf if s == "train" else eval_tf, spec.get("path"))
                  for s in ("train", "val", "test")}
        splits["trainval"] = ConcatDataset([splits["train"], camvid_dataset("val", train_tf, spec.get("path"))])
        return SegTaskData(splits["train"].classes, splits)
    root = spec.get("root")
    if not root:
        raise DataError("data spec of kind 'ade20k' needs the field 'root'")
    splits = {"train": ade20k(root, "train", train_tf), "val": ade20k(root, "val", eval_tf)}
    return SegTaskData(splits["train"].classes, splits)
