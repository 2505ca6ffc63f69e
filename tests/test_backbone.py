"""Backbones: timm names, local weight files in every supported format, and clear refusals."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import ParallelScalingBlock

import ivpt
from ivpt.backbone import BackboneError
from conftest import make_vit

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, qkv_bias=True)


def export_google_npz(vit, path):
    """Write a timm ViT in the layout of Google's original ViT .npz checkpoints (as VPT uses)."""
    t = lambda x: x.detach().numpy()
    d, h = vit.embed_dim, vit.blocks[0].attn.num_heads
    hd = d // h
    w = {
        "embedding/kernel": t(vit.patch_embed.proj.weight).transpose(2, 3, 1, 0),
        "embedding/bias": t(vit.patch_embed.proj.bias),
        "cls": t(vit.cls_token),
        "Transformer/posembed_input/pos_embedding": t(vit.pos_embed),
        "Transformer/encoder_norm/scale": t(vit.norm.weight),
        "Transformer/encoder_norm/bias": t(vit.norm.bias),
        "head/kernel": t(vit.head.weight).T,
        "head/bias": t(vit.head.bias),
    }
    for i, block in enumerate(vit.blocks):
        pre = f"Transformer/encoderblock_{i}/"
        mha = pre + "MultiHeadDotProductAttention_1/"
        w[pre + "LayerNorm_0/scale"], w[pre + "LayerNorm_0/bias"] = t(block.norm1.weight), t(block.norm1.bias)
        w[pre + "LayerNorm_2/scale"], w[pre + "LayerNorm_2/bias"] = t(block.norm2.weight), t(block.norm2.bias)
        qkv_w, qkv_b = t(block.attn.qkv.weight), t(block.attn.qkv.bias)
        for j, name in enumerate(("query", "key", "value")):
            w[mha + f"{name}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, h, hd)
            w[mha + f"{name}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(h, hd)
        w[mha + "out/kernel"] = t(block.attn.proj.weight).reshape(d, h, hd).transpose(1, 2, 0)
        w[mha + "out/bias"] = t(block.attn.proj.bias)
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            w[pre + f"MlpBlock_3/Dense_{r}/kernel"] = t(fc.weight).T
            w[pre + f"MlpBlock_3/Dense_{r}/bias"] = t(fc.bias)
    np.savez(path, **w)


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "bin", "npz", "pth-nested"])
def test_local_weights_load_into_named_backbone(tmp_path, fmt):
    source = make_vit(**{k: v for k, v in TINY.items()}, num_classes=7)
    path = tmp_path / f"weights.{fmt.split('-')[0]}"
    state = source.state_dict()
    if fmt == "safetensors":
        save_file(state, str(path))
    elif fmt == "npz":
        export_google_npz(source, path)
    elif fmt == "pth-nested":
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:
        torch.save(state, path)
    model = ivpt.create_model("vit_tiny_patch16_224", "linear", 7, weights=path,
                              timm_kwargs=dict(TINY, embed_dim=32, num_heads=4)).eval()
    loaded = model.backbone.state_dict()
    for name, param in source.named_parameters():
        if not name.startswith("head."):
            assert torch.allclose(loaded[name], param, atol=1e-6), name
    # the pretraining head is never carried into a new task, even when the class count matches
    assert not torch.equal(loaded["head.weight"], source.head.weight)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(images), source.forward_features(images), atol=1e-5)


def test_weights_for_another_image_size_are_resampled(tmp_path):
    source = make_vit(num_classes=7)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    model = ivpt.create_model("vit_tiny_patch16_224", "vpt-deep", 5, weights=tmp_path / "w.safetensors",
                              timm_kwargs=dict(TINY, img_size=48))
    assert model.backbone.pos_embed.shape == (1, 1 + 36, 32)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)
    # the head for 7 classes was not forced onto the 5-class model
    assert model.head.weight.shape == (5, 32)


def test_weight_file_errors_name_the_file(tmp_path):
    kwargs = dict(timm_kwargs=TINY)
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        ivpt.create_model("vit_tiny_patch16_224", "linear", 7, weights=tmp_path / "nothere.safetensors", **kwargs)
    wrong = make_vit(embed_dim=48, num_heads=4)
    save_file(wrong.state_dict(), str(tmp_path / "wide.safetensors"))
    with pytest.raises(BackboneError, match="wide.safetensors.*does not fit"):
        ivpt.create_model("vit_tiny_patch16_224", "linear", 7, weights=tmp_path / "wide.safetensors", **kwargs)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="junk.pth"):
        ivpt.create_model("vit_tiny_patch16_224", "linear", 7, weights=tmp_path / "junk.pth", **kwargs)
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(BackboneError, match="unknown format"):
        ivpt.create_model("vit_tiny_patch16_224", "linear", 7, weights=tmp_path / "w.h5", **kwargs)


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_in_a_checkpoint_is_never_executed(tmp_path, capsys):
    torch.save({"state_dict": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(BackboneError, match="evil.pth") as refused:
        ivpt.create_model("vit_tiny_patch16_224", "linear", 7, weights=tmp_path / "evil.pth", timm_kwargs=TINY)
    assert "pickled code ran" not in capsys.readouterr().out
    message = str(refused.value)
    assert "it pickles the global" in message and "print" in message and "safetensors" in message
    assert "weights_only" not in message  # never the advice to switch the protection off


def test_offline_pretrained_says_how_to_pass_local_weights(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, as offline
    with pytest.raises(BackboneError, match="weights="):
        ivpt.create_model("vit_tiny_patch16_224", "linear", 7, pretrained=True, timm_kwargs=TINY)


def test_unknown_and_unsupported_backbones_are_refused():
    with pytest.raises(BackboneError, match="similar timm models: vit_tiny_patch16_224"):
        ivpt.create_model("vit_tiny_patch16_22", "ivpt", 7)
    with pytest.raises(BackboneError, match="VisionTransformer"):
        ivpt.create_model(torch.nn.Linear(3, 3), "ivpt", 7)
    with pytest.raises(BackboneError, match="ParallelScalingBlock"):
        ivpt.create_model(make_vit(block_fn=ParallelScalingBlock), "vpt-deep", 7)
    from timm.models.vision_transformer import ResPostBlock

    with pytest.raises(BackboneError, match="ResPostBlock.*pre-norm"):  # DA's standardised mixing assumes pre-norm
        ivpt.create_model(make_vit(block_fn=ResPostBlock), "ivpt", 7)


def test_misspelt_timm_option_is_a_backbone_error_naming_it():
    with pytest.raises(BackboneError, match="refused its options.*'embd_dim'"):
        ivpt.create_model("vit_tiny_patch16_224", "lora", 7, timm_kwargs={"embd_dim": 32})


@pytest.mark.parametrize("method,options,match", [
    ("vpt-dep", {}, "unknown method 'vpt-dep'"),
    ("ivpt", {"prompt_lenght": 3}, "unknown option 'prompt_lenght'.*prompt_length"),
    ("ivpt", {"da": "gated"}, "'da'.*'gate', 'channel', 'static', 'sum'"),
    ("ivpt", {"da_space": "std"}, "'da_space'"),
    ("ivpt", {"ar_source": "patch"}, "'ar_source'"),
    ("ivpt", {"ar_mix": "max"}, "'ar_mix'"),
    ("ivpt", {"ar_ratio": 0.0}, "'ar_ratio'.*\\(0.0, 1.0\\]"),
    ("ivpt", {"ar_ratio": 1.5}, "'ar_ratio'"),
    ("ivpt", {"prompt_length": 0}, "'prompt_length'"),
    ("ivpt", {"prompt_length": 2.5}, "'prompt_length'.*integer"),
    ("ivpt", {"cdc": "yes"}, "'cdc'.*True or False"),
    ("ivpt", {"da_bias_init": float("nan")}, "'da_bias_init'.*finite"),
    ("ivpt", {"layers": "all"}, "'layers'"),
    ("vpt-deep", {"prompt_dropout": 1.0}, "'prompt_dropout'"),
    ("vpt-deep", {"prompt_length": -1}, "'prompt_length'"),
    ("linear", {"prompt_length": 10}, "unknown option 'prompt_length' for method 'linear'; allowed options: none"),
])
def test_invalid_options_name_the_option(method, options, match):
    with pytest.raises(ivpt.OptionError, match=match):
        ivpt.create_model(make_vit(), method, 7, **options)


def test_num_classes_and_class_names_are_checked():
    with pytest.raises(ivpt.OptionError, match="num_classes"):
        ivpt.create_model(make_vit(), "linear", 0)
    with pytest.raises(ivpt.OptionError, match="class_names"):
        ivpt.create_model(make_vit(), "linear", 3, class_names=["a", "b"])
