"""The gradfix convolutions against PyTorch's own derivatives, to second order, and by finite differences."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import ops

CONFIGS = [
    dict(transpose=False, stride=1, padding=1, groups=1),
    dict(transpose=False, stride=2, padding=0, groups=1),
    dict(transpose=False, stride=1, padding=1, groups=2),  # grouped, as StyleGAN2's modulated convs
    dict(transpose=True, stride=2, padding=0, groups=1),   # the upsampling modulated conv
    dict(transpose=True, stride=2, padding=1, groups=2),
]


def make(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = cfg["groups"]
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, generator=g)
    w_shape = (4, 6 // groups, 3, 3) if cfg["transpose"] else (6, 4 // groups, 3, 3)
    w = torch.randn(w_shape, dtype=torch.float64, generator=g)
    b = torch.randn(6, dtype=torch.float64, generator=g)
    return x, w, b


def conv(cfg, x, w, b, impl):
    kw = dict(stride=cfg["stride"], padding=cfg["padding"], groups=cfg["groups"], impl=impl)
    return ops.conv_transpose2d(x, w, b, **kw) if cfg["transpose"] else ops.conv2d(x, w, b, **kw)


def r1_like(cfg, impl, no_weight_grad=False):
    """Forward, a gradient w.r.t. the input with create_graph, then a penalty on it (R1's pattern)."""
    x, w, b = (t.clone().requires_grad_(True) for t in make(cfg))
    y = conv(cfg, x, w, b, impl)
    out = (torch.tanh(y) * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum()
    with ops.no_weight_gradients(no_weight_grad):
        (dx,) = torch.autograd.grad(out, x, create_graph=True)
    penalty = dx.square().sum() + out
    gx, gw, gb = torch.autograd.grad(penalty, [x, w, b])
    return y.detach(), dx.detach(), gx, gw, gb


@pytest.mark.parametrize("cfg", CONFIGS)
def test_gradfix_matches_pytorch_to_second_order(cfg):
    want = r1_like(cfg, "ref")
    for got in (r1_like(cfg, "gradfix"), r1_like(cfg, "gradfix", no_weight_grad=True)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_gradfix_gradcheck_and_gradgradcheck(cfg):
    x, w, b = (t.requires_grad_(True) for t in make(cfg))
    fn = lambda x, w, b: conv(cfg, x, w, b, "gradfix")  # noqa: E731
    assert gradcheck(fn, (x, w, b))
    assert gradgradcheck(fn, (x, w, b))


def test_no_weight_gradients_skips_only_the_weight():
    cfg = CONFIGS[0]
    x, w, b = (t.requires_grad_(True) for t in make(cfg))
    y = conv(cfg, x, w, b, "gradfix")
    with ops.no_weight_gradients():
        gx, gw = torch.autograd.grad(y.sum(), [x, w], allow_unused=True)
    assert gw is None and gx is not None
    gx2, gw2 = torch.autograd.grad(conv(cfg, x, w, b, "gradfix").sum(), [x, w])
    torch.testing.assert_close(gx, gx2)
    assert gw2.abs().sum() > 0


def test_default_impl_is_pytorchs_own_on_cpu():
    x, w, b = make(CONFIGS[0])
    x.requires_grad_(True)
    custom = torch.autograd.function.BackwardCFunction  # the node type of every autograd.Function
    assert not isinstance(ops.conv2d(x, w, b, padding=1).grad_fn, custom)
    assert isinstance(ops.conv2d(x, w, b, padding=1, impl="gradfix").grad_fn, custom)
