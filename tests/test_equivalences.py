"""Reductions to known models: each switch setting must give exactly the baseline it names."""
import pytest
import torch

import ivpt
from conftest import clone, copy_tuned, make_vit


@pytest.mark.parametrize("overrides", [
    {},
    {"class_token": False, "global_pool": "avg"},
    {"reg_tokens": 2},
    {"no_embed_class": True, "reg_tokens": 1},
    {"init_values": 0.1},
    {"class_token": False, "global_pool": "map"},
])
@pytest.mark.parametrize("method,options", [("linear", {}), ("full", {})])  # a prompt length of 0 is refused
def test_no_prompts_equals_timm_forward(overrides, method, options, images):
    vit = make_vit(**overrides)
    reference = clone(vit)
    model = ivpt.create_model(vit, method, 7, **options).eval()
    with torch.no_grad():
        reference.head.load_state_dict(model.head.state_dict())
        assert torch.equal(model.forward_features(images), reference.forward_features(images))
        # logits: timm's avg pooling reduces over a differently strided tensor, so allow 1 ulp
        assert torch.allclose(model(images), reference(images), rtol=0, atol=1e-6)


def reference_vpt(vit, prompts, images, deep: bool):
    """Independent VPT forward: prompts after the prefix tokens; deep replaces, shallow carries."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    b, npt, p = x.shape[0], vit.num_prefix_tokens, prompts.shape[1]
    x = torch.cat([x[:, :npt], prompts[0].expand(b, -1, -1), x[:, npt:]], dim=1)
    for i, block in enumerate(vit.blocks):
        if deep and i > 0:
            x = torch.cat([x[:, :npt], prompts[i].expand(b, -1, -1), x[:, npt + p:]], dim=1)
        x = block(x)
    x = vit.norm(x)
    x = torch.cat([x[:, :npt], x[:, npt + p:]], dim=1)
    return vit.forward_head(x)


@pytest.mark.parametrize("overrides", [{}, {"class_token": False, "global_pool": "avg"}, {"reg_tokens": 2},
                                       {"class_token": False, "global_pool": "map"}])
@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep"])
def test_vpt_matches_independent_reimplementation(overrides, method, images):
    vit = make_vit(**overrides)
    model = ivpt.create_model(vit, method, 7, prompt_length=5).eval()
    with torch.no_grad():
        model.method.prompts.normal_()  # well away from the tiny init so a wrong order would show
        expected = reference_vpt(model.backbone, model.method.prompts, images, deep=method == "vpt-deep")
        assert torch.allclose(model(images), expected, atol=1e-6)
        # and the two really differ: shallow carries the prompt outputs, deep replaces them
        per_block = model.method.prompts.expand(len(model.backbone.blocks), -1, -1)  # P_0 reused when deep
        other = reference_vpt(model.backbone, per_block, images, deep=method != "vpt-deep")
        assert not torch.allclose(model(images), other, atol=1e-3)


def test_vpt_shallow_has_one_prompt_layer_deep_has_one_per_block(vit):
    shallow = ivpt.create_model(clone(vit), "vpt-shallow", 7, prompt_length=3)
    deep = ivpt.create_model(clone(vit), "vpt-deep", 7, prompt_length=3)
    assert shallow.method.prompts.shape == (1, 3, 32)
    assert deep.method.prompts.shape == (4, 3, 32)


def test_prompt_init_follows_vpt_bound(vit):
    model = ivpt.create_model(vit, "vpt-deep", 7, prompt_length=50)
    bound = (6 / (3 * 8 * 8 + 32)) ** 0.5
    prompts = model.method.prompts
    assert prompts.abs().max() <= bound
    assert prompts.abs().max() > 0.9 * bound  # uniform over the whole range, not a narrower init


def test_ivpt_without_cdc_and_ar_is_vpt_deep_exactly(vit, images):
    deep = ivpt.create_model(clone(vit), "vpt-deep", 7, prompt_length=4).eval()
    plain = ivpt.create_model(clone(vit), "ivpt", 7, prompt_length=4, cdc=False, ar=False).eval()
    copy_tuned(deep, plain)
    with torch.no_grad():
        assert torch.equal(plain(images), deep(images))
    assert ivpt.count_parameters(plain)["tuned"] == ivpt.count_parameters(deep)["tuned"]


@pytest.mark.parametrize("da", ["gate", "channel", "static"])
def test_closed_gate_is_vpt_deep_up_to_layernorm_eps(vit, images, da):
    deep = ivpt.create_model(clone(vit), "vpt-deep", 7, prompt_length=4).eval()
    closed = ivpt.create_model(clone(vit), "ivpt", 7, prompt_length=4, da=da, da_bias_init=-40.0, ar=False).eval()
    copy_tuned(deep, closed)
    with torch.no_grad():
        out_closed, out_deep = closed(images), deep(images)
        assert torch.allclose(out_closed, out_deep, atol=1e-4)
        # an open gate is something else: it carries the prompts on
        opened = ivpt.create_model(clone(vit), "ivpt", 7, prompt_length=4, da=da, da_bias_init=40.0, ar=False).eval()
        copy_tuned(deep, opened)
        assert not torch.allclose(opened(images), out_deep, atol=1e-3)


def test_open_gate_in_raw_space_is_vpt_shallow(vit, images):
    shallow = ivpt.create_model(clone(vit), "vpt-shallow", 7, prompt_length=4).eval()
    opened = ivpt.create_model(clone(vit), "ivpt", 7, prompt_length=4, da="static", da_space="raw",
                               da_bias_init=60.0, ar=False).eval()
    with torch.no_grad():
        opened.head.load_state_dict(shallow.head.state_dict())
        opened.method.prompts[0].copy_(shallow.method.prompts[0])
        assert torch.allclose(opened(images), shallow(images), atol=1e-5)


def test_zero_frozen_gamma_changes_nothing(vit, images):
    with_ar = ivpt.create_model(clone(vit), "ivpt", 7, prompt_length=4, ar=True, ar_gamma_init=0.0).eval()
    without = ivpt.create_model(clone(vit), "ivpt", 7, prompt_length=4, ar=False).eval()
    for module in with_ar.method.reinforcement.values():
        module.gamma.requires_grad_(False)
    without.load_state_dict(with_ar.state_dict(), strict=False)
    with torch.no_grad():
        explained = with_ar.forward_explained(images)
        assert torch.equal(explained.output, without(images))
    assert len(explained.trace.selected) == 3  # AR did run and select, it just added nothing


def test_layers_restricts_cdc_and_ar(vit):
    model = ivpt.create_model(vit, "ivpt", 7, prompt_length=2, layers=[0, 2])
    assert sorted(model.method.aggregation) == ["0", "2"]
    assert sorted(model.method.reinforcement) == ["0", "2"]
    with pytest.raises(ivpt.OptionError, match="layers"):
        ivpt.create_model(make_vit(), "ivpt", 7, layers=[3])
