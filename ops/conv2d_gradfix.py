"""conv2d and conv_transpose2d whose gradients are themselves cheap to differentiate.

R1 (|grad of D w.r.t. its input|^2) and path length (grad of G w.r.t. w) differentiate a gradient: a double
backward through every convolution. PyTorch's generic one is slow, worst for grouped convolutions (StyleGAN2's
modulated convs are grouped by sample) and half precision. Here the derivatives are written out:

    y = conv(x, w);  dL/dx = conv_transpose(dy, w);  dL/dw = grad_weight(dy, x)  (aten.convolution_backward)
    d(grad_weight)/d(dy) . G = conv(x, G);  d(grad_weight)/d(x) . G = conv_transpose(dy, G)

each again one of these Functions, so derivatives of any order are ordinary forward convolutions. Only public
operators are used: no private cuDNN call, no PyTorch version list to keep up to date.

`no_weight_gradients()`: when R1 or path length take a gradient w.r.t. an input only, the weight gradient of
that first pass is waste and is skipped (the second pass still gets its weight gradients through
conv_transpose(dy, w)). Only safe where the inputs do not reach the output *through* a weight: in a fused
modulated convolution (style folded into a grouped weight) the dropped gradient is the one w.r.t. the style.
model.py modulates activations instead.

`impl`: 'gradfix' (these Functions) or 'ref' (PyTorch's own derivatives). None takes 'gradfix' for CUDA
tensors unless SEMANTICGAN_OPS=ref, and 'ref' on the CPU, where gradfix measured 0.77-1.18x PyTorch's speed
(2026-11-25; `python benchmark.py --only gradfix`).
"""

import contextlib
import functools

import torch
import torch.nn.functional as F

from .cuda_loader import ops_forced_to_ref

_weight_gradients_disabled = False


@contextlib.contextmanager
def no_weight_gradients(disable=True):
    """Skip the weight gradients of gradfix convolutions in backward passes run inside this block."""
    global _weight_gradients_disabled
    old = _weight_gradients_disabled
    _weight_gradients_disabled = old or disable
    try:
        yield
    finally:
        _weight_gradients_disabled = old


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, impl=None):
    """F.conv2d with the arguments of F.conv2d (integer or pair stride/padding/dilation) plus `impl`."""
    if _use_gradfix(input, impl):
        return _conv2d_gradfix(False, tuple(weight.shape), _pair(stride), _pair(padding), (0, 0), _pair(dilation),
                               groups).apply(input, weight, bias)
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, impl=None):
    """F.conv_transpose2d with its arguments plus `impl`."""
    if _use_gradfix(input, impl):
        return _conv2d_gradfix(True, tuple(weight.shape), _pair(stride), _pair(padding), _pair(output_padding),
                               _pair(dilation), groups).apply(input, weight, bias)
    return F.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


def _use_gradfix(input, impl):
    if impl not in (None, "gradfix", "ref"):
        raise ValueError(f"impl must be 'gradfix', 'ref' or None, got {impl!r}")
    return impl == "gradfix" or (impl is None and input.is_cuda and not ops_forced_to_ref())


@functools.lru_cache(maxsize=None)
def _conv2d_gradfix(transpose, weight_shape, stride, padding, output_padding, dilation, groups):
    """The autograd.Functions of one convolution configuration."""
    common = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def transposed(input_shape, grad_output, weight):
        """The transposed convolution, which maps the output's gradient back to the input."""
        if transpose:
            op = _conv2d_gradfix(False, weight_shape, stride, padding, (0, 0), dilation, groups)
        else:  # with the output_padding that makes it land exactly on the input size
            out_pad = tuple(input_shape[i + 2] - (grad_output.shape[i + 2] - 1) * stride[i] + 2 * padding[i]
                            - dilation[i] * (weight_shape[i + 2] - 1) - 1 for i in range(2))
            op = _conv2d_gradfix(True, weight_shape, stride, padding, out_pad, dilation, groups)
        return op.apply(grad_output, weight, None)

    class Conv2d(torch.autograd.Function):
        @staticmethod
        def forward(ctx, input, weight, bias):
            ctx.save_for_backward(input if weight.requires_grad else None, weight)
            ctx.input_shape = input.shape
            if transpose:
                return F.conv_transpose2d(input, weight, bias, output_padding=output_padding, **common)
            return F.conv2d(input, weight, bias, **common)

        @staticmethod
        def backward(ctx, grad_output):
            input, weight = ctx.saved_tensors
            needs = ctx.needs_input_grad
            grad_input = transposed(ctx.input_shape, grad_output, weight) if needs[0] else None
            grad_weight = Conv2dGradWeight.apply(grad_output, input, weight.detach()) \
                if needs[1] and not _weight_gradients_disabled else None
            return grad_input, grad_weight, grad_output.sum([0, 2, 3]) if needs[2] else None

    class Conv2dGradWeight(torch.autograd.Function):
        @staticmethod
        def forward(ctx, grad_output, input, weight):
            ctx.save_for_backward(grad_output if input.requires_grad else None,
                                  input if grad_output.requires_grad else None)
            ctx.input_shape = input.shape
            _, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad_output, input, weight, None, stride, padding, dilation, transpose, output_padding, groups,
                [False, True, False])
            return grad_weight

        @staticmethod
        def backward(ctx, grad2_grad_weight):
            grad_output, input = ctx.saved_tensors
            needs = ctx.needs_input_grad
            return (Conv2d.apply(input, grad2_grad_weight, None) if needs[0] else None,
                    transposed(ctx.input_shape, grad_output, grad2_grad_weight) if needs[1] else None, None)

    return Conv2d
