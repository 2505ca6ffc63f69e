"""DA's fused aggregation: the plain formula's outputs and gradients, with far less kept for backward."""
import pytest
import torch

import ivpt
from conftest import make_vit
from ivpt.methods.ivpt import FusedAggregation, standardize


def plain(z, p, w_z, w_p, bias, mode, space):
    zn, pn = (standardize(z), standardize(p)) if space == "standardized" else (z, p)
    if mode == "sum":
        return zn + pn
    if mode == "gate":
        alpha = torch.sigmoid(zn @ w_z + pn @ w_p + bias).unsqueeze(-1)
    elif mode == "channel":
        alpha = torch.sigmoid(zn * w_z + pn * w_p + bias)
    else:
        alpha = torch.sigmoid(bias)
    return alpha * zn + (1 - alpha) * pn


def inputs(mode, d=6, dtype=torch.float64, expanded=False):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(tuple(s), generator=g, dtype=dtype)  # noqa: E731
    z = (r(3, 4, d) * 2 + 1).requires_grad_()
    p = r(4, d).requires_grad_()
    p_in = p.expand(3, -1, -1) if expanded else p.detach().expand(3, -1, -1).clone().requires_grad_()
    bias_shape = {"gate": (), "channel": (d,), "static": (), "sum": ()}[mode]
    w_z, w_p, bias = (r(d).requires_grad_(), r(d).requires_grad_(), r(*bias_shape).requires_grad_())
    return z, p_in, w_z, w_p, bias, p


@pytest.mark.parametrize("space", ["standardized", "raw"])
@pytest.mark.parametrize("mode", ["gate", "channel", "static", "sum"])
def test_fused_aggregation_passes_gradcheck_and_equals_the_formula(mode, space):
    z, p, w_z, w_p, bias, _ = inputs(mode)
    args = (z, p, w_z, w_p, bias)
    used = [t for t in args if mode in ("gate", "channel") or t is not w_z and t is not w_p]
    if mode == "sum":
        used = [z, p]
    fused = lambda *a: FusedAggregation.apply(*a, mode, space)  # noqa: E731
    assert torch.equal(fused(*args), plain(*args, mode, space))
    assert torch.autograd.gradcheck(lambda *a: fused(*a), args, check_undefined_grad=False)
    g = torch.randn_like(z)
    expected = torch.autograd.grad(plain(*args, mode, space), used, g)
    got = torch.autograd.grad(fused(*args), used, g)
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("space", ["standardized", "raw"])
@pytest.mark.parametrize("mode", ["gate", "channel", "static", "sum"])
def test_fused_aggregation_broadcasts_one_prompt_set_over_the_batch(mode, space):
    """P as (1, p, d), what iVPT passes without prompt dropout: the formula on P expanded over the batch."""
    z, _, w_z, w_p, bias, p = inputs(mode)
    one = p.detach().unsqueeze(0).requires_grad_()
    args = (z, one, w_z, w_p, bias)
    fused = lambda *a: FusedAggregation.apply(*a, mode, space)  # noqa: E731
    assert torch.autograd.gradcheck(lambda *a: fused(*a), args, check_undefined_grad=False)
    g = torch.randn_like(z)
    out = fused(*args)
    assert torch.equal(out, plain(*args, mode, space))  # the formula on the broadcast P, bit for bit
    got = torch.autograd.grad(out, (z, one), g)
    expanded = one.detach().expand(3, -1, -1).requires_grad_()
    reference = plain(z, expanded, w_z, w_p, bias, mode, space)
    expected = torch.autograd.grad(reference, (z, expanded), g)
    assert torch.allclose(out, reference, atol=1e-12)
    assert torch.allclose(got[0], expected[0], atol=1e-12)
    assert torch.allclose(got[1], expected[1].sum(0, keepdim=True), atol=1e-12)


def test_gradient_reaches_the_expanded_prompt_parameter():
    z, p_in, w_z, w_p, bias, p = inputs("gate", expanded=True)
    FusedAggregation.apply(z, p_in, w_z, w_p, bias, "gate", "standardized").square().sum().backward()
    ref_p = p.detach().clone().requires_grad_()
    plain(z.detach(), ref_p.expand(3, -1, -1), w_z.detach(), w_p.detach(), bias.detach(), "gate",
          "standardized").square().sum().backward()
    assert torch.allclose(p.grad, ref_p.grad, atol=1e-10)


def saved_bytes(model, images):
    """Activation bytes kept for backward (storages of parameters, e.g. expanded prompts, not counted)."""
    seen, total = {p.untyped_storage().data_ptr() for p in model.parameters()}, 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images).sum()
    return total


@pytest.mark.parametrize("options", [{}, {"da": "channel", "ar_mix": "attn"}, {"da": "static", "ar": False},
                                     {"prompt_dropout": 0.0, "layers": [1]}])
def test_deferred_prompt_rows_give_the_plain_blocks_gradients(options):
    """DA finishing the prompt rows' MLP half itself (recomputed in backward) = every block run whole."""
    torch.manual_seed(0)
    model = ivpt.create_model(make_vit(), "ivpt", 7, prompt_length=5, ar_gamma_init=0.3, **options).train()
    with torch.no_grad():
        for p in model.method.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    images = torch.randn(3, 3, 32, 32)

    def grads(checkpointed: bool):
        model.zero_grad(set_to_none=True)
        model.backbone.set_grad_checkpointing(checkpointed)  # timm's path: whole blocks, no deferral
        loss = model(images).square().sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (deferred_loss, deferred), (plain_loss, plain) = grads(False), grads(True)
    assert torch.allclose(deferred_loss, plain_loss, rtol=1e-5)
    assert set(deferred) == set(plain)
    for name in plain:
        assert torch.allclose(deferred[name], plain[name], rtol=1e-4, atol=1e-6), name


def test_ivpt_keeps_no_more_for_backward_than_vpt_deep():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    deep = ivpt.create_model(make_vit(), "vpt-deep", 7, prompt_length=20).train()
    full = ivpt.create_model(make_vit(), "ivpt", 7, prompt_length=20).train()
    assert saved_bytes(full, images) <= saved_bytes(deep, images)


def test_gradient_checkpointing_saves_as_much_for_ivpt_as_for_vpt_deep():
    """timm's set_grad_checkpointing() used to be skipped on every block where AR acts (all but the last):
    an iVPT model kept nearly everything. Now it keeps about what VPT-deep keeps with checkpointing."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    saved = {}
    for method, checkpointed in (("vpt-deep", True), ("ivpt", True), ("ivpt", False)):
        model = ivpt.create_model(make_vit(depth=6), method, 7, prompt_length=20).train()
        model.backbone.set_grad_checkpointing(checkpointed)
        saved[(method, checkpointed)] = saved_bytes(model, images)
    assert saved[("ivpt", True)] <= 1.10 * saved[("vpt-deep", True)]
    assert saved[("ivpt", True)] < 0.5 * saved[("ivpt", False)]


@pytest.mark.parametrize("options", [{}, {"init_values": 0.1}, {"qk_norm": True}, {"scale_mlp_norm": True}])
def test_deferred_block_is_the_whole_block_without_the_deferred_rows_mlp(options):
    """run_block(defer=): the kept rows exactly as when norm2 ran over every row (LayerNorm is per row),
    the deferred rows' residual state as a copy of those rows only, finished by finish_block."""
    from timm.models.vision_transformer import Block

    from ivpt.encoder import finish_block, run_block

    torch.manual_seed(0)
    block = Block(32, 4, qkv_bias=True, **options).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, rows = torch.randn(3, 9, 32), slice(1, 4)
    with torch.no_grad():
        kept, _, residual = run_block(block, x, defer=rows)
        # independently, with timm's own attention module: the attention half, then the MLP half
        mid = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        keep = lambda y: torch.cat([y[:, :rows.start], y[:, rows.stop:]], dim=1)  # noqa: E731
        whole = mid + block.ls2(block.mlp(block.norm2(mid)))
        assert torch.equal(residual, mid[:, rows])
        assert torch.equal(kept, keep(mid) + block.ls2(block.mlp(keep(block.norm2(mid)))))
        assert torch.allclose(kept, keep(block(x)), atol=1e-6, rtol=1e-5)
        assert torch.allclose(finish_block(block, residual), whole[:, rows], atol=1e-6, rtol=1e-5)
    # the residual is its own p rows (nothing of it keeps the block's (B, T, d) state alive)
    assert residual.is_contiguous() and residual.untyped_storage().nbytes() == residual.numel() * 4


def test_reinforcement_adds_gamma_r_to_the_selected_patches_exactly():
    """AR's single fused add gives the spec's E_j + gamma r bit for bit, from an independent mask."""
    from ivpt.methods.ivpt import AttentiveReinforcement

    torch.manual_seed(0)
    ar = AttentiveReinforcement("mean", 0.25, 0.37)
    patches, prompts, saliency = torch.randn(3, 16, 8), torch.randn(3, 5, 8), torch.rand(3, 16)
    out, selected = ar(patches, saliency, prompts)
    expected = patches.clone()
    for b in range(3):
        for j in saliency[b].topk(4).indices.tolist():
            expected[b, j] = patches[b, j] + ar.gamma.detach() * prompts[b].mean(dim=0)
    assert torch.equal(out.detach(), expected)


@pytest.mark.parametrize("prompts,deferred", [(2, False), (10, True)])
def test_prompt_rows_are_deferred_only_where_they_are_a_large_share_of_the_tokens(prompts, deferred, monkeypatch):
    """17 image tokens: 2 prompts are 0.11 of a block's tokens (whole blocks, faster), 10 are 0.37 (deferred,
    leaner); DEFER_SHARE is 0.2. Inference and a traced pass never defer."""
    from ivpt.encoder import DEFER_SHARE, PromptedViT

    assert 2 / 19 < DEFER_SHARE <= 10 / 27
    calls = []
    original = PromptedViT._deferred_transition
    monkeypatch.setattr(PromptedViT, "_deferred_transition", lambda self, i, *a: calls.append(i) or original(self, i, *a))
    model = ivpt.create_model(make_vit(), "ivpt", 7, prompt_length=prompts).train()
    images = torch.randn(2, 3, 32, 32)
    model(images).sum().backward()
    assert calls == ([0, 1, 2] if deferred else [])
    calls.clear()
    with torch.no_grad():
        model(images)
    model.forward_traced(images)
    assert calls == []
