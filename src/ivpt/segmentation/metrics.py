"""Segmentation metrics from a confusion matrix: mIoU, per-class IoU, pixel accuracy."""
from __future__ import annotations

import torch


class ConfusionMatrix:
    """Accumulates (truth, prediction) pixel counts; pixels labelled ``ignore_index`` are skipped."""

    def __init__(self, num_classes: int, ignore_index: int | None = None):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.float64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        prediction, target = prediction.reshape(-1).cpu().long(), target.reshape(-1).cpu().long()
        keep = (target >= 0) & (target < self.num_classes)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        index = target[keep] * self.num_classes + prediction[keep]
        self.matrix += torch.bincount(index, minlength=self.num_classes ** 2).view(self.num_classes, -1).double()

    def compute(self) -> dict:
        m = self.matrix
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        # a class counts when it occurs in the truth or in the predictions (union > 0), as mmseg's nanmean
        present = union > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        return {
            "mIoU": iou[present].mean().item() if present.any() else float("nan"),
            "per_class_iou": iou.tolist(),
            "pixel_accuracy": (tp.sum() / m.sum().clamp(min=1)).item(),
            "pixels": int(m.sum().item()),
        }
