"""bias_act: y = clamp(act(x + b) * gain, -clamp, clamp), in one op.

StyleGAN2 follows every (modulated) convolution and equalized-lr linear layer with this: leaky ReLU (alpha
0.2) with gain sqrt(2), which keeps unit variance through the layer (Karras et al. 2020, App. B), or linear
with gain 1. The clamp guards fp16 activations in the high-resolution layers.

`impl='ref'` uses public PyTorch ops (autograd gives every derivative order); 'cuda' one elementwise kernel
(bias_act.cu) each for the forward pass, the gradient and the second derivative, wired as autograd Functions
whose backward is again such a Function, so the second derivative R1 and path length need is exact. For
linear, relu and lrelu the gradient comes from the output's sign, so the input is not kept for backward.
"""

import functools

import torch
import torch.nn.functional as F

from .cuda_loader import kernel_ok, load_plugin, use_cuda, warn_once

# name: (kernel id, default alpha, default gain, whether the gradient can be computed from the output)
ACTIVATIONS = {
    "linear": (1, 0.0, 1.0, True),
    "relu": (2, 0.0, 2 ** 0.5, True),
    "lrelu": (3, 0.2, 2 ** 0.5, True),
    "tanh": (4, 0.0, 1.0, False),
    "sigmoid": (5, 0.0, 1.0, False),
}


def bias_act(x, b=None, dim=1, act="linear", alpha=None, gain=None, clamp=None, impl=None):
    """Fused bias, activation, gain and clamp; returns a tensor of x's shape, dtype and memory format.

    x: any shape and float dtype. b: None or a vector of x.shape[dim] values (dim 1 = channels).
    act: a key of ACTIVATIONS. alpha: the negative slope of 'lrelu' (default 0.2). gain: positive; None takes
    the activation's default (sqrt(2) for relu and lrelu, else 1). clamp: None or negative disables it.
    impl: 'cuda', 'ref' or None (= 'cuda' for CUDA tensors unless SEMANTICGAN_OPS=ref).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"bias_act: unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)}")
    _, default_alpha, default_gain, _ = ACTIVATIONS[act]
    alpha = float(default_alpha if alpha is None else alpha)
    gain = float(default_gain if gain is None else gain)
    clamp = float(-1 if clamp is None else clamp)
    if gain <= 0:
        raise ValueError(f"bias_act: gain must be positive, got {gain}")
    if b is not None and (b.ndim != 1 or b.shape[0] != x.shape[dim]):
        raise ValueError(f"bias_act: b has shape {tuple(b.shape)}, expected [{x.shape[dim]}] (x.shape[{dim}])")
    if use_cuda(x, impl) and kernel_ok("bias_act_plugin", x.device, _self_check):
        b = None if b is None else b.to(x.dtype)  # a differentiable cast, so b's gradient comes back in b's dtype
        return _bias_act_cuda(dim % x.ndim, act, alpha, gain, clamp).apply(x, b)
    return _bias_act_ref(x, b, dim, act, alpha, gain, clamp)


def _bias_act_ref(x, b, dim, act, alpha, gain, clamp):
    if b is not None:
        x = x + b.to(x.dtype).reshape([-1 if i == dim % x.ndim else 1 for i in range(x.ndim)])
    x = {"linear": lambda t: t, "relu": F.relu, "lrelu": lambda t: F.leaky_relu(t, alpha),
         "tanh": torch.tanh, "sigmoid": torch.sigmoid}[act](x)
    x = x * gain if gain != 1 else x
    return x.clamp(-clamp, clamp) if clamp >= 0 else x


def _plugin():
    return load_plugin("bias_act_plugin")


@torch.enable_grad()
@torch.autocast("cuda", enabled=False)
def _self_check(device):
    """Forward, gradient and second derivative of every activation against 'ref', in float32."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    for act, (_, alpha, gain, _) in ACTIVATIONS.items():
        for clamp, layout in ((None, torch.contiguous_format), (0.7, torch.channels_last)):
            x0 = torch.randn(2, 5, 3, 4, generator=gen).to(device).contiguous(memory_format=layout)
            b0 = torch.randn(5, generator=gen).to(device)
            config = (1, act, alpha, gain, -1.0 if clamp is None else clamp)
            results = []
            for fn in (_bias_act_cuda(*config).apply, lambda x, b: _bias_act_ref(x, b, *config)):
                x, b = x0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
                y = fn(x, b)
                dy = torch.cos(torch.arange(y.numel(), device=device, dtype=y.dtype)).reshape(y.shape)
                dy.requires_grad_(True)  # so the double backward is also checked w.r.t. the incoming gradient
                dx, db = torch.autograd.grad(y, [x, b], dy, create_graph=True)
                second = torch.autograd.grad((dx ** 2).sum() + (db ** 2).sum(), [x, b, dy], allow_unused=True)
                second = [torch.zeros_like(t) if g is None else g for g, t in zip(second, (x, b, dy))]
                results.append([t.detach() for t in (y, dx, db, *second)])
            for name, a, want in zip(("forward", "dx", "db", "ddx", "ddb", "ddy"), *results):
                err = (a - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
                if not err < 1e-4:
                    warn_once("bias_act-selfcheck", f"the CUDA bias_act disagrees with the reference ({act}, "
                              f"clamp={clamp}, {name}, relative error {err:.2e}); using the reference implementation "
                              f"for the rest of this run.")
                    return False
    return True


@functools.lru_cache(maxsize=None)
def _empty(device, dtype):
    """A zero-element tensor standing for 'absent' in the kernel's argument list."""
    return torch.empty([0], device=device, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _bias_act_cuda(dim, act, alpha, gain, clamp):
    """autograd.Functions for one configuration: forward, gradient (itself differentiable), second derivative."""
    act_id, _, _, grad_from_y = ACTIVATIONS[act]

    def kernel(x, b, xref, yref, dy, mode):  # None = absent
        b, xref, yref, dy = (_empty(x.device, x.dtype) if t is None else t for t in (b, xref, yref, dy))
        return _plugin().bias_act(x, b, xref, yref, dy, mode, act_id, dim, alpha, gain, clamp)

    def sum_to_bias(t):
        return t.sum([i for i in range(t.ndim) if i != dim])

    class BiasActCuda(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, b):
            y = kernel(x, b, None, None, None, 0)
            ctx.save_for_backward(None if grad_from_y else x, b, y if grad_from_y else None)  # what the gradient reads
            return y

        @staticmethod
        def backward(ctx, dy):
            dx = BiasActGradCuda.apply(dy, *ctx.saved_tensors)
            return dx, sum_to_bias(dx) if ctx.needs_input_grad[1] else None

    class BiasActGradCuda(torch.autograd.Function):
        @staticmethod
        def forward(ctx, dy, x, b, y):
            dy = dy.contiguous(memory_format=_memory_format(y if grad_from_y else x))
            ctx.save_for_backward(dy, x, b, y)
            return kernel(dy, b, x, y, None, 1)

        @staticmethod
        def backward(ctx, d_dx):
            dy, x, b, y = ctx.saved_tensors
            d_dy = BiasActGradCuda.apply(d_dx, x, b, y) if ctx.needs_input_grad[0] else None
            d_x = d_b = None
            if not grad_from_y and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):  # else it is zero
                d_x = kernel(d_dx.contiguous(memory_format=_memory_format(x)), b, x, y, dy, 2)
                d_b = sum_to_bias(d_x) if ctx.needs_input_grad[2] else None
            return d_dy, d_x, d_b, None

    return BiasActCuda


def _memory_format(t):
    return torch.channels_last if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous() else torch.contiguous_format
