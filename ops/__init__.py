"""Low-level ops of StyleGAN2, each with a fused CUDA kernel and a reference in plain PyTorch.

    upfirdn2d(x, f, up, down, pad, ...)  upsample, pad, FIR-filter, downsample  (ops/upfirdn2d.py)
    upsample2d, downsample2d, filter2d   the three ways the networks use it
    bias_act(x, b, act, alpha, gain, clamp)  bias + activation + gain + clamp    (ops/bias_act.py)
    conv2d, conv_transpose2d, no_weight_gradients  convolutions with a cheap double backward (ops/conv2d_gradfix.py)

Every op takes `impl` ('cuda'/'gradfix' or 'ref'); SEMANTICGAN_OPS=ref forces the reference everywhere.
Importing this package compiles nothing: the CUDA kernels are built on first use with a CUDA tensor
(ops/cuda_loader.py) and checked against the reference before they are trusted.
"""

from .bias_act import ACTIVATIONS, bias_act
from .conv2d_gradfix import conv2d, conv_transpose2d, no_weight_gradients
from .upfirdn2d import downsample2d, filter2d, output_size, setup_filter, upfirdn2d, upsample2d

__all__ = ["ACTIVATIONS", "bias_act", "conv2d", "conv_transpose2d", "no_weight_gradients", "downsample2d",
           "filter2d", "output_size", "setup_filter", "upfirdn2d", "upsample2d"]
