"""What differs between classification and segmentation runs: model, data, loss, metrics and records.

The training loop (``loop.py``) is shared and never asks which task it runs; a task supplies these pieces.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from ..progress import progress as tqdm_or_lines

from ..backbone import input_config
from ..data.cache import to_device
from ..factory import count_parameters, create_model
from .data import TaskData, build_task_data, recorded_data_spec, split_record


def backbone_for(cfg) -> str:
    """The backbone name to build: ``pretrained: false`` on a shipped backbone means its architecture, random."""
    from ..backbones import is_shipped

    return cfg.backbone.split(".", 1)[0] if cfg.pretrained is False and is_shipped(cfg.backbone) else cfg.backbone


class Task(Protocol):
    """What a task supplies to the training loop, ``ivpt eval`` and the adapter it writes."""

    name: str                    # classification | segmentation: recorded in results and adapters
    primary: str                 # the metric a run reports and the protocol selects by
    train_accuracy: str          # the training log's accuracy column
    caches_probe_features: bool  # whether a linear probe may train on features computed once

    def build(self, cfg) -> tuple[torch.nn.Module, TaskData]: ...
    def per_sample_loss(self, logits, target, cfg) -> torch.Tensor: ...
    def hits(self, logits, target) -> tuple[float, float]: ...
    def parameters(self, model) -> dict[str, int]: ...
    def eval_batch(self, requested: int) -> int: ...
    def diagnostic_batch(self, model, dataset, count: int = 32) -> torch.Tensor | None: ...
    def adapter_record(self, cfg, model, data: TaskData) -> dict[str, Any]: ...
    def evaluate(self, model, loader, num_classes, device, ctx, autocast, desc="eval",
                 progress=True) -> dict[str, Any]: ...


class ClassificationTask:
    name, primary = "classification", "top1"
    train_accuracy = "train_top1"  # the training log's accuracy column
    # the linear probe may train its head on pooled features computed once (ivpt.engine.features)
    caches_probe_features = True

    def build(self, cfg) -> tuple[torch.nn.Module, TaskData]:
        # the data needs the backbone's input size and normalisation, the head needs the data's classes
        model = create_model(backbone_for(cfg), cfg.method, 1, weights=cfg.weights, pretrained=bool(cfg.pretrained),
                             timm_kwargs=cfg.backbone_options, **cfg.method_options)
        data = build_task_data(cfg.data, input_config(model.backbone))
        torch.manual_seed(cfg.seed + 1)
        model.reset_classifier(len(data.classes), data.classes)
        return model, data

    def per_sample_loss(self, logits, target, cfg) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=cfg.label_smoothing, reduction="none")

    def hits(self, logits, target) -> tuple[float, float]:
        return (logits.argmax(1) == target).sum().item(), float(target.numel())

    def parameters(self, model) -> dict[str, int]:
        return count_parameters(model)

    def eval_batch(self, requested: int) -> int:
        return requested

    def diagnostic_batch(self, model, dataset, count: int = 32) -> torch.Tensor | None:
        """A fixed batch for the per-epoch diagnostics of the methods that log some (None: nothing to log)."""
        if not model.method.logs_diagnostics:
            return None
        images = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
        return to_device(images, dataset, torch.device("cpu"))  # normalised, as the model sees it

    def adapter_record(self, cfg, model, data: TaskData) -> dict[str, Any]:
        """What the adapter records beside the model: the data spec with its image reading spelt out, and a
        folder's splits (ivpt eval refuses a folder changed since, see ivpt.engine.data)."""
        record = {"data": recorded_data_spec(cfg.data, input_config(model.backbone))}
        splits = split_record(data)
        if splits:
            record["data_splits"] = splits
        return record

    @torch.no_grad()
    def evaluate(self, model, loader, num_classes, device, ctx, autocast, desc="eval", progress=True) -> dict[str, Any]:
        """Top-1, mean loss, per-class accuracy and the confusion matrix (rows: truth, columns: prediction)."""
        was_training = model.training
        model.eval()
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        loss_sum = 0.0
        for images, labels in tqdm_or_lines(loader, desc=desc, leave=False, disable=not (progress and ctx.main)):
            if images is None:  # every image of this batch was unreadable (ivpt eval without --strict)
                continue
            images, labels = to_device(images, loader.dataset, device), labels.to(device)
            with autocast():
                logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            idx = labels.cpu() * num_classes + logits.argmax(-1).cpu()
            confusion += torch.bincount(idx, minlength=num_classes ** 2).view(num_classes, num_classes)
        reduced = ctx.all_sum(confusion.flatten().tolist() + [loss_sum], device)
        confusion = torch.tensor(reduced[:-1], dtype=torch.float64).view(num_classes, num_classes)
        total = confusion.sum().item()
        model.train(was_training)
        return {
            "top1": confusion.diag().sum().item() / max(total, 1),
            "loss": reduced[-1] / max(total, 1),
            "count": int(total),
            "per_class_accuracy": (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist(),
            "confusion_matrix": confusion.long().tolist(),
        }


class SegmentationTask:
    name, primary = "segmentation", "mIoU"
    train_accuracy = "train_pixel_accuracy"
    caches_probe_features = False
    # None: single scale (mIoU-SS); a tuple of scales: their flipped and unflipped copies averaged (mIoU-MS)
    multiscale: tuple[float, ...] | None = None

    def build(self, cfg):
        from ..segmentation import create_segmentation_model
        from .segdata import build_segmentation_data

        opts = cfg.segmentation
        model = create_segmentation_model(
            backbone_for(cfg), cfg.method, 1, decoder=opts.get("decoder", "pup"), crop_size=int(opts.get("crop_size", 512)),
            decoder_channels=int(opts.get("decoder_channels", 256)), weights=cfg.weights,
            pretrained=bool(cfg.pretrained), timm_kwargs=cfg.backbone_options, **cfg.method_options)
        data = build_segmentation_data(cfg, model.encoder.backbone.pretrained_cfg, model.patch_size)
        torch.manual_seed(cfg.seed + 1)
        model.reset_decoder(len(data.classes), data.classes, data.ignore_index)
        self.ignore_index = data.ignore_index
        return model, data

    def per_sample_loss(self, logits, target, cfg) -> torch.Tensor:
        pixels = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="none")
        valid = (target != self.ignore_index).flatten(1).sum(1).clamp(min=1)
        return pixels.flatten(1).sum(1) / valid  # per image: mean over its labelled pixels

    def hits(self, logits, target) -> tuple[float, float]:
        valid = target != self.ignore_index
        return ((logits.argmax(1) == target) & valid).sum().item(), float(valid.sum().item())

    def parameters(self, model) -> dict[str, int]:
        from ..segmentation import count_segmentation_parameters

        return count_segmentation_parameters(model)

    def eval_batch(self, requested: int) -> int:
        return 1  # label maps keep their own sizes: one image per evaluation batch

    def diagnostic_batch(self, model, dataset, count: int = 32) -> None:
        return None  # images differ in size; ivpt explain covers segmentation adapters

    def adapter_record(self, cfg, model, data: TaskData) -> dict[str, Any]:
        return {"data": recorded_data_spec(cfg.data), "segmentation": cfg.segmentation}

    @torch.no_grad()
    def evaluate(self, model, loader, num_classes, device, ctx, autocast, desc="eval", progress=True) -> dict[str, Any]:
        """mIoU, per-class IoU and pixel accuracy at each label map's own size (single or multi-scale)."""
        from ..segmentation import ConfusionMatrix, multiscale_flip_inference, slide_inference

        was_training = model.training
        model.eval()
        matrix = ConfusionMatrix(num_classes, self.ignore_index)
        for images, masks in tqdm_or_lines(loader, desc=desc, leave=False, disable=not (progress and ctx.main)):
            if images is None:  # unreadable (ivpt eval without --strict)
                continue
            images = images.to(device)
            with autocast():
                if self.multiscale:  # softmax averages: argmax is all that is used below
                    logits = multiscale_flip_inference(model, images, self.multiscale).float()
                else:
                    logits = slide_inference(model, images).float()
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
            matrix.update(logits.argmax(1), masks)
        matrix.matrix = torch.tensor(ctx.all_sum(matrix.matrix.flatten().tolist(), device),
                                     dtype=torch.float64).view(num_classes, num_classes)
        model.train(was_training)
        return matrix.compute()


TASKS: dict[str, type[Task]] = {"classification": ClassificationTask, "segmentation": SegmentationTask}
