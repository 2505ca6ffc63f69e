"""The VPT family beside iVPT (issue 34): prompts pooled as VPT's MAE code pools them (``pool_prompts``),
VFPT, and the self-supervised backbones' recipes and checkpoint converter."""
import pytest
import torch
import torch.nn.functional as F

import ivpt
from conftest import clone, make_vit, randomize

PROMPT_METHODS = ["vpt-shallow", "vpt-deep", "gatevpt", "ivpt", "ivpt-static", "vfpt"]
AVG = {"global_pool": "avg"}  # timm: the mean over the tokens after the prefix, then fc_norm (norm = Identity)


def reference_vpt_deep_mae(vit, prompts, images):
    """VPT-deep as KMnP/vpt's vit_mae.py computes it with VIT_POOL_TYPE 'original': the last block's output
    without the class token (prompts and patches) averaged, then fc_norm, then the head."""
    x = vit._pos_embed(vit.patch_embed(images))
    b, p = x.shape[0], prompts.shape[1]
    for i, block in enumerate(vit.blocks):
        x = block(torch.cat([x[:, :1], prompts[i].expand(b, -1, -1), x[:, 1 + (p if i else 0):]], dim=1))
    pooled = x[:, 1:].mean(dim=1)
    return vit.head(F.layer_norm(pooled, pooled.shape[-1:], vit.fc_norm.weight, vit.fc_norm.bias, vit.fc_norm.eps))


def test_pool_prompts_vpt_deep_matches_vpt_mae_code(images):
    model = randomize(ivpt.create_model(make_vit(**AVG), "vpt-deep", 7, prompt_length=3, pool_prompts=True)).eval()
    assert isinstance(model.backbone.norm, torch.nn.Identity)  # timm's avg pooling: the norm comes after it
    with torch.no_grad():
        expected = reference_vpt_deep_mae(model.backbone, model.method.prompts, images)
        assert torch.allclose(model(images), expected, atol=1e-5)
        model.pool_prompts = False  # the patches alone: a different number
        assert not torch.allclose(model(images), expected, atol=1e-3)


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_pool_prompts_averages_prompts_with_patches(method, images):
    vit = make_vit(**AVG)
    on = randomize(ivpt.create_model(clone(vit), method, 7, prompt_length=3, pool_prompts=True)).eval()
    off = ivpt.create_model(clone(vit), method, 7, prompt_length=3).eval()
    off.load_state_dict(on.state_dict())
    with torch.no_grad():
        tokens = on.forward_tokens(images)
        pooled = torch.cat([tokens.prompts, tokens.patches], dim=1).mean(dim=1)  # the class token left out
        norm = on.backbone.fc_norm
        expected = on.head(F.layer_norm(pooled, pooled.shape[-1:], norm.weight, norm.bias, norm.eps))
        assert torch.allclose(on(images), expected, atol=1e-5)
        # off: today's pooling, the patches alone
        patches_only = on.head(F.layer_norm(tokens.patches.mean(dim=1), pooled.shape[-1:], norm.weight, norm.bias,
                                            norm.eps))
        assert torch.allclose(off(images), patches_only, atol=1e-5)
        assert not torch.allclose(on(images), off(images), atol=1e-3)


@pytest.mark.parametrize("method", PROMPT_METHODS)
@pytest.mark.parametrize("overrides", [{}, AVG])
def test_pool_prompts_off_is_todays_forward(method, overrides, images):
    vit = make_vit(**overrides)
    default = randomize(ivpt.create_model(clone(vit), method, 7, prompt_length=3)).eval()
    off = ivpt.create_model(clone(vit), method, 7, prompt_length=3, pool_prompts=False).eval()
    off.load_state_dict(default.state_dict())
    with torch.no_grad():
        today = default.backbone.forward_head(default.forward_tokens(images).without_prompts())
        assert torch.equal(off(images), today) and torch.equal(default(images), today)


def test_pool_prompts_refused_where_there_is_no_average(images):
    with pytest.raises(ivpt.OptionError, match=r"pool_prompts.*pools by 'token'.*global_pool: avg"):
        ivpt.create_model(make_vit(), "vpt-deep", 7, pool_prompts=True)
    with pytest.raises(ivpt.OptionError, match=r"pool_prompts.*map \(attention pooling\)"):
        ivpt.create_model(make_vit(class_token=False, global_pool="map"), "vpt-shallow", 7, pool_prompts=True)
    with pytest.raises(ivpt.OptionError, match="pool_prompts.*segmentation"):
        ivpt.create_model(make_vit(**AVG), "vpt-deep", 7, pool_prompts=True, pooling=False)
    with pytest.raises(ivpt.OptionError, match="unknown option 'pool_prompts' for method 'lora'"):
        ivpt.create_model(make_vit(**AVG), "lora", 7, pool_prompts=True)
    with pytest.raises(ivpt.OptionError, match="'pool_prompts': got 'yes'"):
        ivpt.create_model(make_vit(**AVG), "gatevpt", 7, pool_prompts="yes")


def test_pool_prompts_survives_save_and_load(tmp_path, images):
    vit = make_vit(**AVG)
    model = randomize(ivpt.create_model(clone(vit), "vpt-deep", 7, prompt_length=3, pool_prompts=True)).eval()
    model.save_adapter(tmp_path / "a")
    loaded = ivpt.load_adapter(tmp_path / "a", backbone=clone(vit)).eval()
    assert loaded.pool_prompts and loaded.method.config.pool_prompts
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
