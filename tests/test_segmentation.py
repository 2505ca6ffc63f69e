"""Segmentation: prompted encoder + decoders, any input size, adapters, metrics."""
import pytest
import torch

import ivpt
from ivpt.segmentation import (ConfusionMatrix, count_segmentation_parameters, create_segmentation_model,
                               multiscale_flip_inference, slide_inference)
from conftest import make_vit
from ivpt.methods import prompt_options


def seg_model(method="ivpt", decoder="pup", **options):
    vit = make_vit(dynamic_img_size=True)
    return create_segmentation_model(vit, method, 5, decoder=decoder, crop_size=32, decoder_channels=16,
                                     **prompt_options(method, 2), **options)


@pytest.mark.parametrize("decoder", ["linear", "naive", "pup"])
@pytest.mark.parametrize("method", ["linear", "vpt-deep", "ivpt", "vfpt", "e2vpt", "lora", "adaptformer"])
def test_logits_at_image_size_for_any_size(decoder, method):
    model = seg_model(method, decoder).eval()
    for size in ((32, 32), (48, 64)):
        out = model(torch.randn(2, 3, *size))
        assert out.shape == (2, 5, *size)
    if method == "ivpt":  # AR acts unchanged: K follows the number of patches (6 x 8 = 48 -> 12)
        with torch.no_grad():
            assert model.forward_explained(torch.randn(2, 3, 48, 64)).trace.selected[0].shape == (2, 12)


@pytest.mark.parametrize("patch, stages", [(4, 2), (16, 4)])
def test_pup_upsamples_back_to_full_resolution_and_no_further(patch, stages):
    model = create_segmentation_model(make_vit(patch_size=patch, img_size=4 * patch), "linear", 5, decoder="pup",
                                      crop_size=4 * patch, decoder_channels=8)
    assert model.decoder_stages == stages and model.adapter_config()["decoder_stages"] == stages
    assert sum(isinstance(m, torch.nn.Upsample) for m in model.decoder.modules()) == stages
    assert model.decoder.body(torch.randn(1, 32, 3, 5)).shape[-2:] == (3 * patch, 5 * patch)


def test_adapter_without_decoder_stages_loads_with_its_own_stages(tmp_path):
    """Adapters written before decoder_stages was recorded: the stages are counted in the tensors."""
    import json as _json

    model = create_segmentation_model(make_vit(dynamic_img_size=True), "linear", 5, decoder="pup", crop_size=32,
                                      decoder_channels=8, decoder_stages=4)
    model.save_adapter(tmp_path / "old")
    # rewrite it as format 1 wrote it: the config only in the JSON, with the tensor file's sha256
    from safetensors.torch import load_file, save_file

    from ivpt.data.paths import sha256_file

    tensors_file, config_file = tmp_path / "old" / "adapter.safetensors", tmp_path / "old" / "adapter_config.json"
    save_file(load_file(str(tensors_file)), str(tensors_file), metadata={"format": "ivpt-adapter"})
    config = _json.loads(config_file.read_text())
    del config["decoder_stages"]
    config.update(format_version=1, tensors_sha256=sha256_file(tensors_file))
    config_file.write_text(_json.dumps(config))
    loaded = ivpt.load_adapter(tmp_path / "old", backbone=make_vit(dynamic_img_size=True))
    assert loaded.decoder_stages == 4
    for a, b in zip(model.decoder.state_dict().values(), loaded.decoder.state_dict().values()):
        assert torch.equal(a, b)


def test_decoder_trains_and_is_counted_apart():
    model = seg_model("vpt-deep", "naive")
    counts = count_segmentation_parameters(model)
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert counts["decoder"] == decoder and counts["prompt_side"] == 4 * 2 * 32
    assert counts["tuned"] == decoder + 4 * 2 * 32
    model.train()
    assert not model.encoder.backbone.training and model.decoder.training
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.randint(0, 5, (2, 32, 32)),
                                             ignore_index=4)
    loss.backward()
    assert all(p.grad is not None for p in model.tuned_parameters().values())
    assert all(p.grad is None for p in model.encoder.backbone.parameters())


def test_segmentation_adapter_round_trip_includes_decoder_statistics(tmp_path):
    vit = make_vit(dynamic_img_size=True)
    import copy

    model = create_segmentation_model(copy.deepcopy(vit), "ivpt", 5, decoder="pup", crop_size=32, decoder_channels=16,
                                      prompt_length=2, ar_gamma_init=0.3, ignore_index=4)
    model.train()
    model(torch.randn(4, 3, 32, 32))  # moves BatchNorm running statistics
    model.eval()
    model.save_adapter(tmp_path / "seg")
    loaded = ivpt.load_adapter(tmp_path / "seg", backbone=copy.deepcopy(vit)).eval()
    assert type(loaded).__name__ == "SegmentationModel" and loaded.decoder_kind == "pup"
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # the card's counts: prompts and AR under the method, the decoder's parameters without its statistics
    from ivpt.card import parameter_rows

    from ivpt.adapter_format import read_adapter_config

    rows = dict(parameter_rows(read_adapter_config(tmp_path / "seg")))
    counts = count_segmentation_parameters(model)
    assert rows["decoder"] == counts["decoder"] and "backbone (in place)" not in rows
    assert sum(v for k, v in rows.items() if k not in ("decoder", "head")) == counts["tuned_without_head"]


def test_sliding_window_and_multiscale():
    model = seg_model("vpt-deep", "linear").eval()
    image = torch.randn(1, 3, 40, 72)
    out = slide_inference(model, image, crop=32, stride=16)
    assert out.shape == (1, 5, 40, 72) and torch.isfinite(out).all()
    # a window covering the whole image gives the plain forward
    small = torch.randn(1, 3, 32, 32)
    assert torch.allclose(slide_inference(model, small, 32, 16), model(small))
    probs = multiscale_flip_inference(model, image, scales=(0.75, 1.0), crop=32, stride=16)
    assert probs.shape == (1, 5, 40, 72) and torch.allclose(probs.sum(1), torch.ones(1, 40, 72), atol=1e-5)


def test_confusion_matrix_metrics():
    cm = ConfusionMatrix(3, ignore_index=255)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm.update(pred, target)
    m = cm.compute()
    # class 0: tp 1, fp 1 (a 2 predicted 0), fn 1 -> 1/3; class 1: tp 2, fp 1, fn 0 -> 2/3; class 2: tp 1, fn 1 -> 1/2
    assert m["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert m["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["pixel_accuracy"] == pytest.approx(4 / 6) and m["pixels"] == 6


def test_unknown_decoder_is_refused():
    with pytest.raises(ivpt.OptionError, match="'decoder'"):
        create_segmentation_model(make_vit(dynamic_img_size=True), "linear", 5, decoder="fpn", crop_size=32)


# -- data and training ---------------------------------------------------------------------------
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ivpt import cli  # noqa: E402
from ivpt.data.datasets import DataError  # noqa: E402
from ivpt.data.segmentation import IGNORE_INDEX, SegEvalTransform, SegTrainTransform, ade20k  # noqa: E402
from ivpt.engine.config import TrainConfig  # noqa: E402
from ivpt.engine.loop import train  # noqa: E402

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def make_ade20k(root: Path, n=4):
    """ADEChallengeData2016 layout; the left half is class 1 (stored as 2), the right half class 'other' (0)."""
    base = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for split, prefix in (("training", "train"), ("validation", "val")):
        for i in range(n):
            name = f"ADE_{prefix}_{i:08d}"
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            pixels[:, :24] = (220, 30, 30)
            mask = np.zeros((40, 48), np.uint8)
            mask[:, :24] = 2
            mask[:8, 24:] = 150
            for sub, data, ext in (("images", pixels, "jpg"), ("annotations", mask, "png")):
                path = base / sub / split / f"{name}.{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(data).save(path)
    return root


def test_ade20k_layout_and_label_mapping(tmp_path):
    root = make_ade20k(tmp_path)
    ds = ade20k(root, "train")
    assert len(ds) == 4 and len(ds.classes) == 150
    image, mask = ds.load(0)
    assert image.size == (48, 40) and mask.dtype == np.int64
    assert set(np.unique(mask)) == {1, 149, IGNORE_INDEX}  # 2 -> 1, 150 -> 149, 0 ignored
    with pytest.raises(DataError, match="unknown ADE20K split"):
        ade20k(root, "test")
    (root / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000001.png").unlink()
    with pytest.raises(DataError, match="ADE_val_00000001.jpg has no annotation"):
        ade20k(root, "val")
    with pytest.raises(DataError, match="ADE20K folder not found"):
        ade20k(tmp_path / "nowhere", "train")


def test_segmentation_transforms():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    mask = np.arange(40 * 60).reshape(40, 60) % 5
    train_tf = SegTrainTransform(32, (120, 40), (0.5,) * 3, (0.5,) * 3, ratio_range=(0.5, 2.0))
    for _ in range(5):
        x, y = train_tf(image, mask)
        assert x.shape == (3, 32, 32) and y.shape == (32, 32)
        assert set(y.unique().tolist()) <= {0, 1, 2, 3, 4, IGNORE_INDEX}  # nearest resize: no new labels
    x, y = SegEvalTransform((120, 40), (0.5,) * 3, (0.5,) * 3, multiple=8)(image, mask)
    assert x.shape[1] % 8 == 0 and x.shape[2] % 8 == 0 and y.shape == (40, 60)


def test_segmentation_training_eval_and_predict(tmp_path):
    root = make_ade20k(tmp_path / "data")
    torch.manual_seed(0)
    import timm

    save_file(timm.create_model("vit_mini_patch4_32", **TINY).state_dict(), str(tmp_path / "b.safetensors"))
    cfg = TrainConfig(task="segmentation", backbone="vit_mini_patch4_32", backbone_options=TINY,
                      weights=str(tmp_path / "b.safetensors"), method="ivpt", method_options={"prompt_length": 2},
                      data={"kind": "ade20k", "root": str(root)}, segmentation={"decoder": "naive", "crop_size": 32,
                      "decoder_channels": 8, "base_size": [64, 32]}, optimizer="adamw", lr=0.01, lr_scaling=False,
                      epochs=2, warmup_epochs=1, batch_size=2, schedule="poly", output=str(tmp_path / "run"))
    results = train(cfg.validate(), quiet=True)
    assert results["primary_metric"] == "mIoU" and 0 <= results["val"]["mIoU"] <= 1
    assert len(results["val"]["per_class_iou"]) == 150 and results["parameters"]["decoder"] > 0
    assert "val_mIoU" in results["log"][-1] and "train_pixel_accuracy" in results["log"][-1]
    adapter = tmp_path / "run" / "adapter"
    assert cli.main(["eval", str(adapter), "--split", "val", "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["mIoU"] == pytest.approx(results["val"]["mIoU"])
    # mIoU-MS: every default scale, flipped and not; the metric must equal a direct computation
    assert cli.main(["eval", str(adapter), "--split", "val", "--multiscale", "--output", str(tmp_path / "ms.json")]) == 0
    ms = json.loads((tmp_path / "ms.json").read_text())
    assert ms["scales"] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and 0 <= ms["mIoU"] <= 1
    model = ivpt.load_adapter(adapter).eval()
    from ivpt.engine.segdata import build_segmentation_data

    val = build_segmentation_data(cfg, model.encoder.backbone.pretrained_cfg, 4).splits["val"]
    single, multi = ConfusionMatrix(150, IGNORE_INDEX), ConfusionMatrix(150, IGNORE_INDEX)
    for i in range(len(val)):
        image, mask = val[i]
        for matrix, logits in ((single, slide_inference(model, image[None], 32, 21)),
                               (multi, multiscale_flip_inference(model, image[None]))):
            logits = torch.nn.functional.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
            matrix.update(logits.argmax(1), torch.as_tensor(mask)[None])
    expected = multi.compute()
    assert ms["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"]) and ms["pixels"] == expected["pixels"]
    assert np.allclose(np.nan_to_num(ms["per_class_iou"], nan=-1), np.nan_to_num(expected["per_class_iou"], nan=-1))
    assert not torch.equal(single.matrix, multi.matrix)  # the scales and flips changed some predictions
    with pytest.raises(SystemExit):
        cli.main(["eval", str(adapter), "--multiscale", "0"])
    images = root / "ADEChallengeData2016" / "images" / "validation"
    assert cli.main(["predict", str(adapter), str(images), "--output", str(tmp_path / "pred")]) == 0
    mask = Image.open(tmp_path / "pred" / "ADE_val_00000000_mask.png")
    assert mask.size == (48, 40) and (tmp_path / "pred" / "ADE_val_00000000_overlay.png").is_file()
    assert len(json.loads((tmp_path / "pred" / "legend.json").read_text())) == 150
    twin = tmp_path / "other" / "ADE_val_00000000.png"  # the same stem from another folder: one mask each
    twin.parent.mkdir()
    Image.open(next(images.iterdir())).save(twin)
    before = (tmp_path / "pred" / "ADE_val_00000000_mask.png").read_bytes()
    assert cli.main(["predict", str(adapter), str(images), str(twin), "--output", str(tmp_path / "pred")]) == 2
    assert (tmp_path / "pred" / "ADE_val_00000000_mask.png").read_bytes() == before  # nothing overwritten


def test_miou_counts_classes_that_are_only_predicted():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 2, 2]), torch.tensor([0, 0, 0, 0]))  # class 2 predicted, never true
    m = cm.compute()
    assert m["per_class_iou"][0] == pytest.approx(0.5) and m["per_class_iou"][2] == 0.0
    assert m["mIoU"] == pytest.approx(0.25)  # class 1 (absent everywhere) is left out, class 2 is not


def test_segmentation_augmentation_follows_torch_seed():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    mask = np.arange(40 * 60).reshape(40, 60) % 5
    tf = SegTrainTransform(32, (120, 40), (0.5,) * 3, (0.5,) * 3)
    torch.manual_seed(3)
    a = tf(image, mask)
    torch.manual_seed(3)
    b = tf(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("pool", ["avg", "map"])
@pytest.mark.parametrize("method", ["ssf", "bitfit", "full", "lora"])
def test_every_tuned_tensor_of_a_segmentation_encoder_is_reached_by_the_patch_tokens(method, pool):
    """The dense path never runs timm's pooling (attn_pool, fc_norm): tensors there would be tuned, stored,
    never trained, and under DDP (no find_unused_parameters) stop training at its second step."""
    vit = make_vit(dynamic_img_size=True, global_pool=pool)
    model = create_segmentation_model(vit, method, 5, decoder="naive", crop_size=32, decoder_channels=16)
    assert not any("fc_norm" in name or "attn_pool" in name for name in model.adapter_tensors())
    model.train()
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.randint(0, 5, (2, 32, 32))).backward()
    unreached = [name for name, p in model.tuned_parameters().items() if p.grad is None]
    assert unreached == []


def test_a_segmentation_adapter_saved_with_pooling_modules_still_loads(tmp_path):
    """Adapters saved before the pooling modules left segmentation encoders hold tensors there (SSF's last
    site, BitFit's fc_norm bias): without the record they are rebuilt as they were, and load."""
    import copy

    from conftest import rewrite_config

    vit = make_vit(dynamic_img_size=True, global_pool="avg")
    for method in ("ssf", "bitfit"):
        old = create_segmentation_model(copy.deepcopy(vit), method, 5, decoder="naive", crop_size=32,
                                        decoder_channels=16, pooling_modules=True).eval()
        old.save_adapter(tmp_path / method)
        rewrite_config(tmp_path / method, lambda c: c.pop("pooling_modules"))  # as an older ivpt wrote it
        loaded = ivpt.load_adapter(tmp_path / method, backbone=copy.deepcopy(vit)).eval()
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(loaded(x), old(x))
        new = create_segmentation_model(copy.deepcopy(vit), method, 5, decoder="naive", crop_size=32,
                                        decoder_channels=16)
        new.save_adapter(tmp_path / f"{method}-new")
        assert ivpt.load_adapter(tmp_path / f"{method}-new", backbone=copy.deepcopy(vit)) is not None
