"""Evaluate a shipped backbone on the CIFAR-10 test split (10,000 images) and record the figure.

    python benchmarks/evaluate_backbone.py [--name vit_mini_patch4_32.ivpt_cifar10]

Loads the weights exactly as users get them (timm.create_model(name, pretrained=True), offline),
compares with the accuracy recorded in the shipped config, and writes
benchmarks/results/backbone_eval.json.
"""
from __future__ import annotations

import argparse
import time

import timm
import torch
from common import header, write_json

import ivpt
from ivpt.backbones import shipped_config
from ivpt.data.cifar10 import load_cifar10
from ivpt.data.paths import data_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=ivpt.DEFAULT_BACKBONE)
    parser.add_argument("--data", default=None, help="cifar10-jpg.tar.gz (default: $IVPT_DATA or ../shared/data)")
    args = parser.parse_args()
    model = timm.create_model(args.name, pretrained=True).eval()
    cfg = model.pretrained_cfg
    test = load_cifar10(args.data or data_file("cifar10-jpg.tar.gz"))["test"]
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    images = torch.from_numpy(test.images).permute(0, 3, 1, 2)
    labels = torch.from_numpy(test.labels)
    started, correct = time.time(), torch.zeros(10)
    totals = torch.bincount(labels, minlength=10).float()
    with torch.no_grad():
        for i in range(0, len(images), 500):
            x = (images[i:i + 500].float() / 255 - mean) / std
            hit = model(x).argmax(-1) == labels[i:i + 500]
            correct += torch.bincount(labels[i:i + 500][hit], minlength=10).float()
    top1 = (correct.sum() / totals.sum()).item()
    recorded = shipped_config(args.name)["cifar10_test_top1"]
    result = {
        "backbone": args.name,
        "cifar10_test_top1": top1,
        "per_class": dict(zip(test.classes, (correct / totals).tolist())),
        "recorded_in_config": recorded,
        "matches_record": abs(top1 - recorded) < 1e-4,
        "images": int(totals.sum()),
        "seconds": round(time.time() - started, 1),
        **header(),
    }
    write_json("backbone_eval.json", result)
    print(f"{args.name}: CIFAR-10 test top-1 {100 * top1:.2f}% (recorded {100 * recorded:.2f}%)")


if __name__ == "__main__":
    main()
