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


def test_da_keeps_one_copy_of_the_prompt_rows_per_transition():
    """Saved for backward beyond VPT-deep: Z's copy (B x p x d) per transition, plus AR's top-K mask."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    p, d, depth = 20, 32, 4
    deep = ivpt.create_model(make_vit(), "vpt-deep", 7, prompt_length=p).train()
    da = ivpt.create_model(make_vit(), "ivpt", 7, prompt_length=p, ar=False).train()
    extra = saved_bytes(da, images) - saved_bytes(deep, images)
    assert extra <= (depth - 1) * 2 * p * d * 4 * 1.05  # one fp32 B x p x d per transition (B = 2)
