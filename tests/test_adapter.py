"""Adapters: tuned tensors only, exact round trips, and precise refusals."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import ivpt
from ivpt.adapter import AdapterError
from conftest import clone, make_vit, rewrite_config

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, qkv_bias=True)


def perturb_tuned(model):
    with torch.no_grad():
        for p in model.tuned_parameters().values():
            p.add_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("method,options", [
    ("linear", {}), ("full", {}), ("vpt-shallow", {"prompt_length": 3}), ("vpt-deep", {"prompt_length": 3}),
    ("ivpt", {"prompt_length": 3, "da": "channel", "ar_mix": "attn", "layers": [0, 2]}),
    ("ivpt-static", {"prompt_length": 3}), ("gatevpt", {"prompt_length": 3, "gate_init": 1.0}),
    ("vfpt", {"prompt_length": 3, "fourier_share": 0.7, "fourier_location": "append"}),
    ("e2vpt", {"prompt_length": 3, "kv_length": 2, "kv_shared": False, "prune": True}),
    ("e2vpt", {"prompt_length": 3, "kv_length": 2, "pruned_tokens": [1], "pruned_pieces": [[0], [], [1, 2]],
               "mask_pieces": 4}),
])
def test_round_trip_gives_identical_outputs(tmp_path, method, options):
    vit = make_vit()
    model = ivpt.create_model(clone(vit), method, 7, class_names=list("abcdefg"), **options).eval()
    perturb_tuned(model)
    model.save_adapter(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["README.md", "adapter.safetensors", "adapter_config.json"]  # card; no temporaries left behind
    stored = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert set(stored) == set(model.tuned_parameters())
    loaded = ivpt.load_adapter(tmp_path / "adapter", backbone=clone(vit)).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["method"] == method and config["num_classes"] == 7 and config["class_names"] == list("abcdefg")
    assert config["ivpt_version"] == ivpt.__version__ and config["image_size"] == [32, 32]
    assert loaded.class_names == list("abcdefg")


def test_round_trip_by_name_with_local_weights(tmp_path):
    source = make_vit()
    save_file(source.state_dict(), str(tmp_path / "backbone.safetensors"))
    model = ivpt.create_model("vit_tiny_patch16_224", "ivpt", 7, weights=tmp_path / "backbone.safetensors",
                              timm_kwargs=TINY, prompt_length=2).eval()
    perturb_tuned(model)
    model.save_adapter(tmp_path / "a")
    loaded = ivpt.load_adapter(tmp_path / "a", weights=tmp_path / "backbone.safetensors").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    # by default the recorded weights file is used again
    with torch.no_grad():
        assert torch.equal(ivpt.load_adapter(tmp_path / "a").eval()(images), model(images))
    # other weights for the same architecture are caught, with a hint
    save_file(make_vit(seed=3).state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(AdapterError, match="weights differ .*backbone.safetensors.*weights=PATH"):
        ivpt.load_adapter(tmp_path / "a", weights=tmp_path / "other.safetensors")
    (tmp_path / "backbone.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(AdapterError, match="backbone.safetensors, which is not there now"):
        ivpt.load_adapter(tmp_path / "a")
    # an adapter saved by name loads onto an equivalent built module (name without tag matches)
    import timm

    built = timm.create_model("vit_tiny_patch16_224", **TINY)
    from ivpt.backbone import load_backbone_weights

    load_backbone_weights(built, tmp_path / "moved.safetensors")
    with torch.no_grad():
        assert torch.equal(ivpt.load_adapter(tmp_path / "a", backbone=built).eval()(images), model(images))


def save(tmp_path, **options):
    model = ivpt.create_model(make_vit(), "ivpt", 7, prompt_length=2, **options)
    model.save_adapter(tmp_path / "a")
    return tmp_path / "a"


def test_mismatched_backbone_says_what_differs(tmp_path):
    directory = save(tmp_path)
    with pytest.raises(AdapterError, match="depth: adapter 4, backbone 6"):
        ivpt.load_adapter(directory, backbone=make_vit(depth=6))
    with pytest.raises(AdapterError, match="embed_dim: adapter 32, backbone 64"):
        ivpt.load_adapter(directory, backbone=make_vit(embed_dim=64))
    with pytest.raises(AdapterError, match="patch_size"):
        ivpt.load_adapter(directory, backbone=make_vit(patch_size=4))
    with pytest.raises(AdapterError, match="weights"):
        ivpt.load_adapter(directory, backbone=make_vit(seed=1))
    assert ivpt.load_adapter(directory, backbone=make_vit(seed=1), check_weights=False) is not None


def test_other_backbone_weights_error_names_the_adapter_folder(tmp_path):
    directory = save(tmp_path)
    with pytest.raises(AdapterError, match=f"adapter {directory} does not fit this backbone: weights"):
        ivpt.load_adapter(directory, backbone=make_vit(seed=1))


def test_truncated_or_altered_tensor_file_is_refused(tmp_path):
    directory = save(tmp_path)
    tensors = directory / "adapter.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="truncated, altered"):
        ivpt.load_adapter(directory, backbone=make_vit())
    altered = bytearray(data)
    altered[-5] ^= 0xFF
    tensors.write_bytes(bytes(altered))
    with pytest.raises(AdapterError, match="adapter.safetensors does not match its config"):
        ivpt.load_adapter(directory, backbone=make_vit())


def test_wrong_config_is_refused(tmp_path):
    directory = save(tmp_path)
    rewrite_config(directory, lambda c: c.__setitem__("method", "vpt-deep"))
    with pytest.raises(AdapterError, match="adapter.safetensors: unknown option 'ar' for method 'vpt-deep'"):
        ivpt.load_adapter(directory, backbone=make_vit())
    rewrite_config(directory, lambda c: c.__setitem__("options", {"prompt_length": 2}))
    with pytest.raises(AdapterError, match="do not fit method 'vpt-deep'.*unexpected"):
        ivpt.load_adapter(directory, backbone=make_vit())
    directory = save(tmp_path)
    rewrite_config(directory, lambda c: c["options"].__setitem__("da", "wide"))
    with pytest.raises(AdapterError, match="adapter.safetensors: option 'da'"):
        ivpt.load_adapter(directory, backbone=make_vit())
    directory = save(tmp_path)
    rewrite_config(directory, lambda c: c["options"].__setitem__("prompt_length", 3))
    with pytest.raises(AdapterError, match="wrong shape"):
        ivpt.load_adapter(directory, backbone=make_vit())
    directory = save(tmp_path)
    rewrite_config(directory, lambda c: c.pop("method"))
    with pytest.raises(AdapterError, match="missing field.*method"):
        ivpt.load_adapter(directory, backbone=make_vit())
    rewrite_config(directory, "{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        ivpt.load_adapter(directory, backbone=make_vit())
    with pytest.raises(FileNotFoundError, match="adapter.safetensors and adapter_config.json"):
        ivpt.load_adapter(tmp_path / "missing", backbone=make_vit())
    directory = save(tmp_path)
    rewrite_config(directory, lambda c: c.update(task="segmentation", num_classes=5))  # no decoder, no crop size
    with pytest.raises(AdapterError, match="missing field\\(s\\) decoder, crop_size"):
        ivpt.load_adapter(directory, backbone=make_vit())


def test_a_tensor_file_replaced_by_another_tool_is_refused_though_names_and_shapes_fit(tmp_path):
    """Format 2 keeps its config inside the tensor file; a plain safetensors file of another adapter's tensors
    under the old JSON would otherwise load, unchecked, as this adapter."""
    first, second = save(tmp_path / "a"), save(tmp_path / "b")
    save_file(load_file(str(second / "adapter.safetensors")), str(first / "adapter.safetensors"))  # no metadata
    with pytest.raises(AdapterError, match="adapter.safetensors carries no ivpt config, though .*adapter_config.json "
                                           "records format_version 2"):
        ivpt.load_adapter(first, backbone=make_vit())


def test_failed_save_keeps_previous_adapter(tmp_path, monkeypatch):
    directory = save(tmp_path, da="static")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    model = ivpt.create_model(make_vit(), "ivpt", 7, prompt_length=2)
    import ivpt.adapter_format as adapter_module

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapter_module, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        model.save_adapter(directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert ivpt.load_adapter(directory, backbone=make_vit()).method.config.da == "static"


def test_predict_and_eval_never_write_their_output_over_the_adapter_they_read(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from ivpt import cli

    directory = tmp_path / "a"
    ivpt.create_model("vit_mini_patch4_32.ivpt_cifar10", "linear", 3).save_adapter(directory)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    for name in ("adapter.safetensors", "adapter_config.json", "README.md"):
        assert cli.main(["predict", str(directory), str(tmp_path / "x.png"), "--output", str(directory / name)]) == 2
        assert f"--output {directory / name} is {directory / name}, an input" in capsys.readouterr().err
        assert cli.main(["eval", str(directory), "--data", '{"kind": "suite", "task": "dtd10"}',
                         "--output", str(directory / name)]) == 2
        assert f"--output {directory / name} is {directory / name}, an input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    for flag in (["--top-k", "0"], ["--top-k", "-1"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit):
            cli.main(["predict", str(directory), str(tmp_path / "x.png"), *flag])
        assert "expected a whole number of at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ivpt", "bitfit"])
def test_backbone_weights_that_differ_only_inside_the_blocks_are_caught(tmp_path, method):
    """The adapter records a digest of every frozen backbone tensor: weights with the same patch projection
    and position embedding but other blocks (MoCo v3 keeps those two fixed) are refused. BitFit's biases,
    tuned in place, are left out of it, so its own adapter reloads."""
    options = {"prompt_length": 2} if method == "ivpt" else {}
    model = ivpt.create_model(make_vit(), method, 7, **options).eval()
    perturb_tuned(model)
    model.save_adapter(tmp_path / "a")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ivpt.load_adapter(tmp_path / "a", backbone=make_vit()).eval()(images), model(images))
    def inner():
        vit = make_vit()
        with torch.no_grad():
            vit.blocks[2].mlp.fc1.weight.add_(0.01)  # patch embedding and position embedding unchanged
        return vit
    with pytest.raises(AdapterError, match="weights differ"):
        ivpt.load_adapter(tmp_path / "a", backbone=inner())
    # an adapter saved before the digest existed: checked by its patch and position embedding, as then
    rewrite_config(tmp_path / "a", lambda c: c["backbone"].pop("frozen_weights_sha256"))
    assert ivpt.load_adapter(tmp_path / "a", backbone=inner()) is not None
    with pytest.raises(AdapterError, match="weights differ"):
        ivpt.load_adapter(tmp_path / "a", backbone=make_vit(seed=1))


def test_a_failed_load_onto_a_module_leaves_it_free_for_the_retry_the_error_suggests(tmp_path):
    model = ivpt.create_model(make_vit(), "lora", 7)
    model.save_adapter(tmp_path / "a")
    other = make_vit(seed=1)
    with pytest.raises(AdapterError, match="check_weights=False"):
        ivpt.load_adapter(tmp_path / "a", backbone=other)
    assert not any(m._forward_hooks for m in other.modules())  # LoRA's hooks taken out again
    assert ivpt.load_adapter(tmp_path / "a", backbone=other, check_weights=False).backbone is other
