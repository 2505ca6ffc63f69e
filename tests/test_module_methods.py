"""LoRA, bottleneck adapters (sequential, AdaptFormer), SSF and BitFit: the methods that act inside the blocks."""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_vit, randomize, run_printed_call
from torch import nn

import ivpt
from ivpt.methods import METHODS, AttachError
from ivpt.options import OptionError

MODULE_METHODS = ["lora", "adapter", "adaptformer", "ssf", "bitfit"]


def build(method, vit=None, **options):
    return ivpt.create_model(vit if vit is not None else make_vit(), method, 7, **options).eval()


@pytest.fixture
def images():
    torch.manual_seed(123)
    return torch.randn(3, 3, 32, 32)


# -- "does nothing" settings --------------------------------------------------------------------
@pytest.mark.parametrize("method,options", [("lora", {}), ("lora", {"lora_targets": ["qkv", "proj", "fc1", "fc2"]}),
                                            ("adapter", {}), ("adaptformer", {}), ("ssf", {"ssf_init_std": 0.0}),
                                            ("bitfit", {})])
def test_starting_point_is_the_frozen_backbone_exactly(method, options, images):
    from ivpt.methods.modules import strip_hooks

    model = build(method, **options)
    plain = copy.deepcopy(model.backbone)  # the same weights and head, without the method
    strip_hooks(plain, getattr(model.method, "hook_ids", set()))
    assert not any(m._forward_hooks for m in plain.modules())
    assert torch.equal(model(images), plain(images))


def test_ssf_default_init_moves_away_from_the_backbone(images):
    from ivpt.methods.modules import strip_hooks

    model = build("ssf")
    plain = copy.deepcopy(model.backbone)
    strip_hooks(plain, model.method.hook_ids)
    assert not torch.allclose(model(images), plain(images))


# -- against independent reimplementations written here ------------------------------------------
def manual_forward(vit, images, attn_out=None, qkv_out=None, mlp_out=None, site=None):
    """timm's ViT forward spelled out from its weights, with optional changes at named places."""
    site = site or (lambda name, y: y)
    x = F.conv2d(images, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=vit.patch_embed.proj.stride)
    x = site("patch_embed.proj", x).flatten(2).transpose(1, 2)
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + vit.pos_embed
    for i, blk in enumerate(vit.blocks):
        h = site(f"blocks.{i}.norm1", F.layer_norm(x, x.shape[-1:], blk.norm1.weight, blk.norm1.bias, blk.norm1.eps))
        qkv = site(f"blocks.{i}.attn.qkv", F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias))
        if qkv_out is not None:
            qkv = qkv_out(i, h, qkv)
        b, t, _ = qkv.shape
        q, k, v = qkv.reshape(b, t, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * blk.attn.scale).softmax(-1) @ v
        a = a.transpose(1, 2).reshape(b, t, -1)
        a = site(f"blocks.{i}.attn.proj", F.linear(a, blk.attn.proj.weight, blk.attn.proj.bias))
        x = x + a
        h = site(f"blocks.{i}.norm2", F.layer_norm(x, x.shape[-1:], blk.norm2.weight, blk.norm2.bias, blk.norm2.eps))
        y = site(f"blocks.{i}.mlp.fc1", F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias))
        y = site(f"blocks.{i}.mlp.fc2", F.linear(F.gelu(y), blk.mlp.fc2.weight, blk.mlp.fc2.bias))
        if mlp_out is not None:
            y = mlp_out(i, h, y)
        x = x + y
    x = site("norm", F.layer_norm(x, x.shape[-1:], vit.norm.weight, vit.norm.bias, vit.norm.eps))
    return F.linear(x[:, 0], vit.head.weight, vit.head.bias)


def test_manual_forward_is_timms(images):
    vit = make_vit()
    assert torch.allclose(manual_forward(vit, images), vit(images), atol=1e-5)


def test_lora_on_q_and_v_against_the_formula(images):
    model = randomize(build("lora", lora_rank=3, lora_alpha=6.0))
    vit = model.backbone
    updates = iter(model.method.updates)

    def qkv_out(i, h, qkv):
        u = next(updates)
        a, b = u.lora_a, u.lora_b  # (2, r, d), (2, d, r): q then v
        dq, dv = (2.0 * h @ a[j].T @ b[j].T for j in (0, 1))
        return qkv + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)

    assert torch.allclose(model(images), manual_forward(vit, images, qkv_out=qkv_out), atol=1e-5)


def test_adapters_against_the_formula(images):
    for method, parallel, s in (("adapter", False, 1.0), ("adaptformer", True, 0.1)):
        model = randomize(build(method, bottleneck=5))
        vit = model.backbone

        def mlp_out(i, h, y, model=model, parallel=parallel, s=s):
            ad = model.method.adapters[i]
            source = h if parallel else y
            return y + s * F.linear(F.relu(F.linear(source, ad.down.weight, ad.down.bias)), ad.up.weight, ad.up.bias)

        assert torch.allclose(model(images), manual_forward(vit, images, mlp_out=mlp_out), atol=1e-5), method


def test_ssf_against_the_formula(images):
    model = randomize(build("ssf"))
    vit = model.backbone
    names = ["patch_embed.proj"] + [f"blocks.{i}.{s}" for i in range(len(vit.blocks))
                                    for s in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")] + ["norm"]
    params = dict(zip(names, model.method.scale_shifts))
    assert len(params) == len(model.method.scale_shifts)

    def site(name, y):
        ss = params[name]
        if y.dim() == 4:
            return y * ss.scale[:, None, None] + ss.shift[:, None, None]
        return y * ss.scale + ss.shift

    assert torch.allclose(model(images), manual_forward(vit, images, site=site), atol=1e-5)


def test_ssf_under_average_pooling_scales_the_final_fc_norm(images):
    """timm's avg-pooled ViT has norm = Identity and fc_norm = LayerNorm: SSF's final site moves to fc_norm,
    so it keeps SSF's count and still folds into the weights."""
    vit = make_vit(global_pool="avg")
    assert isinstance(vit.norm, torch.nn.Identity) and isinstance(vit.fc_norm, torch.nn.LayerNorm)
    model = randomize(build("ssf", vit))
    assert model.method._sites[-1] is model.backbone.fc_norm
    token_pooled = build("ssf")
    assert (sum(p.numel() for p in model.method.scale_shifts.parameters())
            == sum(p.numel() for p in token_pooled.method.scale_shifts.parameters()))
    expected = model(images)
    ss = model.method.scale_shifts[-1]
    with torch.no_grad():  # the fc_norm site does act: resetting it changes the logits
        saved = ss.scale.clone(), ss.shift.clone()
        ss.scale.fill_(1.0), ss.shift.zero_()
        assert not torch.allclose(model(images), expected, atol=1e-4)
        ss.scale.copy_(saved[0]), ss.shift.copy_(saved[1])
    assert torch.allclose(model.merge()(images), expected, atol=1e-5)
    from ivpt.methods.modules import strip_hooks

    start = build("ssf", make_vit(global_pool="avg"), ssf_init_std=0.0)
    plain = copy.deepcopy(start.backbone)  # the same weights and head, without the method
    strip_hooks(plain, start.method.hook_ids)
    assert torch.equal(start(images), plain(images))


def test_bitfit_tunes_exactly_the_biases():
    model = build("bitfit")
    vit = model.backbone
    expected = {f"backbone.{n}" for n, _ in vit.named_parameters() if n.endswith(".bias")} | {"backbone.head.weight"}
    assert set(model.tuned_parameters()) == expected  # every bias, and the head as in every method
    assert all(p.requires_grad == (f"backbone.{n}" in expected) for n, p in vit.named_parameters())


def test_lora_equals_peft_on_the_same_timm_model(images):
    peft = pytest.importorskip("peft")
    vit = make_vit()
    ours = randomize(build("lora", copy.deepcopy(vit), lora_targets=["qkv", "fc1"], lora_rank=4, lora_alpha=8.0))
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], lora_dropout=0.0), copy.deepcopy(vit))
    names = [f"blocks.{i}.{m}" for i in range(len(vit.blocks)) for m in ("attn.qkv", "mlp.fc1")]
    with torch.no_grad():
        for name, update in zip(names, ours.method.updates):
            layer = theirs.get_submodule(name)
            layer.lora_A["default"].weight.copy_(update.lora_a[0])
            layer.lora_B["default"].weight.copy_(update.lora_b[0])
        ours.backbone.head.load_state_dict(vit.head.state_dict())
    theirs.eval()
    assert torch.allclose(ours(images), theirs(images), atol=1e-5)


# -- training, saving, merging ---------------------------------------------------------------------
@pytest.mark.parametrize("method", MODULE_METHODS)
def test_only_the_methods_tensors_get_gradients(method, images):
    model = randomize(build(method)).train()
    assert not model.backbone.training  # the frozen backbone stays in eval mode
    model(images).sum().backward()
    tuned = set(model.tuned_parameters())
    for name, p in model.named_parameters():
        if name in tuned:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


@pytest.mark.parametrize("method", MODULE_METHODS)
def test_save_reload_and_merge_give_equal_logits(method, images, tmp_path):
    model = randomize(build(method, make_vit()))
    expected = model(images)
    model.save_adapter(tmp_path / "adapter")
    again = ivpt.load_adapter(tmp_path / "adapter", make_vit())
    assert torch.equal(again(images), expected)
    if METHODS[method].mergeable:
        merged = model.merge()
        assert type(merged) is type(model.backbone)
        assert not any(m._forward_hooks for m in merged.modules())  # a plain timm model
        assert torch.allclose(merged(images), expected, atol=1e-5)
        assert torch.equal(model(images), expected)  # merging copies: the tuned model is unchanged
    else:
        with pytest.raises(ValueError, match="cannot be merged"):
            model.merge()


@pytest.mark.parametrize("method", ["vpt-deep", "ivpt", "gatevpt"])
def test_prompt_methods_say_they_cannot_be_merged(method):
    with pytest.raises(ValueError, match="prompt tokens"):
        build(method, prompt_length=2).merge()


def test_deepcopy_carries_the_hooks_onto_the_copy(images):
    from ivpt.methods.modules import strip_hooks

    model = randomize(build("lora"))
    expected = model(images)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.method.parameters():
            p.zero_()  # the copy's LoRA now does nothing; the original's must still act
    plain = copy.deepcopy(twin.backbone)
    strip_hooks(plain, twin.method.hook_ids)
    assert torch.equal(twin(images), plain(images))
    assert torch.equal(model(images), expected) and not torch.allclose(expected, twin(images))


def test_export_of_ivpts_own_architecture_loads_without_ivpt(tmp_path, capsys):
    """The printed line builds the shipped architecture with timm alone: run in a fresh interpreter that never
    imports ivpt, it gives the tuned model's logits."""
    import subprocess
    import sys

    from ivpt.cli import main

    model = randomize(ivpt.create_model("vit_mini_patch4_32.ivpt_cifar10", "bitfit", 3), scale=0.05).eval()
    model.save_adapter(tmp_path / "adapter")
    out = tmp_path / "merged.safetensors"
    assert main(["export", str(tmp_path / "adapter"), "--merged", str(out)]) == 0
    said = capsys.readouterr().out
    assert "import ivpt" not in said
    assert "preprocess as it was tuned: 32 px" in said
    images = torch.randn(2, 3, 32, 32)
    torch.save(images, tmp_path / "images.pt")
    line = next(line for line in said.splitlines() if line.startswith("load it with: ")).removeprefix("load it with: ")
    script = (f"{line}\nimport sys, torch\nassert not any(m.split('.')[0] == 'ivpt' for m in sys.modules)\n"
              f"torch.save(model.eval()(torch.load({str(tmp_path / 'images.pt')!r})).detach(), "
              f"{str(tmp_path / 'logits.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path,
                   env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    with torch.no_grad():
        assert torch.allclose(torch.load(tmp_path / "logits.pt"), model(images), atol=1e-4)


def test_export_merged_loads_in_plain_timm(tmp_path, images, capsys):
    """ivpt export --merged writes a checkpoint that timm alone loads, giving the tuned model's logits."""
    import timm
    from safetensors.torch import save_file

    from ivpt.cli import main

    torch.manual_seed(0)
    kwargs = dict(img_size=32, depth=2)
    weights = tmp_path / "backbone.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", **kwargs).state_dict(), str(weights))
    for method in ("lora", "ssf", "bitfit"):
        model = randomize(ivpt.create_model("vit_tiny_patch16_224", method, 5, weights=weights, timm_kwargs=kwargs),
                          scale=0.05).eval()
        model.save_adapter(tmp_path / method)
        out = tmp_path / f"{method}.safetensors"
        assert main(["export", str(tmp_path / method), "--merged", str(out)]) == 0
        said = capsys.readouterr().out
        assert "ivpt's own architecture" not in said  # timm's own name: nothing to import
        plain = run_printed_call(said).eval()
        assert torch.allclose(plain(images), model(images), atol=1e-4), method


def test_export_of_a_hub_backbone_prints_a_call_that_reads_the_merged_file(tmp_path):
    """timm loads an hf-hub name's weights from the Hub whatever pretrained_cfg_overlay's file says, so
    the printed call builds the Hub model and loads the merged file into it (run offline, on a Hub cache
    laid out in huggingface_hub's format)."""
    import json

    from safetensors.torch import save
    from conftest import lay_out_hub_repo, run_offline

    import timm

    kwargs = {"img_size": 32, "depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, **kwargs)
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 10, "model_args": kwargs,
              "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": 10,
                                 "interpolation": "bicubic", "crop_pct": 1.0, "classifier": "head"}}
    lay_out_hub_repo(tmp_path / "hub", "someone/tiny-vit", {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": save({k: v.contiguous() for k, v in vit.state_dict().items()})}, "r1", ["main"])
    result = run_offline(tmp_path / "hub", f"""
import contextlib, io, json, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
import ivpt
from ivpt.cli import main
from conftest import randomize, run_printed_call
model = randomize(ivpt.create_model("hf-hub:someone/tiny-vit", "lora", 10, pretrained=True), scale=0.2).eval()
model.save_adapter({str(tmp_path / "a")!r})
said = io.StringIO()
with contextlib.redirect_stdout(said):
    code = main(["export", {str(tmp_path / "a")!r}, "--merged", {str(tmp_path / "m.safetensors")!r}])
images = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    diff = (run_printed_call(said.getvalue()).eval()(images) - model(images)).abs().max().item()
print(json.dumps(dict(code=code, diff=diff)))
""")
    assert result["code"] == 0 and result["diff"] < 1e-4


def test_export_refuses_prompt_adapters_clearly(tmp_path, capsys):
    from ivpt.cli import main

    ivpt.create_model("vit_mini_patch4_32.ivpt_cifar10", "vpt-deep", 3, prompt_length=2).save_adapter(tmp_path / "adapter")
    code = main(["export", str(tmp_path / "adapter"), "--merged", str(tmp_path / "m.safetensors")])
    assert code != 0 and "prompt tokens" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


# -- counts and errors -------------------------------------------------------------------------------
def test_vit_b16_parameter_counts_follow_the_definitions():
    from ivpt.cli import parameter_table

    d, n, hidden = 768, 12, 3072
    rows = {r["method"]: r["tuned_without_head"]
            for r in parameter_table("vit_base_patch16_224", MODULE_METHODS, 100, 10)}
    assert rows["lora"] == n * 2 * (8 * d + d * 8)                         # q and v, rank 8
    assert rows["adapter"] == rows["adaptformer"] == n * (d * 8 + 8 + 8 * d + d)  # bottleneck 8, with biases
    assert rows["ssf"] == 2 * (d + n * (d + 3 * d + d + d + hidden + d) + d)  # scale + shift at every site
    assert rows["bitfit"] == d + n * (3 * d + d + hidden + d + d + d) + d   # patch proj, block layers, final norm


def test_bad_options_and_backbones_are_named():
    with pytest.raises(OptionError, match="lora_targets"):
        build("lora", lora_targets=["qq"])
    with pytest.raises(OptionError, match="names a layer twice"):
        build("lora", lora_targets=["qkv", "q"])
    with pytest.raises(OptionError, match="placement"):
        build("adapter", placement="inside")
    with pytest.raises(OptionError, match="unknown option 'prompt_length'"):
        build("lora", prompt_length=10)
    vit = make_vit()
    vit.blocks[1].mlp.fc1 = nn.Identity()
    with pytest.raises(AttachError, match=r"blocks\[1\]\.mlp\.fc1 is Identity"):
        build("lora", vit, lora_targets=["fc1"])
    no_bias = build("ssf", make_vit(qkv_bias=False))  # trains (the shift acts), but cannot be folded
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv has no bias"):
        no_bias.merge()


@pytest.mark.parametrize("method,options,match", [
    ("lora", {"lora_targets": [["q"]]}, "option 'lora_targets': unknown target \\['q'\\]"),  # YAML [[q]]: no TypeError
    ("adapter", {"adapter_scale": 0}, "option 'adapter_scale'.*\\(0.0, inf\\]"),  # s = 0: an adapter that adds nothing
    ("adaptformer", {"adapter_scale": -0.1}, "option 'adapter_scale'"),
    # adaptformer is the parallel adapter: a sequential one under its name would be another method
    ("adaptformer", {"placement": "sequential"}, "option 'placement'.*use method 'adapter'"),
    # B A of a width-32 layer has rank 32 at most: rank 33 would train more than the layer, no better
    ("lora", {"lora_rank": 33}, r"option 'lora_rank': 33 is above the rank that blocks\[0\]\.attn\.qkv can take \(32\)"),
])
def test_nonsense_option_values_are_refused_by_name(method, options, match):
    with pytest.raises(OptionError, match=match):
        build(method, **options)


def test_export_never_overwrites_its_inputs_and_checks_the_file_name(tmp_path, capsys):
    from ivpt.cli import main

    adapter = tmp_path / "adapter"
    ivpt.create_model("vit_mini_patch4_32.ivpt_cifar10", "lora", 3, lora_rank=2).save_adapter(adapter)
    before = (adapter / "adapter.safetensors").read_bytes()
    for out, said in ((adapter / "adapter.safetensors", "an input of this command"),
                      (tmp_path / "merged.pth", "expected a .safetensors file name"),
                      (tmp_path / "missing" / "merged.safetensors", "does not exist")):
        assert main(["export", str(adapter), "--merged", str(out)]) == 2
        assert said in capsys.readouterr().err
    assert (adapter / "adapter.safetensors").read_bytes() == before and ivpt.load_adapter(adapter) is not None
    assert not (tmp_path / "merged.pth").exists()


def test_params_and_eval_name_a_bad_method_options_or_data(capsys):
    from ivpt.cli import main

    for argv, said in ((["--method", "lroa"], "unknown method 'lroa'"),
                       (["--method", "lora", "--options", "[4]"], "--options '[4]': expected a JSON object"),
                       (["--method", "lora", "--options", "rank=4"], "--options 'rank=4' is not valid JSON"),
                       (["--method", "lora", "--prompt-length", "20"], "--prompt-length: method 'lora' has no prompts")):
        assert main(["params", "--backbone", "vit_mini_patch4_32", *argv]) == 2
        assert said in capsys.readouterr().err
    assert main(["params", "--backbone", "vit_mini_patch4_32", "--method", "lora"]) == 0
    assert "prompt length" not in capsys.readouterr().out  # no prompts in the table: no prompt length claimed
    for data, said in (("[1]", "--data '[1]': expected a JSON object"), ("kind=suite", "is not valid JSON")):
        assert main(["eval", "no-such-adapter", "--data", data]) == 2  # refused before the adapter is read
        assert said in capsys.readouterr().err


@pytest.mark.parametrize("method,options", [("lora", {"lora_rank": 2}), ("bitfit", {}), ("adaptformer", {}),
                                            ("ssf", {})])
def test_training_resumes_bit_identically(method, options, setup, monkeypatch):
    """The engine trains a module method like any other; an interrupted run resumes to the same adapter."""
    from conftest import adapter_tensors, config

    from ivpt.engine import checkpoint as ckpt_module
    from ivpt.engine.loop import train

    tmp_path, folder = setup
    changes = dict(method=method, method_options=options, lr=0.05)
    full = train(config(tmp_path, folder, output=str(tmp_path / "full"), **changes), quiet=True)
    real_save = ckpt_module.save_checkpoint

    def interrupt_once(*args, **kwargs):
        real_save(*args, **kwargs)
        monkeypatch.setattr("ivpt.engine.loop.save_checkpoint", real_save)
        raise KeyboardInterrupt

    monkeypatch.setattr("ivpt.engine.loop.save_checkpoint", interrupt_once)
    cfg = config(tmp_path, folder, output=str(tmp_path / "split"), **changes)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, quiet=True)
    resumed = train(cfg, resume=True, quiet=True)
    a, b = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "split")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val"]["top1"] == full["val"]["top1"]
    # the method's own tensors are in the adapter (BitFit: the blocks' biases), beside the head
    assert any(k.startswith("method.") or k.startswith("backbone.blocks") for k in a)
    if method == "lora":  # B starts at zero: training moved it
        assert any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_b"))


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_ddp_two_processes_match_one_process(method, setup):
    """Hooked modules (LoRA) and tensors tuned in place (BitFit) under DDP: 2 gloo ranks = 1 process."""
    import torch.multiprocessing as mp
    from conftest import adapter_tensors, config, ddp_worker, free_port

    from ivpt.engine.loop import train

    tmp_path, folder = setup
    common = dict(epochs=2, method=method, method_options={}, lr=0.05)
    single = train(config(tmp_path, folder, output=str(tmp_path / "one"), **common), quiet=True)
    cfg = config(tmp_path, folder, output=str(tmp_path / "two"), **common)
    mp.start_processes(ddp_worker, args=(2, free_port(), cfg.to_dict(), str(tmp_path / "two.json")),
                       nprocs=2, join=True, start_method="spawn")
    two = json.loads((tmp_path / "two.json").read_text())
    a, b = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    assert set(a) == set(b)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=2e-5), key
    assert [e["val_top1"] for e in single["log"]] == [e["val_top1"] for e in two["log"]]


def test_segmentation_adapter_with_a_module_method_round_trips(tmp_path):
    from ivpt.segmentation import create_segmentation_model

    model = create_segmentation_model(make_vit(dynamic_img_size=True), "lora", 5, decoder="naive", crop_size=32,
                                      decoder_channels=8)
    randomize(model.encoder)
    x = torch.randn(2, 3, 32, 48)
    expected = model.eval()(x)
    model.save_adapter(tmp_path / "seg")
    again = ivpt.load_adapter(tmp_path / "seg", backbone=make_vit(dynamic_img_size=True))
    assert torch.equal(again.eval()(x), expected)


def test_a_backbone_module_serves_one_model_and_a_merged_copy_is_free_again(images, tmp_path):
    """A second model on the same module would hook a second method into the modules both run (and replace
    the first model's head): the first model's logits must not move, and the second is refused."""
    from ivpt.backbone import BackboneError

    vit = make_vit()
    first = ivpt.create_model(vit, "lora", 7).eval()
    with torch.no_grad():
        before = first(images)
    for method in ("ssf", "linear"):
        with pytest.raises(BackboneError, match="already belongs to an ivpt model \\(method 'lora'\\)"):
            ivpt.create_model(vit, method, 3)
    with pytest.raises(BackboneError, match="already belongs"):
        ivpt.create_model(copy.deepcopy(vit), "ssf", 3)  # the copy carries LoRA's hooks along
    first.save_adapter(tmp_path / "a")
    with pytest.raises(BackboneError, match="already belongs"):
        ivpt.load_adapter(tmp_path / "a", backbone=first.backbone)
    with torch.no_grad():
        assert torch.equal(first(images), before) and first.head.out_features == 7
    merged = first.merge()
    with torch.no_grad():
        assert torch.allclose(merged(images), before, atol=1e-5)
    assert ivpt.create_model(merged, "ssf", 7).backbone is merged  # a plain timm model again
