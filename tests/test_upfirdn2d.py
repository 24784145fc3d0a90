"""upfirdn2d against a slow, obviously-correct numpy implementation; its derivatives by finite differences."""
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import ops
from conftest import requires_cuda


def upfirdn2d_numpy(x, f, up, down, pad, flip_filter=False, gain=1.0):
    """The definition, step by step: insert zeros, pad or crop, convolve (loops over taps), keep every down-th sample."""
    upx, upy = up
    downx, downy = down
    px0, px1, py0, py1 = pad
    f = np.asarray(f, dtype=np.float64)
    if f.ndim == 1:
        f = np.outer(f, f)
    fh, fw = f.shape
    n, c, h, w = x.shape
    u = np.zeros((n, c, h * upy, w * upx))
    u[:, :, ::upy, ::upx] = x
    p = np.zeros((n, c, h * upy + max(py0, 0) + max(py1, 0), w * upx + max(px0, 0) + max(px1, 0)))
    p[:, :, max(py0, 0):max(py0, 0) + h * upy, max(px0, 0):max(px0, 0) + w * upx] = u
    p = p[:, :, max(-py0, 0):p.shape[2] - max(-py1, 0), max(-px0, 0):p.shape[3] - max(-px1, 0)]
    out_h, out_w = p.shape[2] - fh + 1, p.shape[3] - fw + 1
    v = np.zeros((n, c, out_h, out_w))
    for oy in range(out_h):
        for ox in range(out_w):
            for ty in range(fh):
                for tx in range(fw):
                    # true convolution: the tap at offset (ty, tx) meets the filter's mirrored entry
                    tap = f[ty, tx] if flip_filter else f[fh - 1 - ty, fw - 1 - tx]
                    v[:, :, oy, ox] += tap * p[:, :, oy + ty, ox + tx]
    return gain * v[:, :, ::downy, ::downx]


def random_case(rng):
    up = tuple(int(v) for v in rng.choice([1, 2], size=2))
    down = tuple(int(v) for v in rng.choice([1, 2], size=2))
    if rng.random() < 0.5:
        f = rng.standard_normal(int(rng.integers(1, 6)))
    else:
        f = rng.standard_normal((int(rng.integers(1, 5)), int(rng.integers(1, 5))))
    fw, fh = (f.shape[0], f.shape[0]) if f.ndim == 1 else (f.shape[1], f.shape[0])
    h, w = int(rng.integers(1, 8)), int(rng.integers(1, 8))
    pad = [int(v) for v in rng.integers(-3, 5, size=4)]  # crops larger than the image included
    # keep at least one output sample
    pad[1] = max(pad[1], fw - w * up[0] - pad[0])
    pad[3] = max(pad[3], fh - h * up[1] - pad[2])
    return dict(h=h, w=w, up=up, down=down, pad=tuple(pad), f=f,
                flip_filter=bool(rng.random() < 0.3), gain=float(rng.choice([1.0, 0.5, 4.0])))


@pytest.mark.parametrize("seed", range(60))
def test_ref_matches_numpy_definition(seed):
    rng = np.random.default_rng(seed)
    case = random_case(rng)
    x = rng.standard_normal((2, 3, case["h"], case["w"]))
    want = upfirdn2d_numpy(x, case["f"], case["up"], case["down"], case["pad"], case["flip_filter"], case["gain"])
    got = ops.upfirdn2d(torch.from_numpy(x), torch.from_numpy(case["f"]), case["up"], case["down"], case["pad"],
                        case["flip_filter"], case["gain"], impl="ref")
    assert got.shape == want.shape
    assert ops.output_size(case["h"], case["w"], torch.from_numpy(case["f"]), case["up"], case["down"], case["pad"]) \
        == want.shape[2:]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("up,down", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("size", [(5, 5), (6, 7), (1, 3)])
def test_stylegan_filter_odd_sizes(up, down, size):
    f = ops.setup_filter([1, 3, 3, 1])
    h, w = size
    for pad in [(2, 1, 2, 1), (1, 1, 1, 1), (0, 0, 0, 0), (3, -1, 2, 0)]:
        if ops.output_size(h, w, f, up, down, pad)[0] < 1 or ops.output_size(h, w, f, up, down, pad)[1] < 1:
            continue
        x = np.random.default_rng(0).standard_normal((1, 2, h, w))
        want = upfirdn2d_numpy(x, f.double().numpy(), (up, up), (down, down), pad)
        got = ops.upfirdn2d(torch.from_numpy(x), f.double(), up, down, pad, impl="ref")
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)


def test_separable_filter_equals_its_outer_product():
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    f1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64)
    for kw in [dict(up=2, pad=(3, 2)), dict(down=2, pad=(1, 2, 2, 1)), dict(up=(1, 2), down=(2, 1), pad=1)]:
        a = ops.upfirdn2d(x, f1, gain=3.0, impl="ref", **kw)
        b = ops.upfirdn2d(x, f1.outer(f1), gain=3.0, impl="ref", **kw)
        torch.testing.assert_close(a, b)


def test_resampling_helpers_keep_sizes_and_dc():
    """A normalized filter keeps a constant image constant in the interior, at the expected sizes."""
    f = ops.setup_filter([1, 3, 3, 1])
    x = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    up, down, same = ops.upsample2d(x, f), ops.downsample2d(x, f), ops.filter2d(x, f)
    assert up.shape[2:] == (16, 16) and down.shape[2:] == (4, 4) and same.shape[2:] == (8, 8)
    for y in (up, down, same):
        torch.testing.assert_close(y[..., 2:-2, 2:-2], torch.ones_like(y[..., 2:-2, 2:-2]))


def test_helpers_match_explicit_padding():
    f = ops.setup_filter([1, 3, 3, 1])
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(ops.upsample2d(x, f), ops.upfirdn2d(x, f, up=2, pad=(2, 1, 2, 1), gain=4))
    torch.testing.assert_close(ops.downsample2d(x, f), ops.upfirdn2d(x, f, down=2, pad=(1, 1, 1, 1)))
    torch.testing.assert_close(ops.filter2d(x, f), ops.upfirdn2d(x, f, pad=(2, 1, 2, 1)))


def test_bad_arguments_are_clear():
    f = ops.setup_filter([1, 3, 3, 1])
    with pytest.raises(ValueError, match="leaves no output"):
        ops.upfirdn2d(torch.randn(1, 1, 2, 2), f, pad=-2)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ops.upfirdn2d(torch.randn(3, 2, 2), f)
    with pytest.raises(ValueError, match="impl"):
        ops.upfirdn2d(torch.randn(1, 1, 4, 4), f, impl="triton")


@pytest.mark.parametrize("kw", [dict(up=2, pad=(2, 1)), dict(down=2, pad=1), dict(pad=(1, 2, 0, -1)),
                                dict(up=(2, 1), down=(1, 2), pad=(1, 0, 2, 1)), dict(up=2, down=2, pad=(-1, 2, 1, 0))])
@pytest.mark.parametrize("separable", [False, True])
def test_ref_gradcheck_and_gradgradcheck(kw, separable):
    f = ops.setup_filter([1, 2, 1], separable=separable).double()
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda x: ops.upfirdn2d(x, f, gain=2.0, impl="ref", **kw)  # noqa: E731
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


# ---------------------------------------------------------------------------------------------------
# CUDA: skipped without a GPU (run them on one with `python -m pytest tests -k cuda`)


@requires_cuda
@pytest.mark.parametrize("seed", range(20))
def test_cuda_matches_ref(seed):
    rng = np.random.default_rng(seed)
    case = random_case(rng)
    x = torch.from_numpy(rng.standard_normal((3, 4, case["h"], case["w"]))).float().cuda()
    f = torch.from_numpy(case["f"]).float().cuda()
    args = (case["up"], case["down"], case["pad"], case["flip_filter"], case["gain"])
    torch.testing.assert_close(ops.upfirdn2d(x, f, *args, impl="cuda"), ops.upfirdn2d(x, f, *args, impl="ref"),
                               rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_cuda_low_precision_and_layouts(dtype, layout):
    f = ops.setup_filter([1, 3, 3, 1], device="cuda")
    x = torch.randn(4, 8, 16, 16, device="cuda").to(dtype).contiguous(memory_format=layout)
    for fn in (ops.upsample2d, ops.downsample2d, ops.filter2d):
        got = fn(x, f, impl="cuda")
        want = fn(x.float(), f, impl="ref")
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@requires_cuda
@pytest.mark.parametrize("kw", [dict(up=2, pad=(2, 1)), dict(down=2, pad=1), dict(up=(2, 1), down=(1, 2), pad=(1, 0, 2, 1))])
def test_cuda_gradcheck_and_gradgradcheck(kw):
    f = ops.setup_filter([1, 3, 3, 1], device="cuda")
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    fn = lambda x: ops.upfirdn2d(x, f, impl="cuda", **kw)  # noqa: E731
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))
