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


TINY_MINI = {"embed_dim": 32, "depth": 2, "num_heads": 2}  # vit_mini_patch4_32 made small for fast runs


def photo_folder(root, classes=("cat", "dog", "owl"), per_class=10, size=(40, 40)):
    """A flat folder of random photos, one subfolder per class (``root/<class>/<i>.jpg``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in classes:
        for i in range(per_class):
            path = root / name / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return root


@pytest.fixture
def tiny_weights(tmp_path):
    """A weights file of a small random vit_mini_patch4_32 (TINY_MINI), and the --set overrides that use it."""
    import timm
    from safetensors.torch import save_file

    import ivpt.backbones  # noqa: F401  (registers vit_mini_patch4_32 with timm)

    torch.manual_seed(0)
    path = tmp_path / "backbone.safetensors"
    save_file(timm.create_model("vit_mini_patch4_32", **TINY_MINI).state_dict(), str(path))
    return path, ["backbone=vit_mini_patch4_32", "backbone_options={embed_dim: 32, depth: 2, num_heads: 2}",
                  f"weights={path}"]


def randomize(model, scale=0.3, seed=1):
    """Move every tuned tensor away from its start (trained-looking, not the zero or identity initialisation
    that hides mistakes), so that each method's change is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.tuned_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model
