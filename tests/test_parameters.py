"""Parameter counts against the spec's formulas, on a real-size ViT-B/16 built on the meta device."""
import pytest
import torch

import ivpt


CASES = {
    "linear": ("linear", {}),
    "full": ("full", {}),
    "vpt-shallow": ("vpt-shallow", {"prompt_length": 10}),
    "vpt-deep": ("vpt-deep", {"prompt_length": 10}),
    "ivpt": ("ivpt", {"prompt_length": 10, "da": "gate"}),  # the spec's formulas are for the gate
    "ivpt-default": ("ivpt", {"prompt_length": 10}),
    "ivpt-channel": ("ivpt", {"prompt_length": 10, "da": "channel"}),
    "ivpt-static": ("ivpt", {"prompt_length": 10, "da": "static"}),
    "preset-ivpt-static": ("ivpt-static", {"prompt_length": 10}),
    "ivpt-sum": ("ivpt", {"prompt_length": 10, "da": "sum"}),
    "ivpt-noar": ("ivpt", {"prompt_length": 10, "ar": False}),
    "ivpt-layers": ("ivpt", {"prompt_length": 10, "da": "gate", "layers": [0, 5, 10]}),
}


@pytest.fixture(scope="module")
def vit_b_counts():
    counts = {}
    with torch.device("meta"):  # real ViT-B/16 shapes, no memory, no init cost
        for case, (method, options) in CASES.items():
            counts[case] = ivpt.count_parameters(ivpt.create_model("vit_base_patch16_224", method, 100, **options))
    return counts


def test_vit_b16_counts_match_spec(vit_b_counts):
    n, p, d = 12, 10, 768
    ivpt_counts = vit_b_counts["ivpt"]
    assert ivpt_counts["prompts"] == n * p * d == 92_160
    assert ivpt_counts["da"] == (n - 1) * (2 * d + 1) == 16_907
    assert ivpt_counts["ar"] == n - 1 == 11
    assert ivpt_counts["tuned_without_head"] == 109_078
    assert ivpt_counts["head"] == d * 100 + 100
    assert ivpt_counts["backbone"] == 85_798_656  # timm's ViT-B/16 without its head
    assert vit_b_counts["vpt-deep"]["tuned_without_head"] == 92_160
    assert vit_b_counts["vpt-shallow"]["tuned_without_head"] == p * d
    assert vit_b_counts["linear"]["tuned"] == vit_b_counts["linear"]["head"]
    assert vit_b_counts["full"]["tuned"] == vit_b_counts["full"]["total"]
    assert vit_b_counts["ivpt-channel"]["da"] == (n - 1) * 3 * d
    assert vit_b_counts["ivpt-static"]["da"] == n - 1
    # method="ivpt" with no options is the spec's method (gate DA); the preset ivpt-static: 92,160 + 11 + 11
    assert vit_b_counts["ivpt-default"] == vit_b_counts["ivpt"]
    assert vit_b_counts["preset-ivpt-static"]["da"] == n - 1
    assert vit_b_counts["preset-ivpt-static"]["tuned_without_head"] == 92_182
    assert vit_b_counts["ivpt-sum"]["da"] == 0
    assert vit_b_counts["ivpt-noar"]["ar"] == 0
    assert vit_b_counts["ivpt-layers"]["da"] == 3 * (2 * d + 1) and vit_b_counts["ivpt-layers"]["ar"] == 3


def test_counts_report_the_components_each_method_names():
    with torch.device("meta"):
        lora = ivpt.count_parameters(ivpt.create_model("vit_base_patch16_224", "lora", 100))
        deep = ivpt.count_parameters(ivpt.create_model("vit_base_patch16_224", "vpt-deep", 100, prompt_length=10))
    shared = {"total", "tuned", "backbone", "head", "tuned_without_head"}
    assert set(lora) - shared == {"lora"} and set(deep) - shared == {"prompts"}  # no other method's names
    assert lora["lora"] == lora["tuned_without_head"] and deep["prompts"] == deep["tuned_without_head"]
