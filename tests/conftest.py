import copy
import os
import tempfile

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

# the decoded-tensor cache of the runs the tests start: a fresh folder, never the user's ~/.cache/ivpt
os.environ.setdefault("IVPT_CACHE", tempfile.mkdtemp(prefix="ivpt-test-cache-"))


def make_vit(seed: int = 0, **overrides) -> VisionTransformer:
    """A tiny random-weight timm ViT; perturbed so that no weight sits at a special value."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=7, qkv_bias=True)
    cfg.update(overrides)
    torch.manual_seed(seed)
    vit = VisionTransformer(**cfg)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # timm inits cls/pos/bias near zero: make them matter
    return vit.eval()


@pytest.fixture
def vit():
    return make_vit()


@pytest.fixture
def images():
    torch.manual_seed(123)
    return torch.randn(3, 3, 32, 32)


def clone(module):
    return copy.deepcopy(module)
