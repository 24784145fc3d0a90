"""upfirdn2d: upsample, pad, FIR-filter, downsample, in one op (StyleGAN2's resampling, Karras et al. 2020, App. B).

For each image plane x of size H x W the op computes

    u = x with (up - 1) zeros inserted after every sample              (size H*up x W*up)
    p = u padded by (pad_x0, pad_x1, pad_y0, pad_y1)  (negative = crop)
    v = p (*) f                                                          (true convolution, "valid" part)
    y = gain * v[::down, ::down]

so out_h = (H*up + pad_y0 + pad_y1 - f_h) // down + 1. The filter is fixed (it gets no gradient); it is 2-D
[f_h, f_w], or 1-D [f_n] for a separable filter applied along both axes.

`impl='ref'` uses public PyTorch ops, so autograd gives every derivative order: upsampling is a depthwise
transposed convolution (the zero-inserted tensor is never materialised), downsampling a strided depthwise
convolution. 'cuda' is one fused kernel (upfirdn2d.cu) whose gradient is upfirdn2d again, with up and down
swapped, the filter flipped and the padding mirrored, so every derivative order is the same kernel.
"""

import functools

import torch
import torch.nn.functional as F

from .cuda_loader import kernel_ok, load_plugin, use_cuda, warn_once


def setup_filter(f, normalize=True, flip_filter=False, gain=1, separable=None, device=None):
    """Turn a list of taps (e.g. [1, 3, 3, 1]) into the float32 filter tensor the ops take.

    A 1-D list becomes a separable filter unless `separable=False` asks for its outer product.
    `normalize` scales the taps to sum to 1 over the 2-D footprint; `gain` multiplies that sum.
    """
    f = torch.as_tensor(1.0 if f is None else f, dtype=torch.float32)
    if f.ndim == 0:
        f = f[None]
    if separable is None:
        separable = f.ndim == 1 and f.numel() >= 8
    if f.ndim == 1 and not separable:
        f = f.outer(f)
    if normalize:
        f = f / f.sum()  # for a separable filter the 2-D footprint then sums to 1 as well
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f * (gain ** (f.ndim / 2))
    return f.to(device=device)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _parse_padding(pad):
    """int -> all four sides; (px, py) -> (px, px, py, py); or (x0, x1, y0, y1)."""
    if isinstance(pad, int):
        return (pad,) * 4
    pad = tuple(int(p) for p in pad)
    return (pad[0], pad[0], pad[1], pad[1]) if len(pad) == 2 else pad


def filter_size(f):
    """(f_w, f_h) of a 1-D (separable) or 2-D filter."""
    if f is None:
        return 1, 1
    return (f.shape[-1], f.shape[0]) if f.ndim == 2 else (f.shape[0], f.shape[0])


def output_size(in_h, in_w, f, up=1, down=1, pad=0):
    """(out_h, out_w) that upfirdn2d produces for an input of in_h x in_w."""
    (upx, upy), (downx, downy), (px0, px1, py0, py1) = _pair(up), _pair(down), _parse_padding(pad)
    fw, fh = filter_size(f)
    return (in_h * upy + py0 + py1 - fh) // downy + 1, (in_w * upx + px0 + px1 - fw) // downx + 1


def upfirdn2d(x, f, up=1, down=1, pad=0, flip_filter=False, gain=1, impl=None):
    """Upsample, pad, filter and downsample a batch of images.

    x: [N, C, H, W], any float dtype and memory format. f: [f_h, f_w] or separable [f_n] (float32, see
    `setup_filter`), or None for identity. up, down: integer factors, int or (x, y). pad: after upsampling,
    int, (pad_x, pad_y) or (x0, x1, y0, y1); negative crops. flip_filter: False convolves with f, True
    correlates (the gradient uses this). gain: scales the output. impl: 'cuda', 'ref' or None (= 'cuda' for
    CUDA tensors unless SEMANTICGAN_OPS=ref). Returns [N, C, out_h, out_w] as in `output_size`.
    """
    f = torch.ones([1, 1], dtype=torch.float32, device=x.device) if f is None else f
    up, down, pad = _pair(up), _pair(down), _parse_padding(pad)
    if not (isinstance(x, torch.Tensor) and x.ndim == 4):
        raise ValueError(f"upfirdn2d expects an [N, C, H, W] tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    if min(up) < 1 or min(down) < 1:
        raise ValueError(f"upfirdn2d: up and down must be >= 1, got up={up}, down={down}")
    out_h, out_w = output_size(x.shape[2], x.shape[3], f, up, down, pad)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"upfirdn2d: input {tuple(x.shape)} with up={up}, down={down}, pad={pad} "
                         f"and a {tuple(f.shape)} filter leaves no output")
    if use_cuda(x, impl) and kernel_ok("upfirdn2d_plugin", x.device, _self_check):
        return _upfirdn2d_cuda(up, down, pad, bool(flip_filter), float(gain)).apply(x, f)
    return _upfirdn2d_ref(x, f, up, down, pad, flip_filter, gain)


def _upfirdn2d_ref(x, f, up, down, pad, flip_filter, gain):
    """Reference path from public PyTorch ops; every derivative comes from autograd."""
    f = f.to(device=x.device, dtype=x.dtype)
    if f.ndim == 1:  # separable: one pass along x, then one along y, each with sqrt(gain)
        g = gain ** 0.5
        x = _upfirdn2d_ref_2d(x, f[None, :], (up[0], 1), (down[0], 1), pad[:2] + (0, 0), flip_filter, g)
        return _upfirdn2d_ref_2d(x, f[:, None], (1, up[1]), (1, down[1]), (0, 0) + pad[2:], flip_filter, g)
    return _upfirdn2d_ref_2d(x, f, up, down, pad, flip_filter, gain)


def _upfirdn2d_ref_2d(x, f, up, down, pad, flip_filter, gain):
    (upx, upy), (downx, downy), (px0, px1, py0, py1) = up, down, pad
    C = x.shape[1]
    fh, fw = f.shape
    f = f * gain
    if upx == 1 and upy == 1:
        # Pad (or crop), then a strided depthwise correlation with the flipped filter = convolution.
        x = _pad_or_crop(x, px0, px1, py0, py1)
        w = (f if flip_filter else f.flip([0, 1]))[None, None].expand(C, 1, fh, fw)
        return F.conv2d(x, w, stride=(downy, downx), groups=C)
    # conv_transpose2d(x, f, stride=up) is the full convolution of the zero-inserted x with f; the
    # padding then selects the window that starts f - 1 - pad0 samples in.
    w = (f.flip([0, 1]) if flip_filter else f)[None, None].expand(C, 1, fh, fw)
    x = F.conv_transpose2d(x, w, stride=(upy, upx), groups=C)
    x = _pad_or_crop(x, px0 - fw + 1, upx + px1 - fw, py0 - fh + 1, upy + py1 - fh)
    return x[:, :, ::downy, ::downx]


def _pad_or_crop(x, left, right, top, bottom):
    """Zero-pad the positive sides, then crop the negative ones (one F.pad would refuse a crop larger
    than the image even when the padding on the other side makes up for it)."""
    x = F.pad(x, [max(left, 0), max(right, 0), max(top, 0), max(bottom, 0)])
    return x[:, :, max(-top, 0):x.shape[2] - max(-bottom, 0), max(-left, 0):x.shape[3] - max(-right, 0)]


# The CUDA path
def _plugin():
    return load_plugin("upfirdn2d_plugin")


@torch.enable_grad()
@torch.autocast("cuda", enabled=False)
def _self_check(device):
    """Forward, backward and double backward of the kernel against 'ref' on tiny inputs, in float32."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    # (up, down, pad): the generator's upsampling, the discriminator's downsampling, plain filtering,
    # mixed factors per axis, and up + down with cropping.
    cases = [((2, 2), (1, 1), (2, 1, 2, 1)), ((1, 1), (2, 2), (1, 1, 1, 1)), ((1, 1), (1, 1), (1, 2, 0, 1)),
             ((2, 1), (1, 2), (1, 2, 2, 0)), ((2, 2), (2, 2), (-1, 2, 1, -2))]
    filters = [setup_filter([1, 3, 3, 1]), setup_filter([1, 2, 1], separable=True), torch.rand(3, 5, generator=gen)]
    for up, down, pad in cases:
        for f in filters:
            x = torch.randn(2, 3, 7, 6, generator=gen).to(device).requires_grad_(True)
            f = f.to(device)
            got = _value_grad_gradgrad(lambda x: _upfirdn2d_cuda(up, down, pad, False, 1.0).apply(x, f), x)
            want = _value_grad_gradgrad(lambda x: _upfirdn2d_ref(x, f, up, down, pad, False, 1.0), x)
            for name, a, b in zip(("forward", "backward", "double backward"), got, want):
                err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
                if not err < 1e-4:
                    warn_once("upfirdn2d-selfcheck",
                              f"the CUDA upfirdn2d disagrees with the reference ({name}, up={up}, down={down}, "
                              f"pad={pad}, filter {tuple(f.shape)}, relative error {err:.2e}); using the reference "
                              f"implementation for the rest of this run.")
                    return False
    return True


def _value_grad_gradgrad(fn, x):
    """y, dx for a fixed dy, and the derivative of |dx|^2 w.r.t. dy (the op is linear: its second
    derivative w.r.t. x is zero, so the double backward is exercised through the incoming gradient)."""
    y = fn(x)
    dy = torch.cos(torch.arange(y.numel(), device=y.device, dtype=y.dtype)).reshape(y.shape).requires_grad_(True)
    (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
    (ddy,) = torch.autograd.grad((dx * dx).sum(), dy)
    return y.detach(), dx.detach(), ddy


@functools.lru_cache(maxsize=None)
def _upfirdn2d_cuda(up, down, pad, flip_filter, gain):
    """An autograd.Function for one configuration; its backward is another instance of itself."""
    (upx, upy), (downx, downy), (px0, px1, py0, py1) = up, down, pad

    class Upfirdn2dCuda(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, f):
            ctx.in_size = x.shape[2:]
            ctx.f = f  # a constant; kept on ctx, not as a saved tensor, because it gets no gradient
            g = f if f.ndim == 2 else f.outer(f)
            # The kernel correlates; convolution with f is correlation with the flipped f. Gain goes in g.
            g = (g if flip_filter else g.flip([0, 1])) * gain
            g = g.to(device=x.device, dtype=torch.float32).contiguous()
            return _plugin().upfirdn2d(x, g, upx, upy, downx, downy, px0, px1, py0, py1)

        @staticmethod
        def backward(ctx, dy):
            fw, fh = filter_size(ctx.f)
            (in_h, in_w), (out_h, out_w) = ctx.in_size, dy.shape[2:]
            # The adjoint: swap up/down, flip the filter, pad so the output has the input's size.
            grad_pad = (fw - px0 - 1, in_w * upx - out_w * downx + px0 - upx + 1,
                        fh - py0 - 1, in_h * upy - out_h * downy + py0 - upy + 1)
            return _upfirdn2d_cuda(down, up, grad_pad, not flip_filter, gain).apply(dy, ctx.f), None

    return Upfirdn2dCuda


# The resampling helpers the networks use
def filter2d(x, f, padding=0, flip_filter=False, gain=1, impl=None):
    """Filter with f at the same resolution; `padding` is added to the size-preserving padding."""
    fw, fh = filter_size(f)
    px0, px1, py0, py1 = _parse_padding(padding)
    p = [px0 + fw // 2, px1 + (fw - 1) // 2, py0 + fh // 2, py1 + (fh - 1) // 2]
    return upfirdn2d(x, f, pad=p, flip_filter=flip_filter, gain=gain, impl=impl)


def upsample2d(x, f, up=2, padding=0, flip_filter=False, gain=1, impl=None):
    """Upsample by `up` with f as the interpolation filter: H x W -> H*up x W*up (plus padding).

    The gain is multiplied by up**2 so that a normalized filter keeps the signal's mean.
    """
    upx, upy = _pair(up)
    fw, fh = filter_size(f)
    px0, px1, py0, py1 = _parse_padding(padding)
    p = [px0 + (fw + upx - 1) // 2, px1 + (fw - upx) // 2, py0 + (fh + upy - 1) // 2, py1 + (fh - upy) // 2]
    return upfirdn2d(x, f, up=up, pad=p, flip_filter=flip_filter, gain=gain * upx * upy, impl=impl)


def downsample2d(x, f, down=2, padding=0, flip_filter=False, gain=1, impl=None):
    """Low-pass filter with f, then keep every `down`-th sample: H x W -> H/down x W/down (plus padding)."""
    downx, downy = _pair(down)
    fw, fh = filter_size(f)
    px0, px1, py0, py1 = _parse_padding(padding)
    p = [px0 + (fw - downx + 1) // 2, px1 + (fw - downx) // 2, py0 + (fh - downy + 1) // 2, py1 + (fh - downy) // 2]
    return upfirdn2d(x, f, down=down, pad=p, flip_filter=flip_filter, gain=gain, impl=impl)
