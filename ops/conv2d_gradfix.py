"""conv2d and conv_transpose2d whose gradients are themselves cheap to differentiate.

R1 (grad of D w.r.t. its input, squared) and the path-length penalty (grad of G w.r.t. w) are trained
by differentiating a gradient: a double backward through every convolution. PyTorch's generic double
backward of a convolution is slow, grouped convolutions (StyleGAN2's modulated convs are grouped by
sample) and half precision worst of all. Here the derivatives are written out:

    y           = conv(x, w)
    dL/dx       = conv_transpose(dy, w)             (the same weight, the transposed op)
    dL/dw       = grad_weight(dy, x)                (aten.convolution_backward, weight part only)
    d(grad_weight)/d(dy) . G = conv(x, G)
    d(grad_weight)/d(x)  . G = conv_transpose(dy, G)

and each is again one of these Functions, so derivatives of any order reduce to ordinary forward
convolutions. Only public operators are used (F.conv2d, F.conv_transpose2d, torch.ops.aten.convolution_backward),
so there is no private cuDNN call and no PyTorch version list to keep up to date.

`no_weight_gradients()`: when R1 or path length take a gradient w.r.t. an input only, the weight
gradient of that first pass is waste; inside this context it is skipped (the second pass still gets
the weight gradients it needs through conv_transpose(dy, w)). Use it only where the inputs of that
gradient do not reach the output *through* a convolution weight: a fused modulated convolution (style
folded into a per-sample grouped weight) is such a case, and there the dropped weight gradient is
the very gradient w.r.t. the style. model.py modulates activations instead, so it is safe there.

`impl`: 'gradfix' (these Functions) or 'ref' (F.conv2d / F.conv_transpose2d, PyTorch's own derivatives).
None takes 'gradfix' for CUDA tensors unless SEMANTICGAN_OPS=ref, and 'ref' on the CPU, where gradfix
measured 0.77-1.18x PyTorch's speed (2026-11-25; `python benchmark.py --only gradfix` measures it): nothing to
gain there.
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
    if impl is None:
        return input.is_cuda and not ops_forced_to_ref()
    return impl == "gradfix"


@functools.lru_cache(maxsize=None)
def _conv2d_gradfix(transpose, weight_shape, stride, padding, output_padding, dilation, groups):
    """The autograd.Functions of one convolution configuration (cached: they are built once)."""
    common = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def forward_op(x, w, b):
        if transpose:
            return F.conv_transpose2d(x, w, b, output_padding=output_padding, **common)
        return F.conv2d(x, w, b, **common)

    def grad_input_op(input_shape, output_shape):
        """The convolution that maps the output's gradient back to the input (the transposed op)."""
        if transpose:
            return _conv2d_gradfix(False, weight_shape, stride, padding, (0, 0), dilation, groups)
        # the output_padding that makes the transposed convolution land exactly on the input size
        op = tuple(input_shape[i + 2] - (output_shape[i + 2] - 1) * stride[i] + 2 * padding[i]
                   - dilation[i] * (weight_shape[i + 2] - 1) - 1 for i in range(2))
        return _conv2d_gradfix(True, weight_shape, stride, padding, op, dilation, groups)

    class Conv2d(torch.autograd.Function):
        @staticmethod
        def forward(ctx, input, weight, bias):
            ctx.save_for_backward(input if weight.requires_grad else None, weight)
            ctx.input_shape = input.shape
            return forward_op(input, weight, bias)

        @staticmethod
        def backward(ctx, grad_output):
            input, weight = ctx.saved_tensors
            grad_input = grad_weight = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_input = grad_input_op(ctx.input_shape, grad_output.shape).apply(grad_output, weight, None)
            if ctx.needs_input_grad[1] and not _weight_gradients_disabled:
                grad_weight = Conv2dGradWeight.apply(grad_output, input, weight.detach())
            if ctx.needs_input_grad[2]:
                grad_bias = grad_output.sum([0, 2, 3])
            return grad_input, grad_weight, grad_bias

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
            grad2_grad_output = grad2_input = None
            if ctx.needs_input_grad[0]:
                grad2_grad_output = Conv2d.apply(input, grad2_grad_weight, None)
            if ctx.needs_input_grad[1]:
                grad2_input = grad_input_op(ctx.input_shape, grad_output.shape).apply(grad_output, grad2_grad_weight, None)
            return grad2_grad_output, grad2_input, None

    return Conv2d
