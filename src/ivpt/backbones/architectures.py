"""Architectures of the backbones this project pretrains itself, as plain timm ViT settings."""
from __future__ import annotations

# Small enough to pretrain on 2 CPU cores, deep enough (6 blocks) for cross-layer behaviour.
VIT_MINI_PATCH4_32 = dict(
    img_size=32,
    patch_size=4,
    embed_dim=192,
    depth=6,
    num_heads=3,
    mlp_ratio=4.0,
    class_token=True,
    global_pool="token",
)

ARCHITECTURES = {"vit_mini_patch4_32": VIT_MINI_PATCH4_32}
