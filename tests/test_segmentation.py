"""Segmentation: prompted encoder + decoders, any input size, adapters, metrics."""
import pytest
import torch

import ivpt
from ivpt.segmentation import (ConfusionMatrix, count_segmentation_parameters, create_segmentation_model,
                               multiscale_flip_inference, slide_inference)
from conftest import make_vit


def seg_model(method="ivpt", decoder="pup", **options):
    vit = make_vit(dynamic_img_size=True)
    return create_segmentation_model(vit, method, 5, decoder=decoder, crop_size=32, decoder_channels=16,
                                     **({"prompt_length": 2} if method not in ("linear", "full") else {}), **options)


@pytest.mark.parametrize("decoder", ["linear", "naive", "pup"])
@pytest.mark.parametrize("method", ["linear", "vpt-deep", "ivpt"])
def test_logits_at_image_size_for_any_size(decoder, method):
    model = seg_model(method, decoder).eval()
    for size in ((32, 32), (48, 64)):
        out = model(torch.randn(2, 3, *size))
        assert out.shape == (2, 5, *size)
    if method == "ivpt":  # AR acts unchanged: K follows the number of patches (6 x 8 = 48 -> 12)
        assert model.encoder.last_reinforcement[0].selected.shape == (2, 12)


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
