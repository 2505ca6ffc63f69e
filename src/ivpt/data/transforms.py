"""Input pipelines per protocol (see docs/method.md, evaluation protocol)."""
from __future__ import annotations

import math

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}


def interpolation_mode(name: str):
    if name not in _INTERPOLATION:
        raise ValueError(f"interpolation {name!r}: expected one of {', '.join(_INTERPOLATION)}")
    return _INTERPOLATION[name]


def vtab_transform(size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation: str = "bilinear"):
    """VTAB-1k: resize to size x size, normalise, no augmentation (train and test alike)."""
    return T.Compose([T.Resize((size, size), interpolation=interpolation_mode(interpolation)), T.ToTensor(),
                      T.Normalize(mean, std)])


def fgvc_transform(train: bool, size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   interpolation: str = "bilinear"):
    """FGVC: train Resize(256)+RandomCrop(224)+HFlip, test Resize(256)+CenterCrop(224), scaled to ``size``."""
    resize = round(size * 256 / 224)
    steps = [T.Resize(resize, interpolation=interpolation_mode(interpolation))]
    steps += [T.RandomCrop(size), T.RandomHorizontalFlip()] if train else [T.CenterCrop(size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def backbone_transform(pretrained_cfg: dict, protocol: str = "vtab", train: bool = False):
    """The protocol's pipeline at the backbone's own input size, mean and std (from its timm config)."""
    size = pretrained_cfg["input_size"][-1]
    mean, std = pretrained_cfg.get("mean", IMAGENET_MEAN), pretrained_cfg.get("std", IMAGENET_STD)
    interpolation = pretrained_cfg.get("interpolation", "bilinear")
    if protocol == "vtab":
        return vtab_transform(size, mean, std, interpolation)
    if protocol == "fgvc":
        return fgvc_transform(train, size, mean, std, interpolation)
    raise ValueError(f"protocol {protocol!r}: expected 'vtab' or 'fgvc'")


def timm_resize(pretrained_cfg: dict) -> int:
    """The shorter side timm's evaluation pipeline resizes to before its centre crop: floor(size / crop_pct)."""
    return math.floor(pretrained_cfg["input_size"][-1] / float(pretrained_cfg.get("crop_pct") or 1.0))


def folder_transform(pretrained_cfg: dict, preprocess: str = "crop", augment: bool = False, resize: int | None = None):
    """Folder data at the backbone's input: timm's evaluation pipeline (resize the shorter side to
    ``resize``, by default floor(size / crop_pct) as timm computes it, centre-crop, normalise), or
    ``squash`` to a square; ``augment``: random resized crops (60-100% of the image) and horizontal
    flips for training."""
    size = pretrained_cfg["input_size"][-1]
    mean, std = pretrained_cfg.get("mean", IMAGENET_MEAN), pretrained_cfg.get("std", IMAGENET_STD)
    interpolation = interpolation_mode(pretrained_cfg.get("interpolation", "bilinear"))
    if augment:
        steps = [T.RandomResizedCrop(size, scale=(0.6, 1.0), interpolation=interpolation), T.RandomHorizontalFlip()]
    elif preprocess == "squash":
        steps = [T.Resize((size, size), interpolation=interpolation)]
    else:
        steps = [T.Resize(resize or timm_resize(pretrained_cfg), interpolation=interpolation), T.CenterCrop(size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])
