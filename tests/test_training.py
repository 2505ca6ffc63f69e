"""What trains: gradients reach every tuned tensor and nothing else; the backbone never moves."""
import pytest
import torch

import ivpt
from conftest import make_vit
from ivpt.methods.ivpt import IVPTConfig


def train_steps(model, steps=3, opt_cls=torch.optim.AdamW):
    tuned = list(model.tuned_parameters().values())
    opt = opt_cls(tuned, lr=1e-2)
    torch.manual_seed(0)
    for _ in range(steps):
        images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 7, (4,))
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("method,options", [
    ("linear", {}),
    ("vpt-shallow", {"prompt_length": 3}),
    ("vpt-deep", {"prompt_length": 3}),
    ("ivpt", {"prompt_length": 3, "ar_gamma_init": 0.1}),
    ("ivpt", {"prompt_length": 3, "da": "channel", "ar_mix": "attn", "ar_gamma_init": 0.1}),
    ("ivpt", {"prompt_length": 3, "da": "static"}),
    ("e2vpt", {"prompt_length": 3, "kv_length": 2, "kv_shared": False, "prune": True}),
])
def test_gradients_reach_tuned_tensors_only(method, options):
    model = ivpt.create_model(make_vit(drop_path_rate=0.2), method, 7, **options)
    model.train()
    frozen_before = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if not p.requires_grad}
    tuned = model.tuned_parameters()
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 7, (4,))
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    for name, param in model.named_parameters():
        if name in tuned:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reached {name}"
        else:
            assert param.grad is None, f"{name} is frozen but got a gradient"
    # E2VPT: head 2, prompts, keys, values, token and piece scales
    expected = {"linear": 2, "vpt-shallow": 3, "vpt-deep": 3, "e2vpt": 7}.get(method)
    if expected:
        assert len(tuned) == expected
    else:  # prompts + head + every DA and AR tensor of the 3 transitions
        per_gate = {"gate": 3, "channel": 3, "static": 1}[options.get("da", IVPTConfig().da)]
        assert len(tuned) == 1 + 2 + 3 * per_gate + 3
    model.zero_grad()
    train_steps(model)
    for name, param in model.backbone.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), f"frozen {name} changed"


def test_full_fine_tuning_trains_everything_and_runs_backbone_in_train_mode():
    model = ivpt.create_model(make_vit(), "full", 7)
    model.train()
    assert model.backbone.training
    before = model.backbone.blocks[0].attn.qkv.weight.detach().clone()
    train_steps(model, steps=1)
    assert not torch.equal(before, model.backbone.blocks[0].attn.qkv.weight)
    counts = ivpt.count_parameters(model)
    assert counts["tuned"] == counts["total"]


def test_train_mode_keeps_frozen_backbone_in_eval():
    model = ivpt.create_model(make_vit(drop_path_rate=0.5, drop_rate=0.5), "ivpt", 7, prompt_length=2)
    model.train()
    assert model.training and not model.backbone.training
    assert all(not m.training for m in model.backbone.modules())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), model(images))  # no dropout or drop-path in the backbone


def test_prompt_dropout_acts_only_in_train_mode():
    model = ivpt.create_model(make_vit(), "vpt-deep", 7, prompt_length=4, prompt_dropout=0.5)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(images), model(images))
        model.eval()
        assert torch.equal(model(images), model(images))


def test_timm_gradient_checkpointing_is_honoured_and_changes_nothing():
    import copy

    plain = ivpt.create_model(make_vit(), "ivpt", 7, prompt_length=3, ar_gamma_init=0.2, layers=[1])
    ckpt = copy.deepcopy(plain)
    ckpt.backbone.set_grad_checkpointing(True)
    calls = []
    ckpt.backbone.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 7, (2,))
    for model in (ckpt, plain):
        torch.nn.functional.cross_entropy(model(images), labels).backward()
    assert len(calls) == 2  # block 0 recomputed in backward: checkpointing is on
    for (name, a), b in zip(ckpt.tuned_parameters().items(), plain.tuned_parameters().values()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
