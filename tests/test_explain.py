"""ivpt.explain and `ivpt explain`: the figures decode, the outlines are AR's selection, the numbers are the
adapter's tensors, training logs carry the diagnostics, and bad input is refused clearly."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ivpt
from conftest import make_vit
from ivpt import cli
from ivpt.engine.config import TrainConfig
from ivpt.engine.loop import train
from ivpt.explain import denormalize, epoch_diagnostics, explain, plot_adapter, plot_image
from ivpt.segmentation import create_segmentation_model
from conftest import TINY_MINI as TINY, full_attention_saliency, make_folder, record_ar, record_block_inputs


def trained_like(model, gamma=0.4, theta=1.3):
    """Move AR's gammas and DA's parameters off their initial values, as training would."""
    with torch.no_grad():
        for r in model.method.reinforcement.values():
            r.gamma.fill_(gamma)
        for da in model.method.aggregation.values():
            if da.mode == "static":
                da.theta.fill_(theta)
            else:
                da.w_z.normal_(0, 0.3)
                da.bias.fill_(0.2)
    return model


def record_aggregation_inputs(model):
    """Each DA module's inputs (Z_i, P_{i+1}) in the last forward, seen from outside the method."""
    seen = {}
    for key, da in model.method.aggregation.items():
        da.register_forward_hook(lambda mod, args, out, i=int(key): seen.__setitem__(i, [a.detach() for a in args]))
    return seen


def plain_alpha(da, z, p):
    """alpha = sigmoid(n(Z) w_z + n(P) w_p + b) (gate: one per token; channel: per channel), from the spec."""
    zn, pn = (torch.nn.functional.layer_norm(t, t.shape[-1:], eps=1e-6) for t in (z, p))
    if da.mode == "gate":
        return torch.sigmoid(zn @ da.w_z + pn @ da.w_p + da.bias).unsqueeze(-1)
    return torch.sigmoid(zn * da.w_z + pn * da.w_p + da.bias)


@pytest.mark.parametrize("da", ["gate", "static", "channel"])
def test_explanation_equals_the_models_own_selection_and_tensors(da, images, tmp_path):
    model = trained_like(ivpt.create_model(make_vit(), "ivpt", 7, prompt_length=3, da=da).eval())
    inputs = record_block_inputs(model)
    chosen = record_ar(model)
    mixed = record_aggregation_inputs(model)
    e = explain(model, images)
    assert e.grid == (4, 4) and e.method == "ivpt" and len(e.images) == 3
    # the selection shown is the one the forward pass made, and it is the top-K of the shown saliency
    assert [c[0] for c in chosen] == [0, 1, 2]
    for transition, _, _, _, selected in chosen:
        for b in range(3):
            assert e.images[b].selected[transition] == sorted(selected[b].tolist())
            top = np.argsort(-e.images[b].saliency[transition].ravel(), kind="stable")[:len(selected[b])]
            assert sorted(top.tolist()) == e.images[b].selected[transition]
    # the saliency is the CLS attention of each block, computed independently from the full matrix
    npt = model.backbone.num_prefix_tokens
    for block in range(len(model.backbone.blocks)):
        expected = full_attention_saliency(model.backbone.blocks[block], inputs[block], slice(0, 1), npt + 3)
        got = torch.tensor(np.stack([im.saliency[block].ravel() for im in e.images]))
        assert torch.allclose(got, expected, atol=1e-5)
    for t in e.transitions:
        assert t.gamma == pytest.approx(model.method.reinforcement[str(t.transition)].gamma.item())
        da_module = model.method.aggregation[str(t.transition)]
        if da == "static":
            assert t.da_weight == pytest.approx(1 / (1 + math.exp(-1.3)))
        else:  # the values DA mixed with in this pass, recomputed from its inputs by the formula
            with torch.no_grad():
                alpha = plain_alpha(da_module, *mixed[t.transition])
            assert t.da_weight == pytest.approx(alpha.mean().item(), abs=1e-6)
            assert t.da_weights == pytest.approx(alpha.flatten().tolist(), abs=1e-6)
        assert t.da_start == pytest.approx(0.5) and t.ratio > 0
    # the figure outlines exactly those patches, and decodes
    pixels = denormalize(images, (0.5,) * 3, (0.25,) * 3)
    outlined = plot_image(e, 1, pixels[1], tmp_path / "one.png")
    assert outlined == {c[0]: sorted(c[4][1].tolist()) for c in chosen}
    plot_adapter(e, tmp_path / "adapter.png")
    for name in ("one.png", "adapter.png"):
        with Image.open(tmp_path / name) as figure:
            assert figure.format == "PNG" and figure.size[0] > 300
    json.dumps(e.to_dict())  # every number serialises


def test_reinforcement_ratio_is_the_relative_change_of_the_selected_patches(images):
    model = trained_like(ivpt.create_model(make_vit(), "ivpt", 7, prompt_length=3, ar_ratio=0.5).eval(), gamma=0.9)
    seen = record_ar(model)
    e = explain(model, images)
    for (i, before, after, _, selected), stats in zip(seen, e.transitions):
        rows = torch.arange(3)[:, None]
        delta = (after - before)[rows, selected].norm(dim=-1) / before[rows, selected].norm(dim=-1)
        assert stats.ratio == pytest.approx(delta.mean().item(), rel=1e-4)
        assert [im.ratio[i] for im in e.images] == pytest.approx(delta.mean(dim=1).tolist(), rel=1e-4)


@pytest.mark.parametrize("method", ["vpt-deep", "vpt-shallow", "gatevpt", "vfpt", "e2vpt", "lora", "ssf"])
def test_prompt_methods_without_da_or_ar_get_attention_maps(images, tmp_path, method):
    from ivpt.methods import prompt_options

    model = ivpt.create_model(make_vit(), method, 7, **prompt_options(method, 3))
    e = explain(model, images)
    assert sorted(e.images[0].saliency) == [0, 1, 2, 3] and e.images[0].selected == {}
    assert all(t.da_mode is None and t.gamma is None for t in e.transitions)
    plot_adapter(e, tmp_path / "a.png")
    assert plot_image(e, 0, denormalize(images, (0.5,) * 3, (0.25,) * 3)[0], tmp_path / "i.png") == {}


def module_attributes(model):
    """What every module holds as attributes, by identity: a forward that stores anything on the model
    (a flag, a record such as the former ``last_reinforcement``) adds or rebinds one of them."""
    return {(name, key): id(value) for name, module in model.named_modules() for key, value in vars(module).items()
            if key != "training"}


@pytest.mark.parametrize("method", ["ivpt", "vpt-deep"])
def test_explained_forward_is_the_plain_forward_and_leaves_nothing_behind(images, method):
    """forward_explained's output is model(images) exactly, in eval and in training; neither a plain
    forward nor an explained one leaves anything on the model (nothing is recorded unasked)."""
    options = {"prompt_length": 3, **({"da": "gate"} if method == "ivpt" else {})}
    model = ivpt.create_model(make_vit(), method, 7, **options)
    if method == "ivpt":
        trained_like(model)
    held = module_attributes(model)
    with torch.no_grad():
        plain = model.eval()(images)
        explained = model.forward_explained(images)
        assert torch.equal(explained.output, plain)
        tokens, trace = model.forward_traced(images)
        reference = model.forward_tokens(images)
        assert all(torch.equal(getattr(tokens, k), getattr(reference, k)) for k in ("prefix", "prompts", "patches"))
    assert sorted(trace.saliency) == [0, 1, 2, 3]
    assert sorted(trace.selected) == ([0, 1, 2] if method == "ivpt" else [])
    model.train()
    training = model(images)  # iVPT: DA's deferred rows (its MLP over fewer rows), the traced pass whole blocks
    assert torch.allclose(training.detach(), plain, atol=1e-6, rtol=1e-5)
    assert torch.equal(model.forward_explained(images).output.detach(), plain)
    training.sum().backward()
    model.forward_explained(images)
    assert module_attributes(model) == held
    with torch.no_grad():
        assert torch.equal(model.eval()(images), plain)


def test_segmentation_explanation_has_masks(tmp_path):
    model = trained_like(create_segmentation_model(make_vit(dynamic_img_size=True), "ivpt", 5, decoder="naive",
                                                   crop_size=32, decoder_channels=8, prompt_length=2))
    images = torch.randn(2, 3, 32, 32)
    e = explain(model, images)
    assert e.task == "segmentation" and e.images[0].prediction is None
    assert e.images[0].mask.shape == (32, 32) and sorted(e.images[0].saliency) == [0, 1, 2, 3]
    with torch.no_grad():  # the explained output is the model's own
        model.eval()
        assert torch.equal(model.forward_explained(images).output, model(images))
        assert (model.forward_explained(images).output.argmax(1).numpy() == np.stack([i.mask for i in e.images])).all()
    assert plot_image(e, 0, denormalize(images, (0.5,) * 3, (0.25,) * 3)[0], tmp_path / "s.png").keys() == {0, 1, 2}
    assert len(e.to_dict()["images"][0]["mask_class_fractions"]) >= 1


def test_training_logs_the_diagnostics_every_epoch(tmp_path):
    folder = make_folder(tmp_path / "data")
    torch.manual_seed(0)
    import timm

    save_file(timm.create_model("vit_mini_patch4_32", **TINY).state_dict(), str(tmp_path / "b.safetensors"))
    cfg = TrainConfig(backbone="vit_mini_patch4_32", backbone_options=TINY, weights=str(tmp_path / "b.safetensors"),
                      method="ivpt", method_options={"prompt_length": 3, "da": "static"},
                      data={"kind": "folder", "root": str(folder)}, epochs=2, warmup_epochs=1, batch_size=8,
                      optimizer="adamw", lr=0.05, lr_scaling=False, output=str(tmp_path / "run")).validate()
    train(cfg, quiet=True)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all({"da_weight_0", "ar_gamma_0", "ar_ratio_0"} <= set(e) for e in log)
    model = ivpt.load_adapter(tmp_path / "run" / "adapter")
    assert log[-1]["da_weight_0"] == pytest.approx(torch.sigmoid(model.method.aggregation["0"].theta).item(), abs=1e-6)
    assert log[-1]["ar_gamma_0"] == pytest.approx(model.method.reinforcement["0"].gamma.item(), abs=1e-6)
    assert log[0]["ar_gamma_0"] != 0.0  # gamma moved away from its start during the first epoch
    assert "ar_gamma_0" in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    # the diagnostics read the model without changing it: same figures twice, same logits after
    probe = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(probe)
    assert epoch_diagnostics(model, probe) == epoch_diagnostics(model, probe)
    with torch.no_grad():
        assert torch.equal(model(probe), before)
    # `ivpt explain` from the command line: one PNG per image, adapter.png, explain.json equal to the tensors
    out = tmp_path / "explained"
    images = folder / "val" / "class0"
    assert cli.main(["explain", str(tmp_path / "run" / "adapter"), str(images), "--output", str(out),
                     "--batch-size", "3"]) == 0
    report = json.loads((out / "explain.json").read_text())
    assert len(report["images"]) == 4 and all(Path_is_png(r["figure"]) for r in report["images"])
    assert Path_is_png(out / "adapter.png")
    static = report["transitions"][0]
    assert static["da_mode"] == "static"
    assert static["da_weight"] == pytest.approx(torch.sigmoid(model.method.aggregation["0"].theta).item())
    assert static["gamma"] == pytest.approx(model.method.reinforcement["0"].gamma.item())
    first = report["images"][0]
    assert set(first["selected"]) == {"0"} and len(first["selected"]["0"]) == 16  # 0.25 of the 8 x 8 patches
    assert first["prediction"] in ("class0", "class1") and 0 < first["score"] <= 1
    # a phone photo in a format ivpt cannot read: skipped with a warning, listed, the rest explained (exit 3)
    (images / "IMG_0002.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    assert cli.main(["explain", str(tmp_path / "run" / "adapter"), str(images), "--output", str(tmp_path / "ex2"),
                     "--batch-size", "3"]) == cli.EXIT_SKIPPED
    again = json.loads((tmp_path / "ex2" / "explain.json").read_text())
    assert len(again["images"]) == 4 and [Path(s["image"]).name for s in again["skipped"]] == ["IMG_0002.HEIC"]
    assert sorted(Path(r["figure"]).name[:4] for r in again["images"]) == ["0000", "0001", "0002", "0003"]
    (images / "IMG_0002.HEIC").unlink()


def Path_is_png(path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG"


def test_explain_refuses_bad_input_clearly(tmp_path, capsys):
    assert cli.main(["explain", str(tmp_path / "missing"), str(tmp_path), "--output", str(tmp_path / "o")]) != 0
    assert "missing" in capsys.readouterr().err
    import timm

    save_file(timm.create_model("vit_mini_patch4_32", **TINY).state_dict(), str(tmp_path / "b.safetensors"))
    model = ivpt.create_model("vit_mini_patch4_32", "ivpt", 2, weights=tmp_path / "b.safetensors", timm_kwargs=TINY,
                              prompt_length=2)
    model.save_adapter(tmp_path / "adapter")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert cli.main(["explain", str(tmp_path / "adapter"), str(tmp_path / "bad.png"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot decode image" in err and "bad.png" in err
    with pytest.raises(TypeError, match="explain needs an ivpt model"):
        explain(torch.nn.Linear(2, 2), torch.randn(1, 2))


def test_explain_names_the_missing_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    from ivpt.explain import _pyplot

    with pytest.raises(ImportError, match=r"pip install 'ivpt\[explain\]'"):
        _pyplot()
