"""The shipped default backbone: present, intact, loadable offline by every route."""
import json

import pytest
import timm
import torch

import ivpt
from ivpt.backbones import shipped_config, shipped_files
from ivpt.data.paths import sha256_file


def test_shipped_files_are_intact_and_recorded():
    weights, config_path = shipped_files(ivpt.DEFAULT_BACKBONE)
    assert weights.is_file() and weights.stat().st_size <= 25 * 2 ** 20
    config = shipped_config(ivpt.DEFAULT_BACKBONE)
    assert sha256_file(weights) == config["weights_sha256"]
    for key in ("architecture", "mean", "std", "input_size", "class_names", "recipe", "cifar10_test_top1", "data"):
        assert key in config, key
    assert config["architecture"]["depth"] >= 6 and config["architecture"]["patch_size"] == 4
    assert config["input_size"] == [3, 32, 32] and len(config["class_names"]) == 10
    assert len(config["data"]["sha256"]) == 64 and config["recipe"]["seed"] == 0
    assert json.loads(config_path.read_text()) == config


def test_default_backbone_loads_offline_without_weight_arguments(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    vit = timm.create_model(ivpt.DEFAULT_BACKBONE, pretrained=True)
    model = ivpt.create_model(ivpt.DEFAULT_BACKBONE, "ivpt", 4)
    shipped = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    mine = {k: v for k, v in model.backbone.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(shipped[k], mine[k]) for k in shipped)
    assert model.head.weight.shape == (4, 192)  # a fresh head for the new task
    cfg = model.backbone.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == tuple(shipped_config(ivpt.DEFAULT_BACKBONE)["mean"])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    # the bare architecture name stays random-init, as timm names do
    random_init = timm.create_model("vit_mini_patch4_32")
    assert not torch.equal(random_init.patch_embed.proj.weight, vit.patch_embed.proj.weight)


def test_shipped_classifier_is_the_trained_one():
    """Its own CIFAR-10 head on 200 test images, every 50th of the test split in class then file order (as
    ivpt.data.cifar10 orders it): far above chance (the full figure is a benchmark). Only those 200 of the
    60,000 JPEGs are decoded."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from ivpt.data.paths import data_root

    tar = data_root() / "cifar10-jpg.tar.gz"
    if not tar.is_file():
        pytest.skip("needs cifar10-jpg.tar.gz in the shared data folder ($IVPT_DATA or ../shared/data)")
    with tarfile.open(tar, "r:*") as archive:  # cifar10/test/<class>/<file>.jpg
        test = sorted((tuple(m.name.split("/")[2:]), archive.extractfile(m).read()) for m in archive
                      if m.isfile() and m.name.startswith("cifar10/test/"))
    classes = sorted({name[0] for name, _ in test})
    picked = test[::50]
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for _, data in picked])
    labels = torch.tensor([classes.index(name[0]) for name, _ in picked])
    vit = timm.create_model(ivpt.DEFAULT_BACKBONE, pretrained=True).eval()
    cfg = vit.pretrained_cfg
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        accuracy = (vit(x).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.5  # random weights give ~0.1
