"""bias_act against an elementwise numpy definition; its derivatives by finite differences."""
import math

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import ops
from conftest import requires_cuda

NUMPY_ACTS = {
    "linear": lambda s, a: s,
    "relu": lambda s, a: np.maximum(s, 0),
    "lrelu": lambda s, a: np.where(s > 0, s, a * s),
    "tanh": lambda s, a: np.tanh(s),
    "sigmoid": lambda s, a: 1 / (1 + np.exp(-s)),
}
DEFAULT_GAIN = {"linear": 1.0, "relu": math.sqrt(2), "lrelu": math.sqrt(2), "tanh": 1.0, "sigmoid": 1.0}


def bias_act_numpy(x, b, dim, act, alpha, gain, clamp):
    shape = [1] * x.ndim
    shape[dim] = -1
    s = x + (0 if b is None else b.reshape(shape))
    y = NUMPY_ACTS[act](s, alpha) * gain
    return y if clamp is None else np.clip(y, -clamp, clamp)


@pytest.mark.parametrize("act", list(NUMPY_ACTS))
@pytest.mark.parametrize("dim,shape", [(1, (2, 5, 3, 4)), (0, (6,)), (2, (3, 2, 4)), (1, (4, 3))])
@pytest.mark.parametrize("clamp", [None, 0.5])
def test_ref_matches_numpy(act, dim, shape, clamp):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    b = rng.standard_normal(shape[dim])
    got = ops.bias_act(torch.from_numpy(x), torch.from_numpy(b), dim=dim, act=act, alpha=0.3, clamp=clamp, impl="ref")
    want = bias_act_numpy(x, b, dim, act, 0.3, DEFAULT_GAIN[act], clamp)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_defaults_are_stylegan2s():
    x = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(ops.bias_act(x, act="lrelu"), torch.tensor([-0.2, 2.0], dtype=torch.float64) * 2 ** 0.5)
    torch.testing.assert_close(ops.bias_act(x), x)
    torch.testing.assert_close(ops.bias_act(x, act="lrelu", gain=1.0, clamp=1.5), torch.tensor([-0.2, 1.5], dtype=torch.float64))


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="unknown activation"):
        ops.bias_act(torch.randn(2, 3), act="gelu")
    with pytest.raises(ValueError, match="expected"):
        ops.bias_act(torch.randn(2, 3), torch.randn(4))
    with pytest.raises(ValueError, match="positive"):
        ops.bias_act(torch.randn(2, 3), gain=-1.0)


@pytest.mark.parametrize("act", list(NUMPY_ACTS))
@pytest.mark.parametrize("clamp", [None, 0.8])
def test_ref_gradcheck_and_gradgradcheck(act, clamp):
    # keep inputs away from the kinks of relu/lrelu and the clamp edges, where finite differences are wrong
    x = torch.tensor([[-1.3, 0.4, 2.1], [0.9, -0.6, -2.2]], dtype=torch.float64).repeat(2, 1, 1).requires_grad_(True)
    b = torch.tensor([0.05, -0.15], dtype=torch.float64, requires_grad=True)
    fn = lambda x, b: ops.bias_act(x, b, dim=1, act=act, clamp=clamp, impl="ref")  # noqa: E731
    assert gradcheck(fn, (x, b))
    assert gradgradcheck(fn, (x, b))


# ---------------------------------------------------------------------------------------------------
# CUDA: skipped without a GPU


def _derivatives(x0, b0, act, clamp, impl):
    x, b = x0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    y = ops.bias_act(x, b, act=act, clamp=clamp, impl=impl)
    dy = torch.randn_like(y, generator=torch.Generator(device=y.device).manual_seed(1))
    dx, db = torch.autograd.grad(y, [x, b], dy, create_graph=True)
    ddx, ddb = torch.autograd.grad((dx.square() * 0.5).sum() + db.square().sum(), [x, b], allow_unused=True)
    return y, dx, db, ddx if ddx is not None else torch.zeros_like(x), ddb if ddb is not None else torch.zeros_like(b)


@requires_cuda
@pytest.mark.parametrize("act", list(NUMPY_ACTS))
@pytest.mark.parametrize("clamp", [None, 0.7])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_cuda_matches_ref_to_second_order(act, clamp, layout):
    x = torch.randn(3, 7, 5, 6, device="cuda").contiguous(memory_format=layout)
    b = torch.randn(7, device="cuda")
    for got, want in zip(_derivatives(x, b, act, clamp, "cuda"), _derivatives(x, b, act, clamp, "ref")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision(dtype):
    x = torch.randn(4, 16, 8, 8, device="cuda", dtype=dtype)
    b = torch.randn(16, device="cuda", dtype=dtype)
    got = ops.bias_act(x, b, act="lrelu", clamp=256, impl="cuda")
    want = ops.bias_act(x.float(), b.float(), act="lrelu", clamp=256, impl="ref")
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


@requires_cuda
@pytest.mark.parametrize("act", list(NUMPY_ACTS))
def test_cuda_gradcheck_and_gradgradcheck(act):
    x = torch.tensor([[-1.3, 0.4, 2.1], [0.9, -0.6, -2.2]], dtype=torch.float64, device="cuda")
    x = x.repeat(2, 1, 1).requires_grad_(True)
    b = torch.tensor([0.05, -0.15], dtype=torch.float64, device="cuda", requires_grad=True)
    fn = lambda x, b: ops.bias_act(x, b, dim=1, act=act, clamp=0.8, impl="cuda")  # noqa: E731
    assert gradcheck(fn, (x, b))
    assert gradgradcheck(fn, (x, b))
