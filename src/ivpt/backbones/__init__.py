"""Backbones this project pretrains and ships, registered with timm under their own names.

``timm.create_model("vit_mini_patch4_32.ivpt_cifar10", pretrained=True)`` loads the weights that
ship inside this package, offline; so does ``ivpt.create_model(ivpt.DEFAULT_BACKBONE, ...)``.
"""
from __future__ import annotations

import json
from pathlib import Path

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .architectures import ARCHITECTURES

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_BACKBONE = "vit_mini_patch4_32.ivpt_cifar10"


def shipped_files(name: str) -> tuple[Path, Path]:
    """(weights, config) paths of a shipped backbone ``arch.tag``."""
    return WEIGHTS_DIR / f"{name}.safetensors", WEIGHTS_DIR / f"{name}.json"


def shipped_config(name: str) -> dict:
    """The recorded facts of a shipped backbone: architecture, normalisation, recipe, accuracy."""
    _, config = shipped_files(name)
    if not config.is_file():
        raise FileNotFoundError(f"no shipped config for backbone {name!r} at {config}")
    return json.loads(config.read_text())


def _pretrained_cfg(name: str) -> dict:
    weights, config = shipped_files(name)
    meta = json.loads(config.read_text()) if config.is_file() else {}
    return {
        "file": str(weights),
        "num_classes": meta.get("num_classes", 10),
        "input_size": tuple(meta.get("input_size", (3, 32, 32))),
        "mean": tuple(meta.get("mean", (0.4914, 0.4822, 0.4465))),
        "std": tuple(meta.get("std", (0.2470, 0.2435, 0.2616))),
        "interpolation": meta.get("interpolation", "bicubic"),
        "crop_pct": 1.0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "notes": ("supervised from scratch on CIFAR-10 train by ivpt's backbones/pretrain.py",),
    }


SHIPPED = (DEFAULT_BACKBONE,)
# Architectures whose pretrained weights do not ship (yet): the bare name builds the network with
# random weights and CIFAR-10 normalisation, so that weights pretrained by ivpt load with ``weights=``.
UNSHIPPED_ARCHS = ("vit_deep_patch4_32",)
default_cfgs = generate_default_cfgs({**{name: _pretrained_cfg(name) for name in SHIPPED},
                                      **{name: {k: v for k, v in _pretrained_cfg(name).items() if k != "file"}
                                         for name in UNSHIPPED_ARCHS}})


def is_shipped(name: str) -> bool:
    """A full ``arch.tag`` name whose weights ship with ivpt (a bare arch name stays random-init)."""
    return name in SHIPPED


def _build(arch: str, pretrained: bool, **kwargs) -> VisionTransformer:
    return build_model_with_cfg(VisionTransformer, arch, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **{**ARCHITECTURES[arch], **kwargs})


@register_model
def vit_mini_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT 'mini' (d=192, 6 blocks, 3 heads), patch 4 at 32x32: ivpt's CPU-sized default."""
    return _build("vit_mini_patch4_32", pretrained, **kwargs)


@register_model
def vit_deep_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT 'deep' (d=128, 12 blocks, 4 heads), patch 4 at 32x32: vit_mini's cost with ViT-B's depth."""
    return _build("vit_deep_patch4_32", pretrained, **kwargs)
