"""Benchmark of the low-level ops: the fused CUDA kernels against their plain-PyTorch references.

What is measured, on the shapes a StyleGAN2 generator of resolution --res and batch --batch meets
(for every resolution r from 8 to res, with the generator's channel count C_r at r):

    bias_act      lrelu, gain sqrt(2), bias of C_r   on [B, C_r, r, r]
    upsample2d    up 2, the 4x4 filter [1,3,3,1]      [B, C_r, r/2, r/2] -> [B, C_r, r, r]     (generator)
    downsample2d  down 2, the same filter             [B, C_r, r, r] -> [B, C_r, r/2, r/2]     (discriminator)

1. Accuracy (only when impl 'cuda' is measured): cuda against ref in float32, with TF32 off, as the
   maximum relative error max|a - b| / max|b| of the forward output, the gradients (dx, and db for
   bias_act), and the double backward: the gradients of sum(dx**2) with respect to x and to dy.
2. Timing: median forward and median forward+backward time (backward with a fixed random dy) over
   --iters runs after --warmup runs; CUDA runs are timed with CUDA events (synchronising after each
   run), CPU runs with time.perf_counter. Alongside: the bandwidth the op achieves on its minimal
   traffic (counted in `minimal_bytes`), as GB/s and as a percentage of the device's measured copy
   bandwidth, and the speedup of cuda over ref.
3. conv2d_gradfix: one double-backward step in the way the regularizers take it, for impl 'gradfix'
   against 'ref': (a) R1 on a discriminator-like stack of two 3x3 convolutions and (b) path length
   through a StyleGAN2 modulated (grouped) convolution; median time of forward + first gradient +
   second backward, the speedup, and the largest relative difference of the weight gradients.

Usage:
    python -m ops.benchmark                                     # H100: res 256, batch 16, impls cuda and ref
    python -m ops.benchmark --device cpu --res 32 --batch 2 --quick
    python -m ops.benchmark --dtype float16 --json bench.json
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import ops

OPS = ("bias_act", "upsample2d", "downsample2d")
# upsample2d and downsample2d are both upfirdn2d: one kernel, one availability check
KERNEL_OF_OP = {"bias_act": "bias_act", "upsample2d": "upfirdn2d", "downsample2d": "upfirdn2d"}
LRELU_GAIN = math.sqrt(2)
ACCURACY_COLUMNS = ("forward", "dx", "db", "ddx", "ddy")  # what op_derivatives returns, compared one by one
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------
# Shapes


def generator_channels(r, channel_multiplier):
    """Feature maps of the StyleGAN2 generator at resolution r (rosinality's table)."""
    cm = channel_multiplier
    return {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm, 256: 64 * cm, 512: 32 * cm,
            1024: 16 * cm}[r]


def op_cases(res, batch, channel_multiplier, quick):
    """One dict per (op, resolution): the op's name, r, C_r and its input and output shapes."""
    resolutions = [2 ** k for k in range(3, int(math.log2(res)) + 1)]
    if quick:
        # the smallest shapes show the per-call overhead, the largest the bandwidth; the middle adds little
        resolutions = sorted({resolutions[0], resolutions[-1]})
    cases = []
    for r in resolutions:
        C = generator_channels(r, channel_multiplier)
        big, small = [batch, C, r, r], [batch, C, r // 2, r // 2]
        cases.append(dict(op="bias_act", r=r, C=C, in_shape=big, out_shape=big))
        cases.append(dict(op="upsample2d", r=r, C=C, in_shape=small, out_shape=big))
        cases.append(dict(op="downsample2d", r=r, C=C, in_shape=big, out_shape=small))
    return sorted(cases, key=lambda c: (OPS.index(c["op"]), c["r"]))


def minimal_bytes(case, element_size):
    """Least traffic (bytes read + written) of the forward and of forward+backward.

    forward:          read x, write y (bias_act also reads b).
    forward+backward: the forward, then read dy, read the tensor kept for backward, write dx
                      (bias_act also writes db). The kept tensor is y for bias_act (the CUDA kernel takes
                      lrelu's slope from y's sign) and nothing for upfirdn2d, which is linear: its backward
                      needs only the constant filter.
    Filters, and db's reduction scratch, are too small to count.
    """
    n_in, n_out = math.prod(case["in_shape"]), math.prod(case["out_shape"])
    n_bias = case["C"] if case["op"] == "bias_act" else 0
    n_kept = n_out if case["op"] == "bias_act" else 0
    forward = n_in + n_out + n_bias
    backward = n_out + n_kept + n_in + n_bias
    return forward * element_size, (forward + backward) * element_size


# ----------------------------------------------------------------------------------------------------
# Running the ops


def make_inputs(case, device, dtype, seed=0):
    """x, b (None for the resampling ops) and a fixed dy, all requiring grad; the same for every impl."""
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(case["in_shape"], generator=gen, device=device, dtype=dtype)
    dy = torch.randn(case["out_shape"], generator=gen, device=device, dtype=dtype)
    b = torch.randn(case["C"], generator=gen, device=device, dtype=dtype) if case["op"] == "bias_act" else None
    return [None if t is None else t.requires_grad_(True) for t in (x, b, dy)]


def apply_op(op, impl, x, b, f):
    if op == "bias_act":
        return ops.bias_act(x, b, dim=1, act="lrelu", alpha=0.2, gain=LRELU_GAIN, impl=impl)
    if op == "upsample2d":
        return ops.upsample2d(x, f, up=2, impl=impl)
    if op == "downsample2d":
        return ops.downsample2d(x, f, down=2, impl=impl)
    raise ValueError(op)


def cuda_kernel_status(device, filt):
    """{kernel: None if the fused kernel runs on `device`, else the reason it does not}.

    An op asked for impl='cuda' silently takes the reference path when its kernel cannot be built or
    fails its self-check; timing that as 'cuda' would be wrong, so each kernel is tried once here and
    recognised by its own autograd Function on the output.
    """
    status = {}
    for op in OPS:
        kernel = KERNEL_OF_OP[op]
        if kernel in status:
            continue
        x, b, _ = make_inputs(dict(op=op, C=4, in_shape=[1, 4, 8, 8], out_shape=[1, 4, 8, 8]), device, torch.float32)
        try:
            y = apply_op(op, "cuda", x, b, filt)
        except Exception as e:  # noqa: BLE001 - reported in the output; the other kernel is still measured
            status[kernel] = f"raised {type(e).__name__}: {e}"
            continue
        ran_kernel = "Cuda" in type(y.grad_fn).__name__  # BiasActCudaBackward / Upfirdn2dCudaBackward
        status[kernel] = None if ran_kernel else "fell back to the reference (see the warning above)"
    return status


def grads_or_zeros(outputs, inputs, grad_outputs=None, create_graph=False):
    """autograd.grad where an input the outputs do not depend on gets zeros instead of an error."""
    grads = torch.autograd.grad(outputs, inputs, grad_outputs, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


# ----------------------------------------------------------------------------------------------------
# Timing


def median_seconds(fn, iters, warmup, device):
    """Median wall time of fn() over `iters` runs, after `warmup` runs (which absorb build and autotuning)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)  # one run at a time: no overlap between runs inflates or hides cost
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, iters, warmup):
    """Bytes per second of dst.copy_(src) on a large tensor (read + write = 2 x its size): the roofline."""
    nbytes = (256 if device.type == "cuda" else 32) * 2 ** 20
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), iters, warmup, device)


@contextlib.contextmanager
def full_float32():
    """TF32 off for the duration: a TF32 convolution in 'ref' would look like an error of the CUDA kernel."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def relative_error(a, b):
    """max|a - b| / max|b|, in float64 on the host; 0 when both are exactly zero."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


# ----------------------------------------------------------------------------------------------------
# 1. Accuracy of the CUDA kernels


def op_derivatives(case, impl, device, filt):
    """Forward, gradients and double-backward gradients of one op, in float32.

    The double backward differentiates sum(dx**2), the shape of R1, with respect to x and to dy. Both ops
    are linear (upfirdn2d) or piecewise linear (lrelu) in x, so d/dx is zero and the term that carries
    the information is d/d(dy): R1's second pass reaches an op's backward through its incoming dy.
    """
    x, b, dy = make_inputs(case, device, torch.float32)
    y = apply_op(case["op"], impl, x, b, filt)
    first_inputs = [x] if b is None else [x, b]
    first = grads_or_zeros(y, first_inputs, dy, create_graph=True)
    dx = first[0]
    if dx.requires_grad:
        ddx, ddy = grads_or_zeros(dx.square().sum(), [x, dy])
    else:  # dx not connected to dy: a broken double backward, which the comparison with ref then shows
        ddx, ddy = torch.zeros_like(x), torch.zeros_like(dy)
    return dict(forward=y, dx=dx, db=first[1] if b is not None else None, ddx=ddx, ddy=ddy)


def accuracy_rows(cases, device, filt):
    rows = []
    with full_float32():
        for case in cases:
            got = op_derivatives(case, "cuda", device, filt)
            want = op_derivatives(case, "ref", device, filt)
            row = dict(table="accuracy", op=case["op"], r=case["r"], shape=case["in_shape"])
            for name in ACCURACY_COLUMNS:
                row[name] = None if want[name] is None else relative_error(got[name], want[name])
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# 2. Timing of the ops


def timing_rows(case, impls, device, dtype, iters, warmup, filt, copy_bytes_per_s):
    """One row per impl for one op and shape; the cuda row gets the speedups when ref was measured too."""
    forward_bytes, forward_backward_bytes = minimal_bytes(case, torch.empty([], dtype=dtype).element_size())
    x, b, dy = make_inputs(case, device, dtype)
    inputs = [x] if b is None else [x, b]
    dy = dy.detach()
    by_impl = {}
    for impl in impls:
        # x requires grad in both runs, as in training, so the forward also does its bookkeeping
        # for backward (the CUDA bias_act keeps y; autograd keeps what the reference's ops need).
        def forward():
            return apply_op(case["op"], impl, x, b, filt)

        def forward_backward():
            return torch.autograd.grad(apply_op(case["op"], impl, x, b, filt), inputs, dy)

        t_fwd = median_seconds(forward, iters, warmup, device)
        t_fwd_bwd = median_seconds(forward_backward, iters, warmup, device)
        by_impl[impl] = dict(
            table="timing", op=case["op"], r=case["r"], shape=case["in_shape"], impl=impl,
            forward_ms=t_fwd * 1e3, forward_GBps=forward_bytes / t_fwd / 1e9,
            forward_pct_copy=100 * forward_bytes / t_fwd / copy_bytes_per_s,
            fwd_bwd_ms=t_fwd_bwd * 1e3, fwd_bwd_GBps=forward_backward_bytes / t_fwd_bwd / 1e9,
            fwd_bwd_pct_copy=100 * forward_backward_bytes / t_fwd_bwd / copy_bytes_per_s,
            speedup_forward=None, speedup_fwd_bwd=None)
    if "cuda" in by_impl and "ref" in by_impl:
        cuda, ref = by_impl["cuda"], by_impl["ref"]
        cuda["speedup_forward"] = ref["forward_ms"] / cuda["forward_ms"]
        cuda["speedup_fwd_bwd"] = ref["fwd_bwd_ms"] / cuda["fwd_bwd_ms"]
    return list(by_impl.values())


# ----------------------------------------------------------------------------------------------------
# 3. conv2d_gradfix: the double backward of the regularizers


def r1_conv_stack_step(x, weights, dtype, impl):
    """R1 on two (3x3 conv + lrelu) layers: d(score)/dx, then the backward of its squared norm.

    The leaves are float32 and cast to `dtype` here, as in mixed-precision training, so that their
    gradients come back in float32.
    """
    for w in weights:
        w.grad = None
    h = x.to(dtype)
    for w in weights:
        h = F.leaky_relu(ops.conv2d(h, w.to(dtype), padding=1, impl=impl), 0.2)
    # Scaled by 1/sqrt(B*H*W) so that every tensor of the double backward stays within float16's range
    # (unscaled, the weight gradients grow with B*H*W and overflow float16 at batch 16 and 64x64).
    score = h.float().sum() / math.sqrt(h.shape[0] * h.shape[2] * h.shape[3])
    with ops.no_weight_gradients():  # R1 wants the gradient wrt the input only; the weight part is waste
        (grad_x,) = torch.autograd.grad(score, x, create_graph=True)
    grad_x.square().sum().backward()
    return [w.grad for w in weights]


def modulated_conv(x, style, base_weight, impl):
    """StyleGAN2's fused modulated 3x3 conv: a per-sample demodulated weight, applied as a grouped conv.

    The weight is modulated and demodulated in float32 (the sum of squares overflows float16) and only
    then cast to x's dtype.
    """
    B, C_in, H, W = x.shape
    C_out = base_weight.shape[0]
    w = base_weight[None] * style[:, None, :, None, None]  # [B, C_out, C_in, 3, 3]
    w = w * (w.square().sum([2, 3, 4], keepdim=True) + 1e-8).rsqrt()
    w = w.reshape(B * C_out, C_in, 3, 3).to(x.dtype)
    y = ops.conv2d(x.reshape(1, B * C_in, H, W), w, padding=1, groups=B, impl=impl)
    return y.reshape(B, C_out, H, W)


def path_length_step(x, style, base_weight, noise, dtype, impl):
    """Path length through one modulated conv: d(out . noise)/d(style), then the backward of its squared norm.

    No no_weight_gradients() here: the style reaches the output only through the conv's weight, so the
    weight gradient of the first pass *is* the gradient wanted (inside the block it would be dropped).
    """
    base_weight.grad = style.grad = None
    out = F.leaky_relu(modulated_conv(x.to(dtype), style, base_weight, impl), 0.2)
    (grad_style,) = torch.autograd.grad((out * noise.to(dtype)).float().sum(), style, create_graph=True)
    grad_style.square().sum().backward()
    return [base_weight.grad, style.grad]


def make_conv_case(kind, batch, channels, r, device, seed=0):
    """float32 leaf tensors for one step, weights scaled by 1/sqrt(fan_in) as StyleGAN2's equalized lr does."""
    gen = torch.Generator(device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(shape, generator=gen, device=device) * scale

    fan_in = channels * 9
    if kind == "r1_conv_stack":
        return dict(x=randn(batch, channels, r, r).requires_grad_(True),
                    weights=[randn(channels, channels, 3, 3, scale=fan_in ** -0.5).requires_grad_(True)
                             for _ in range(2)])
    return dict(x=randn(batch, channels, r, r),  # path length differentiates wrt the style only
                style=randn(batch, channels).requires_grad_(True),
                base_weight=randn(channels, channels, 3, 3, scale=fan_in ** -0.5).requires_grad_(True),
                noise=randn(batch, channels, r, r, scale=1 / r))  # StyleGAN2's pl_noise: randn / sqrt(H*W)


def run_conv_step(kind, leaves, dtype, impl):
    if kind == "r1_conv_stack":
        return r1_conv_stack_step(leaves["x"], leaves["weights"], dtype, impl)
    return path_length_step(leaves["x"], leaves["style"], leaves["base_weight"], leaves["noise"], dtype, impl)


def conv_rows(batch, channels, resolutions, dtypes, device, iters, warmup):
    rows = []
    for kind in ("r1_conv_stack", "path_length_modconv"):
        for dtype in dtypes:
            for r in resolutions:
                leaves = make_conv_case(kind, batch, channels, r, device)
                times = {impl: median_seconds(lambda: run_conv_step(kind, leaves, dtype, impl), iters, warmup, device)
                         for impl in ("gradfix", "ref")}
                with full_float32():  # the comparison, not the timing, runs without TF32
                    err = max(relative_error(a, b) for a, b in zip(run_conv_step(kind, leaves, dtype, "gradfix"),
                                                                     run_conv_step(kind, leaves, dtype, "ref")))
                rows.append(dict(table="conv2d_gradfix", case=kind, dtype=str(dtype).replace("torch.", ""),
                                 shape=[batch, channels, r, r], gradfix_ms=times["gradfix"] * 1e3,
                                 ref_ms=times["ref"] * 1e3, speedup=times["ref"] / times["gradfix"],
                                 weight_grad_rel_err=err))
    return rows


# ----------------------------------------------------------------------------------------------------
# Output


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(title, header, rows, left_columns=1):
    """Plain text, the first `left_columns` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i < left_columns else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    print(f"\n{title}")
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def shape_str(shape):
    return "x".join(str(s) for s in shape)


def environment(device, dtype):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()}"
    return dict(device=str(device), device_name=name, torch=torch.__version__, torch_cuda=torch.version.cuda,
                dtype=str(dtype).replace("torch.", ""), date=datetime.datetime.now().isoformat(timespec="seconds"),
                cudnn_benchmark=torch.backends.cudnn.benchmark, cudnn_tf32=torch.backends.cudnn.allow_tf32,
                semanticgan_ops=os.environ.get("SEMANTICGAN_OPS", ""))


def main(args):
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    on_gpu = device.type == "cuda"
    iters = args.iters if args.iters is not None else (50 if on_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    impls = [s.strip() for s in (args.impls or ("cuda,ref" if on_gpu else "ref")).split(",") if s.strip()]
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # as a training loop would set it; the warmup runs absorb the autotuning

    env = environment(device, dtype)
    for key, value in env.items():
        print(f"{key:16s} {value}")
    print(f"{'shapes':16s} StyleGAN2 generator at {args.res}, batch {args.batch}, channel multiplier "
          f"{args.channel_multiplier}{' (quick)' if args.quick else ''}; median of {iters} runs after {warmup}")

    filt = ops.setup_filter([1, 3, 3, 1], device=device)
    cases = op_cases(args.res, args.batch, args.channel_multiplier, args.quick)
    if "cuda" in impls and not on_gpu:
        print(f"note: impl 'cuda' needs a CUDA device; skipped on {device}")
        impls.remove("cuda")
    unusable_kernels = set()
    if "cuda" in impls:
        for kernel, problem in cuda_kernel_status(device, filt).items():
            if problem is not None:
                print(f"note: the CUDA {kernel} kernel is not usable ({problem}); its cuda rows are skipped")
                unusable_kernels.add(kernel)
    cuda_cases = [c for c in cases if KERNEL_OF_OP[c["op"]] not in unusable_kernels] if "cuda" in impls else []
    all_rows = []

    copy_bytes_per_s = copy_bandwidth(device, iters, warmup)
    print(f"{'copy bandwidth':16s} {copy_bytes_per_s / 1e9:.1f} GB/s (dst.copy_(src), bytes = 2 x size)")
    all_rows.append(dict(table="copy_bandwidth", GBps=copy_bytes_per_s / 1e9))

    if cuda_cases:
        rows = accuracy_rows(cuda_cases, device, filt)
        all_rows += rows
        print_table("Accuracy of cuda against ref, in float32 with TF32 off: max|cuda - ref| / max|ref| of\n"
                    "the forward, dx, db, and the double backward ddx = d sum(dx^2)/dx, ddy = d sum(dx^2)/d(dy)",
                    ["op", "input", *ACCURACY_COLUMNS],
                    [[r["op"], shape_str(r["shape"])] + [fmt(r[k], ".1e") for k in ACCURACY_COLUMNS] for r in rows],
                    left_columns=2)

    rows = []
    for case in cases:
        case_impls = [i for i in impls if i != "cuda" or case in cuda_cases]
        rows += timing_rows(case, case_impls, device, dtype, iters, warmup, filt, copy_bytes_per_s)
    all_rows += rows
    print_table(f"Timing in {args.dtype}, median ms. GB/s = minimal bytes / time, where bytes are\n"
                "  fwd:     x read + y written (+ b read)\n"
                "  fwd+bwd: fwd + dy read + kept tensor read (y for bias_act, none for up/downsample) + dx written "
                "(+ db written)\n"
                "%copy = GB/s as a percentage of the copy bandwidth; x fwd, x f+b = speedup, ref time / cuda time",
                ["op", "input", "impl", "fwd ms", "GB/s", "%copy", "fwd+bwd ms", "GB/s", "%copy", "x fwd", "x f+b"],
                [[r["op"], shape_str(r["shape"]), r["impl"], fmt(r["forward_ms"], ".3f"), fmt(r["forward_GBps"], ".1f"),
                  fmt(r["forward_pct_copy"], ".0f"), fmt(r["fwd_bwd_ms"], ".3f"), fmt(r["fwd_bwd_GBps"], ".1f"),
                  fmt(r["fwd_bwd_pct_copy"], ".0f"), fmt(r["speedup_forward"], ".2f"), fmt(r["speedup_fwd_bwd"], ".2f")]
                 for r in rows], left_columns=3)

    conv_resolutions = args.conv_res or ([32, 64] if on_gpu else [8, 16])
    conv_channels = args.conv_channels or (512 if on_gpu else 32)
    conv_dtypes = [torch.float32, torch.float16] if on_gpu else [torch.float32]  # nobody trains in float16 on a CPU
    rows = conv_rows(args.batch, conv_channels, conv_resolutions, conv_dtypes, device, iters, warmup)
    all_rows += rows
    print_table("conv2d_gradfix: median ms of forward + first gradient (create_graph) + second backward;\n"
                "speedup = ref ms / gradfix ms; weight-grad err = max relative difference of gradfix and ref\n"
                "(TF32 off; the leaves are float32, the convolutions run in the row's dtype)",
                ["case", "dtype", "input", "gradfix ms", "ref ms", "speedup", "weight-grad err"],
                [[r["case"], r["dtype"], shape_str(r["shape"]), fmt(r["gradfix_ms"], ".3f"), fmt(r["ref_ms"], ".3f"),
                  fmt(r["speedup"], ".2f"), fmt(r["weight_grad_rel_err"], ".1e")] for r in rows], left_columns=3)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, args=vars(args), iters=iters, warmup=warmup, rows=all_rows), f, indent=1)
        print(f"\nwrote {args.json}")


def at_least(low):
    """An argparse type: a whole number of at least `low`, checked when the command line is parsed."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"{text}: give a whole number of {low} or more")
        return value
    parse.low = low
    return parse


def sizes(text):
    """--conv-res: comma-separated whole numbers of 1 or more."""
    try:
        return [at_least(1)(v) for v in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text}: give comma-separated whole numbers of 1 or more") from None


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m ops.benchmark",
        description="Time and check the fused CUDA ops (bias_act, upsample2d, downsample2d) against their "
                    "references on StyleGAN2 generator shapes, and conv2d_gradfix's double backward.")
    parser.add_argument("--res", type=at_least(8), default=256,
                        help="generator resolution, a power of 2 from 8 to 1024 (default 256)")
    parser.add_argument("--batch", type=at_least(1), default=16, help="batch size (default 16)")
    parser.add_argument("--channel-multiplier", type=at_least(1), default=2,
                        help="StyleGAN2 channel multiplier (default 2)")
    parser.add_argument("--quick", action="store_true", help="only the smallest and the largest resolution")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the timed ops (default float32; accuracy is always checked in float32)")
    parser.add_argument("--iters", type=at_least(1), help="timed runs per measurement (default 50 on GPU, 5 on CPU)")
    parser.add_argument("--warmup", type=at_least(0), help="untimed runs before them (default 10 on GPU, 1 on CPU)")
    parser.add_argument("--impls", help="comma-separated subset of cuda,ref (default 'cuda,ref' on GPU, 'ref' on CPU)")
    parser.add_argument("--conv-res", type=sizes, help="comma-separated resolutions of the conv2d_gradfix table "
                                           "(default 32,64 on GPU, 8,16 on CPU)")
    parser.add_argument("--conv-channels", type=at_least(1),
                        help="channels of the conv2d_gradfix table (default 512 on GPU, 32 on CPU)")
    parser.add_argument("--json", metavar="PATH", help="also write every row to this JSON file")
    parser.error = lambda message: parser.exit(2, f"error: {message}\n")  # one line, not the whole usage
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.res < 8 or args.res > 1024 or args.res & (args.res - 1):
        parser.error("--res must be a power of 2 from 8 to 1024")
    unknown = set(s.strip() for s in (args.impls or "").split(",") if s.strip()) - {"cuda", "ref"}
    if unknown:
        parser.error(f"unknown impl(s) {sorted(unknown)}; choose from cuda, ref")
    return args


if __name__ == "__main__":
    main(parse_args())
