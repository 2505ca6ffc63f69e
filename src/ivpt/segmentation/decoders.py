"""Decoders on the patch-token grid: a linear per-patch head, SETR-naive and SETR-PUP.

Input: (B, d, h, w) patch features (prompts already dropped); output: (B, classes, H, W) logits at
the image size. The decoder always trains and is counted apart from the prompt-side parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DECODERS = ("linear", "naive", "pup")


class LinearDecoder(nn.Module):
    """One linear classifier per patch token, upsampled bilinearly (the VPT family's linear head)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.classifier(self.norm(features)), size=size, mode="bilinear", align_corners=False)


class SETRNaive(nn.Module):
    """SETR-naive: 1x1 conv, BN, ReLU, 1x1 conv to classes, bilinear upsampling."""

    def __init__(self, dim: int, num_classes: int, channels: int = 256):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, channels, 1, bias=False), nn.BatchNorm2d(channels),
                                   nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features, size):
        return F.interpolate(self.classifier(self.block(features)), size=size, mode="bilinear", align_corners=False)


class SETRPUP(nn.Module):
    """SETR-PUP: progressive upsampling, conv3x3-BN-ReLU then 2x bilinear, ``stages`` times."""

    def __init__(self, dim: int, num_classes: int, channels: int = 256, stages: int = 4):
        super().__init__()
        layers = []
        for i in range(stages):
            layers += [nn.Conv2d(dim if i == 0 else channels, channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features, size):
        logits = self.classifier(self.body(features))
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def make_decoder(kind: str, dim: int, num_classes: int, channels: int = 256, stages: int = 4) -> nn.Module:
    """``stages``: SETR-PUP's 2x upsampling stages (log2 of the patch size brings the grid to full size)."""
    if kind == "linear":
        return LinearDecoder(dim, num_classes)
    if kind == "naive":
        return SETRNaive(dim, num_classes, channels)
    if kind == "pup":
        return SETRPUP(dim, num_classes, channels, stages=stages)
    raise ValueError(f"option 'decoder': got {kind!r}, expected one of {', '.join(map(repr, DECODERS))}")
