"""The linear probe on cached features: the frozen backbone runs once per split, the head trains on its output.

A linear probe's backbone never changes and, without train-time augmentation, neither do its
inputs, so every epoch of every grid point recomputes the same pooled features. For ``method:
linear`` on deterministic splits (the offline suite, cached VTAB-1k and folder splits), the
features (timm's ``forward_head(..., pre_logits=True)``: pooled, fc_norm) are computed once and kept
under ``$IVPT_CACHE/features/<key>.safetensors``, keyed by a digest of every backbone tensor, the
split's pixels (or its content-keyed tensor cache), the input transform and the precision, so a
stale cache is never used. The head then trains on them with the same batches, schedule and
seeds as the uncached path (equal within float tolerance, tested).
"""
from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from ..backbone import frozen_weights_digest
from ..data.cache import CachedImages, cache_root, to_device
from .checkpoint import atomic_write
from .data import TensorImages


class FeatureSet(Dataset):
    """Pooled backbone features (N, D) and labels."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return self.features[index], self.labels[index]


class HeadOnly(nn.Module):
    """The model's classification head applied to cached features; trains and saves the model's own head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.head(features)

    def train(self, mode: bool = True):
        self.model.train(mode)  # the frozen backbone stays in eval mode there
        return super().train(mode)


class FeatureCache:
    """The linear probe's features: each deterministic split through the frozen backbone once (kept under
    ``$IVPT_CACHE/features``), and the model's own head to train on them (``head``)."""

    def __init__(self, model: nn.Module, device, precision: str, autocast):
        self.model, self.device, self.precision, self.autocast = model, device, precision, autocast
        self.digest = backbone_digest(model)  # every frozen tensor: a changed backbone never reads stale features
        self.head = HeadOnly(model)

    def of(self, dataset) -> FeatureSet:
        """The split's pooled features and labels (read from the cache, or computed and cached)."""
        return features_of(self.model, dataset, self.device, self.autocast, self.precision, self.digest)


def _identity(dataset) -> str | None:
    """What a split's pixels are, as a digest (None: not a deterministic split)."""
    if isinstance(dataset, TensorImages):
        return hashlib.sha256(dataset.images.numpy().tobytes() + dataset.labels.numpy().tobytes()).hexdigest()
    if isinstance(dataset, CachedImages) and dataset.path is not None:
        norm = dataset.normalize_batch
        return f"{dataset.path.stem}|{norm.mean}|{norm.std}"
    if isinstance(dataset, ConcatDataset):
        parts = [_identity(p) for p in dataset.datasets]
        return None if None in parts else "+".join(parts)
    return None


def cacheable(cfg, ctx, *datasets) -> bool:
    return (cfg.method == "linear" and cfg.cache != "off" and not ctx.active
            and all(d is None or _identity(d) is not None for d in datasets))


def backbone_digest(model) -> str:
    vit = model.backbone
    return frozen_weights_digest(vit, {id(p) for p in vit.get_classifier().parameters()})


@torch.no_grad()
def features_of(model, dataset, device, autocast, precision: str, digest: str, batch: int = 256) -> FeatureSet:
    key = hashlib.sha256(json.dumps([digest, _identity(dataset), precision, model.backbone_name]).encode()).hexdigest()
    path = cache_root() / "features" / f"{key}.safetensors"
    if path.is_file():
        try:
            stored = load_file(str(path))
            if len(stored["labels"]) == len(dataset):
                return FeatureSet(stored["features"], stored["labels"])
        except (OSError, KeyError, ValueError, RuntimeError):
            pass  # damaged: computed again below
    was_training = model.training
    model.eval()
    chunks, labels = [], []
    for start in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
        images = to_device(torch.stack([torch.as_tensor(x) for x, _ in items]), dataset, device)
        with autocast():
            pooled = model.forward_head(model.forward_features(images), pre_logits=True)
        chunks.append(pooled.float().cpu())
        labels.append(torch.as_tensor([int(y) for _, y in items], dtype=torch.long))
    model.train(was_training)
    features, labels = torch.cat(chunks), torch.cat(labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({"features": features, "labels": labels}, str(tmp)))
    return FeatureSet(features, labels)
