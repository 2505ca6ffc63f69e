"""GateVPT: shallow prompts carried through the blocks with one learned gate per block."""
import pytest
import torch

import ivpt
from conftest import clone, copy_tuned, make_vit


def reference_gatevpt(vit, prompts, logits, images):
    """Independent GateVPT forward, written from the paper's rule Q_{i+1} = g Z_i + (1 - g) Q_i."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    b, npt, p = x.shape[0], vit.num_prefix_tokens, prompts.shape[1]
    x = torch.cat([x[:, :npt], prompts[0].expand(b, -1, -1), x[:, npt:]], dim=1)
    for i, block in enumerate(vit.blocks):
        q = x[:, npt:npt + p]
        x = block(x)
        if i < len(vit.blocks) - 1:
            g = torch.sigmoid(logits[i])
            x = torch.cat([x[:, :npt], g * x[:, npt:npt + p] + (1 - g) * q, x[:, npt + p:]], dim=1)
    x = vit.norm(x)
    return vit.forward_head(torch.cat([x[:, :npt], x[:, npt + p:]], dim=1))


@pytest.mark.parametrize("overrides", [{}, {"class_token": False, "global_pool": "avg"}, {"reg_tokens": 2}])
def test_gatevpt_matches_independent_reimplementation(overrides, images):
    model = ivpt.create_model(make_vit(**overrides), "gatevpt", 7, prompt_length=4).eval()
    assert torch.equal(model.method.gate_logits, torch.full((3,), -10.0))  # the GateVPT code's GATE_INIT
    with torch.no_grad():
        model.method.prompts.normal_()
        model.method.gate_logits.copy_(torch.tensor([-1.0, 0.3, 2.0]))
        expected = reference_gatevpt(model.backbone, model.method.prompts, model.method.gate_logits, images)
        assert torch.allclose(model(images), expected, atol=1e-5)


def test_gatevpt_with_open_gates_is_vpt_shallow_exactly(images):
    vit = make_vit()
    gated = ivpt.create_model(clone(vit), "gatevpt", 7, prompt_length=4).eval()
    shallow = ivpt.create_model(clone(vit), "vpt-shallow", 7, prompt_length=4).eval()
    copy_tuned(gated, shallow)
    with torch.no_grad():
        gated.method.gate_logits.fill_(100.0)  # sigmoid(100) == 1.0 in float32
        assert torch.equal(gated(images), shallow(images))
        gated.method.gate_logits.fill_(-10.0)
        assert not torch.allclose(gated(images), shallow(images))


def test_gatevpt_trains_only_its_tensors_and_round_trips(tmp_path, images):
    model = ivpt.create_model(make_vit(), "gatevpt", 7, prompt_length=4, gate_init=2.0)
    assert set(model.tuned_parameters()) == {"method.prompts", "method.gate_logits", "backbone.head.weight",
                                             "backbone.head.bias"}
    model.train()
    model(images).sum().backward()
    assert model.method.gate_logits.grad is not None and model.method.gate_logits.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if n not in model.tuned_parameters())
    counts = ivpt.count_parameters(model)
    assert counts["gates"] == 3 and counts["tuned_without_head"] == 4 * 32 + 3
    with pytest.raises(ivpt.OptionError, match="unknown option 'da'"):
        ivpt.create_model(make_vit(), "gatevpt", 7, da="gate")


def test_gatevpt_vit_b16_parameters():
    with torch.device("meta"):
        counts = ivpt.count_parameters(ivpt.create_model("vit_base_patch16_224", "gatevpt", 100, prompt_length=10))
    assert counts["prompts"] == 10 * 768 and counts["gates"] == 11 and counts["tuned_without_head"] == 7_691


def test_learnable_temperature_divides_each_blocks_attention_logits():
    """GateVPT's temperature t_i: the same as the block computing softmax(q k^T * scale / t_i) itself."""
    torch.manual_seed(0)
    vit = make_vit()
    model = ivpt.create_model(clone(vit), "gatevpt", 7, prompt_length=3, gate_init=0.5,
                              learn_temperature=True).eval()
    plain = ivpt.create_model(clone(vit), "gatevpt", 7, prompt_length=3, gate_init=0.5).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "temperatures" not in k})
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), plain(images))  # t = 1 at the start: GateVPT as before
        temps = [0.5, 2.0, 0.05, 30.0]  # the last is clamped to 10, as GateVPT's code clamps it
        for t, value in zip(model.method.temperatures, temps):
            t.value.fill_(value)
        for block, value in zip(plain.backbone.blocks, temps):
            block.attn.fused_attn = False
            block.attn.scale = block.attn.scale / min(max(value, 0.01), 10.0)
        assert torch.allclose(model(images), plain(images), atol=1e-5)
    counts = ivpt.count_parameters(model)
    assert counts["temperatures"] == 4 and counts["tuned_without_head"] == 3 * 32 + 3 + 4


def test_a_temperature_at_or_beyond_its_bound_is_clamped_in_place_and_keeps_learning():
    """As GateVPT's code does (the stored value clamped, then used): a clamp inside the graph would give a
    temperature that one step pushed to a bound a zero gradient from then on."""
    model = ivpt.create_model(make_vit(), "gatevpt", 7, prompt_length=3, gate_init=0.5, learn_temperature=True)
    model.train()
    for t, value in zip(model.method.temperatures, [0.005, 0.5, 10.5, 10.0]):
        with torch.no_grad():
            t.value.fill_(value)
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    values = [round(t.value.item(), 4) for t in model.method.temperatures]
    assert values == [0.01, 0.5, 10.0, 10.0]
    assert all(float(t.value.grad.abs()) > 0 for t in model.method.temperatures)


def test_two_forwards_before_one_backward_train_the_temperature(images):
    """Two views through the model, one loss (a consistency objective): the clamp of the stored value must
    not invalidate the first forward's graph."""
    model = ivpt.create_model(make_vit(), "gatevpt", 7, prompt_length=3, gate_init=0.5, learn_temperature=True)
    model.train()
    (model(images) - model(images.flip(-1))).square().sum().backward()
    assert all(t.value.grad is not None for t in model.method.temperatures)
