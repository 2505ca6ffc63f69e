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

# The same cost per image as vit_mini (12 x 128^2 against 6 x 192^2 per token) with 11 block-to-block
# transitions, as ViT-B/16 has: the candidate testbed for cross-layer methods (benchmarks/testbed_probe.py).
VIT_DEEP_PATCH4_32 = dict(VIT_MINI_PATCH4_32, embed_dim=128, depth=12, num_heads=4)

ARCHITECTURES = {"vit_mini_patch4_32": VIT_MINI_PATCH4_32, "vit_deep_patch4_32": VIT_DEEP_PATCH4_32}
