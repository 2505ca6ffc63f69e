"""AR: which patches it picks, how many it changes, and that its saliency is the CLS attention."""
import pytest
import torch

import ivpt
from conftest import full_attention_saliency, make_vit, record_ar, record_block_inputs


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.01])
@pytest.mark.parametrize("mix", ["mean", "attn"])
def test_ar_changes_exactly_top_k_patches(ratio, mix):
    model = ivpt.create_model(make_vit(), "ivpt", 7, prompt_length=3, ar_ratio=ratio, ar_mix=mix,
                              ar_gamma_init=0.7).eval()
    seen = record_ar(model)
    inputs = record_block_inputs(model)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        trace = model.forward_explained(images).trace
    m = 16
    k = max(1, int(ratio * m + 0.5))
    assert [s[0] for s in seen] == [0, 1, 2]  # every transition of a depth-4 backbone
    for i, before, after, saliency, selected in seen:
        changed = (before != after).any(dim=-1)  # (B, m)
        assert (changed.sum(dim=1) == k).all()
        top = saliency.topk(k, dim=1).indices
        for img in range(images.shape[0]):
            assert set(changed[img].nonzero().flatten().tolist()) == set(top[img].tolist())
            assert set(selected[img].tolist()) == set(top[img].tolist())
        expected = full_attention_saliency(model.backbone.blocks[i], inputs[i], slice(0, 1), 1 + 3)
        assert torch.allclose(saliency, expected, atol=1e-6)
    # the trace returns the same selection, and the saliency of every block
    assert sorted(trace.selected) == [0, 1, 2] and sorted(trace.saliency) == [0, 1, 2, 3]
    for i, _, _, saliency, selected in seen:
        assert torch.equal(trace.selected[i], selected) and torch.equal(trace.saliency[i], saliency)
    assert trace.saliency[0].shape == (4, m) and trace.selected[0].shape == (4, k)


def test_ar_mean_mix_adds_gamma_times_mean_prompt():
    model = ivpt.create_model(make_vit(), "ivpt", 7, prompt_length=3, ar_gamma_init=0.3, cdc=False).eval()
    seen = record_ar(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    i, before, after, _, selected = seen[0]
    r = model.method.prompts[i + 1].mean(dim=0)  # cdc=False: Q_{i+1} = P_{i+1}
    delta = (after - before)[0, selected[0, 0]]
    assert torch.allclose(delta, 0.3 * r, atol=1e-6)


def test_prompt_source_saliency_and_no_cls_backbone():
    vit = make_vit(class_token=False, global_pool="avg")
    with pytest.raises(ivpt.OptionError, match="ar_source"):
        ivpt.create_model(vit, "ivpt", 7)
    model = ivpt.create_model(make_vit(class_token=False, global_pool="avg"), "ivpt", 7, prompt_length=3,
                              ar_source="prompts", ar_gamma_init=0.5).eval()
    seen = record_ar(model)
    inputs = record_block_inputs(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for i, _, _, saliency, _ in seen:
        expected = full_attention_saliency(model.backbone.blocks[i], inputs[i], slice(0, 3), 3)
        assert torch.allclose(saliency, expected, atol=1e-6)


def test_register_tokens_keep_cls_as_query():
    model = ivpt.create_model(make_vit(reg_tokens=2), "ivpt", 7, prompt_length=2, ar_gamma_init=0.5).eval()
    seen = record_ar(model)
    inputs = record_block_inputs(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    i, _, _, saliency, _ = seen[1]
    expected = full_attention_saliency(model.backbone.blocks[i], inputs[i], slice(0, 1), 3 + 2)
    assert torch.allclose(saliency, expected, atol=1e-6)


def test_dynamic_image_size_adapts_k():
    vit = make_vit(dynamic_img_size=True)
    model = ivpt.create_model(vit, "ivpt", 7, prompt_length=2, ar_ratio=0.25).eval()
    with torch.no_grad():
        explained = model.forward_explained(torch.randn(2, 3, 48, 64))  # a 6 x 8 grid of patches
    assert explained.output.shape == (2, 7)
    assert explained.trace.selected[0].shape == (2, 12)


def test_k_rounds_half_up():
    from ivpt.methods.ivpt import AttentiveReinforcement

    assert AttentiveReinforcement("mean", 0.25, 0.0).num_selected(10) == 3  # 2.5 -> 3, not half-even 2
    assert AttentiveReinforcement("mean", 0.25, 0.0).num_selected(196) == 49
    assert AttentiveReinforcement("mean", 0.001, 0.0).num_selected(16) == 1


def test_saliency_stays_float32_under_bf16_autocast():
    model = ivpt.create_model(make_vit(), "ivpt", 7, prompt_length=2).eval()
    seen = record_ar(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 32, 32))
    assert seen[0][3].dtype == torch.float32


@pytest.mark.parametrize("options", [{}, {"qk_norm": True}, {"init_values": 0.1}, {"scale_attn_norm": True},
                                     {"scale_mlp_norm": True}, {"qkv_bias": False}, {"fused": False}])
def test_block_with_saliency_is_the_block_itself(options):
    """AR's hookless block pass equals timm's ``block(x)`` exactly, and its saliency the explicit one."""
    from timm.models.vision_transformer import Block

    from ivpt.encoder import block_with_saliency

    options = dict(options)
    fused = options.pop("fused", True)
    torch.manual_seed(0)
    block = Block(32, 4, **{"qkv_bias": True, **options}).eval()
    block.attn.fused_attn = fused
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 9, 32)
    out, saliency = block_with_saliency(block, x, slice(0, 1), 3)
    assert torch.allclose(out, block(x), atol=1e-6, rtol=1e-5)
    assert torch.allclose(saliency, full_attention_saliency(block, x, slice(0, 1), 3), atol=1e-6)


def test_block_with_saliency_honours_timms_gated_attention():
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    from ivpt.encoder import block_with_saliency

    torch.manual_seed(0)
    block = Block(32, 4, qkv_bias=True).eval()
    block.attn = Attention(32, 4, qkv_bias=True, gated=True).eval()
    x = torch.randn(2, 9, 32)
    assert block.attn.gate is not None
    assert torch.allclose(block_with_saliency(block, x, slice(0, 1), 3)[0], block(x), atol=1e-6, rtol=1e-5)
