"""The VPT family beside iVPT (issue 34): prompts pooled as VPT's MAE code pools them (``pool_prompts``),
VFPT, and the self-supervised backbones' recipes and checkpoint converter."""
import pytest
import torch
import torch.nn.functional as F

import ivpt
from conftest import clone, make_vit, randomize

PROMPT_METHODS = ["vpt-shallow", "vpt-deep", "gatevpt", "ivpt", "ivpt-static", "vfpt", "e2vpt"]
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
    with pytest.raises(ivpt.OptionError, match="pool_prompts.*includes its prefix tokens"):
        ivpt.create_model(make_vit(**AVG, pool_include_prefix=True), "vpt-deep", 7, pool_prompts=True)
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


# -- VFPT ---------------------------------------------------------------------------------------------
def fourier_reference(x, dims):
    """The VFPT code's FNetBlock: torch.fft over the hidden axis, then the sequence axis; the real part."""
    if dims == "hidden":
        return torch.fft.fft(x, dim=-1).real
    if dims == "sequence":
        return torch.fft.fft(x, dim=-2).real
    return torch.fft.fft(torch.fft.fft(x, dim=-1), dim=-2).real


def reference_vfpt(vit, prompts, images, share, dims="all", location="prepend", first_layer=True):
    """VFPT written from the paper's definition with torch.fft: VPT-deep whose first floor(p * share) prompts of
    every block (block 0 only if first_layer) enter as the real part of their DFT."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    b, npt, p = x.shape[0], vit.num_prefix_tokens, prompts.shape[1]
    k = int(p * share)
    for i, block in enumerate(vit.blocks):
        q = prompts[i].expand(b, -1, -1)
        if k and (i or first_layer):
            f = fourier_reference(q[:, :k], dims)
            q = torch.cat([f, q[:, k:]] if location == "prepend" else [q[:, k:], f], dim=1)
        x = block(torch.cat([x[:, :npt], q, x[:, npt + (p if i else 0):]], dim=1))
    x = vit.norm(x)
    return vit.forward_head(torch.cat([x[:, :npt], x[:, npt + p:]], dim=1))


@pytest.mark.parametrize("options", [
    {"fourier_share": 0.5},
    {"fourier_share": 1.0},
    {"fourier_share": 0.4, "fourier_dims": "sequence", "fourier_location": "append"},
    {"fourier_share": 0.6, "fourier_dims": "hidden", "fourier_first_layer": False},
])
@pytest.mark.parametrize("overrides", [{}, {"reg_tokens": 2}])
def test_vfpt_matches_an_independent_fft_forward(options, overrides, images):
    vit = make_vit(**overrides)
    model = randomize(ivpt.create_model(clone(vit), "vfpt", 7, prompt_length=5, **options)).eval()
    with torch.no_grad():
        expected = reference_vfpt(model.backbone, model.method.prompts, images, options["fourier_share"],
                                  options.get("fourier_dims", "all"), options.get("fourier_location", "prepend"),
                                  options.get("fourier_first_layer", True))
        assert torch.allclose(model(images), expected, atol=1e-4)
        deep = ivpt.create_model(clone(vit), "vpt-deep", 7, prompt_length=5).eval()
        deep.load_state_dict(model.state_dict())
        assert not torch.allclose(deep(images), expected, atol=1e-3)  # the transform changes the logits


def test_vfpt_without_fourier_share_is_vpt_deep_exactly(images):
    vit = make_vit()
    vfpt = randomize(ivpt.create_model(clone(vit), "vfpt", 7, prompt_length=4, fourier_share=0.0)).eval()
    deep = ivpt.create_model(clone(vit), "vpt-deep", 7, prompt_length=4).eval()
    deep.load_state_dict(vfpt.state_dict())
    with torch.no_grad():
        assert torch.equal(vfpt(images), deep(images))
    vfpt.train(), deep.train()
    vfpt(images).sum().backward(), deep(images).sum().backward()
    assert torch.equal(vfpt.method.prompts.grad, deep.method.prompts.grad)


def test_vfpt_trains_its_prompts_and_round_trips(tmp_path, images):
    vit = make_vit()
    model = ivpt.create_model(clone(vit), "vfpt", 7, prompt_length=4, prompt_dropout=0.1)
    assert set(model.tuned_parameters()) == {"method.prompts", "backbone.head.weight", "backbone.head.bias"}
    model.train()
    model(images).sum().backward()
    assert model.method.prompts.grad.abs().sum(dim=(1, 2)).gt(0).all()  # every block's prompts learn
    randomize(model)
    model.eval().save_adapter(tmp_path / "a")
    assert "vfpt" in (tmp_path / "a" / "adapter_config.json").read_text()
    loaded = ivpt.load_adapter(tmp_path / "a", backbone=clone(vit)).eval()
    assert loaded.method.config == model.method.config
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_vfpt_model_card_is_tagged_as_prompt_tuning():
    from ivpt.card import model_card

    assert "visual-prompt-tuning" in model_card({"method": "vfpt", "backbone": {"name": "vit_base_patch16_224"}})


def test_vfpt_options_are_checked():
    with pytest.raises(ivpt.OptionError, match=r"fourier_share.*floor\(0.5\) = 0 Fourier prompts"):
        ivpt.create_model(make_vit(), "vfpt", 7, prompt_length=1, fourier_share=0.5)
    with pytest.raises(ivpt.OptionError, match="'fourier_dims': got 'both'"):
        ivpt.create_model(make_vit(), "vfpt", 7, fourier_dims="both")
    with pytest.raises(ivpt.OptionError, match="'fourier_location': got 'random'"):
        ivpt.create_model(make_vit(), "vfpt", 7, fourier_location="random")
    with pytest.raises(ivpt.OptionError, match=r"'fourier_share': got 1.5"):
        ivpt.create_model(make_vit(), "vfpt", 7, fourier_share=1.5)


def test_vfpt_vit_b16_parameter_count_from_ivpt_params(capsys):
    from ivpt.cli import main

    assert main(["params", "--backbone", "vit_base_patch16_224", "--method", "vfpt", "--prompt-length", "10"]) == 0
    out = capsys.readouterr().out
    assert f"{12 * 10 * 768:,}" in out or str(12 * 10 * 768) in out  # N p d, as VPT-deep: the DFT has no parameters


# -- self-supervised backbones: checkpoint conversion and recipes ------------------------------------------
def moco_v3_checkpoint(path, vit, linear_probe: bool):
    """A checkpoint laid out as facebookresearch/moco-v3 writes it, random tensors in it."""
    encoder = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    if linear_probe:  # main_lincls.py: the ViT under DDP's module., its head the ImageNet classifier
        state = {f"module.{k}": v for k, v in encoder.items()}
        state.update({"module.head.weight": torch.randn(1000, 32), "module.head.bias": torch.zeros(1000)})
    else:  # main_moco.py: base and momentum encoders (each with its projector as head) and the predictor
        state = {}
        for name in ("base_encoder", "momentum_encoder"):
            state.update({f"module.{name}.{k}": v + (name == "momentum_encoder") for k, v in encoder.items()})
            state[f"module.{name}.head.0.weight"] = torch.randn(64, 32)
        state["module.predictor.0.weight"] = torch.randn(64, 64)
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, path)


@pytest.mark.parametrize("linear_probe", [False, True])
def test_moco_v3_checkpoint_converts_to_timm_names(tmp_path, linear_probe, images):
    from ivpt.cli import main

    source = make_vit(seed=3)
    moco_v3_checkpoint(tmp_path / "vit-b-300ep.pth.tar", source, linear_probe)
    out = tmp_path / "moco.safetensors"
    assert main(["convert-weights", "moco-v3", str(tmp_path / "vit-b-300ep.pth.tar"), str(out)]) == 0
    model = ivpt.create_model(make_vit(seed=9), "vpt-deep", 7, prompt_length=2, weights=str(out))
    loaded = model.backbone.state_dict()
    for name, tensor in source.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(loaded[name], tensor), name  # the base encoder, never the momentum one


def test_mae_checkpoint_converts_for_average_pooling(tmp_path, images):
    from ivpt.convert import convert_weights

    source = make_vit(seed=4)  # class-token pooling: its final norm is the pretrained `norm`, as MAE's checkpoint
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    torch.save({"model": {**state, "mask_token": torch.zeros(1, 1, 32)}}, tmp_path / "mae_pretrain_vit_base.pth")
    vpt_file = convert_weights("mae", tmp_path / "mae_pretrain_vit_base.pth", tmp_path / "vpt.safetensors")
    gate_file = convert_weights("mae", tmp_path / "mae_pretrain_vit_base.pth", tmp_path / "gate.safetensors",
                                norm_after_pool=True)
    vpt_reading = ivpt.create_model(make_vit(**AVG), "vpt-deep", 7, prompt_length=2, weights=str(vpt_file),
                                    pool_prompts=True)
    gate_reading = ivpt.create_model(make_vit(**AVG), "gatevpt", 7, prompt_length=2, weights=str(gate_file),
                                     pool_prompts=True)
    assert torch.equal(vpt_reading.backbone.fc_norm.weight, torch.ones(32))  # VPT's fresh fc_norm
    assert torch.equal(vpt_reading.backbone.fc_norm.bias, torch.zeros(32))
    assert torch.equal(gate_reading.backbone.fc_norm.weight, source.norm.weight)  # GateVPT: the checkpoint's norm
    assert torch.equal(gate_reading.backbone.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_conversion_refuses_what_it_cannot_read(tmp_path):
    from ivpt.backbone import BackboneError
    from ivpt.convert import convert_weights

    torch.save({"model": {"encoder.layer.0.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(BackboneError, match="does not look like a MoCo v3 ViT checkpoint: no 'patch_embed"):
        convert_weights("moco-v3", tmp_path / "other.pth", tmp_path / "o.safetensors")
    with pytest.raises(BackboneError, match="expected a .safetensors"):
        convert_weights("mae", tmp_path / "other.pth", tmp_path / "o.pth")
    with pytest.raises(BackboneError, match="MAE checkpoints only"):
        convert_weights("moco-v3", tmp_path / "other.pth", tmp_path / "o.safetensors", norm_after_pool=True)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        convert_weights("mae", tmp_path / "missing.pth", tmp_path / "o.safetensors")


@pytest.mark.parametrize("layer,overrides,expected", [
    ("configs/backbones/mae-vitb16.yaml", ["method=vpt-deep", "method_options.pool_prompts=true"],
     {"backbone": "vit_base_patch16_224.mae", "backbone_options": {"global_pool": "avg"}}),
    ("configs/backbones/mocov3-vitb16.yaml", ["method=gatevpt"], {"backbone": "vit_base_patch16_224"}),
    ("configs/protocols/vfpt.yaml", [], {"method": "vfpt", "batch_size": 64}),
])
def test_family_recipes_layer_over_a_task_recipe(layer, overrides, expected):
    from pathlib import Path

    from ivpt.engine.config import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config([root / "configs/vtab/dtd.yaml", root / layer], overrides)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.method_options["prompt_length"] == 10 and cfg.data["task"] == "dtd"  # the task's own settings kept
    with torch.device("meta"):  # the architecture the recipe asks for, with its options, builds (no weights)
        ivpt.create_model(cfg.backbone.split(".")[0], cfg.method, 47, timm_kwargs={
            k: v for k, v in cfg.backbone_options.items() if k != "pretrained_cfg_overlay"}, **cfg.method_options)
