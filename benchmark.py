"""Every speed figure README's Performance section asks for, in one run, from the project's own code.

    python benchmark.py                    # on a GPU: every figure at 256 px, batch 16, in under 10 minutes
    python benchmark.py --tiny             # tiny sizes on the CPU: shows that every part runs
    python benchmark.py --only ops,stage1  # some of the parts

The parts: the fused CUDA ops against their references (ops/: accuracy to second order, time, bandwidth);
gradfix's double backward in R1 on D_r and the path length on G; G, D_r and D_m forward+backward; a stage-1
step with every regulariser at its real frequency (train_gan.train_step; the official code: 43.6 img/s, 11.5
GiB); the data streams; a stage-2 step (train_encoder.train_step); the inversion (invert.invert, --steps 100)
at batch 1 and at its best batch. Times are medians (CUDA events on a GPU, perf_counter on a CPU) after
warm-up runs that absorb building the kernels and cuDNN's autotuning; SEMANTICGAN_OPS=ref switches to the
reference ops per measurement. The rows printed last are README's table, to paste with the date and GPU.
"""

import argparse
import contextlib
import datetime
import math
import os
import random
import statistics
import time

import torch

import cli
import data
import invert
import losses
import model
import ops
import train_encoder
import train_gan

# ----------------------------------------------------------------------------------------------------
# Timing


def median_seconds(fn, device, iters, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


@contextlib.contextmanager
def ops_impl(impl):
    """The networks' ops as `impl`: 'cuda' (the fused kernels and gradfix, the default on a GPU) or 'ref'."""
    before = os.environ.get("SEMANTICGAN_OPS")
    os.environ["SEMANTICGAN_OPS"] = "ref" if impl == "ref" else ""
    try:
        yield
    finally:
        os.environ["SEMANTICGAN_OPS"] = before or ""


def peak_memory(device, fn):
    """(fn()'s result, the peak GiB allocated while it ran; nan on the CPU)."""
    if device.type != "cuda":
        return fn(), float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) / 2 ** 30


def gib(peak):
    return f", {peak:.1f} GiB" if math.isfinite(peak) else ""


def synthetic(s):
    """A batch as both training steps take it: unlabeled images, labeled images, their masks."""
    return (torch.randn(s.batch, 3, s.resolution, s.resolution, device=s.device),
            torch.randn(s.batch, 3, s.resolution, s.resolution, device=s.device),
            torch.randint(0, s.classes, (s.batch, s.resolution, s.resolution), device=s.device))


def relative_error(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


# ----------------------------------------------------------------------------------------------------
# The parts; each returns rows (what, figure) for README's table


def part_ops(s):
    """bias_act (lrelu) and up/down-sampling (upfirdn2d) on the generator's shapes at each resolution: the
    fused kernel against the reference (forward, gradient, double backward, in fp32 with TF32 off, so that a
    TF32 reference convolution is not taken for the kernel's error), and forward+backward time against the
    least traffic (x, dx, y, dy, and the y bias_act keeps) as a share of a device copy's bandwidth."""
    f = ops.setup_filter([1, 3, 3, 1], device=s.device)
    run = {"bias_act": lambda x, b, impl: ops.bias_act(x, b, act="lrelu", gain=math.sqrt(2), impl=impl),
           "upsample2d": lambda x, b, impl: ops.upsample2d(x, f, up=2, impl=impl),
           "downsample2d": lambda x, b, impl: ops.downsample2d(x, f, down=2, impl=impl)}
    copy = torch.randn(2 ** 26 if s.gpu else 2 ** 22, device=s.device)
    copy_rate = 2 * copy.numel() * 4 / median_seconds(lambda: copy.clone(), s.device, s.iters, s.warmup)
    impls = ("cuda", "ref") if s.gpu else ("ref",)
    worst, percent, speedups, fell_back = 0.0, {}, [], set()
    for r in (2 ** k for k in range(3, int(math.log2(s.resolution)) + 1)):
        C = model.stylegan_channels(r, 2, s.max_channels)
        for name, op in run.items():
            side = r // 2 if name == "upsample2d" else r
            x = torch.randn(s.batch, C, side, side, device=s.device, requires_grad=True)
            b = torch.randn(C, device=s.device, requires_grad=True) if name == "bias_act" else None
            inputs, dy = [t for t in (x, b) if t is not None], torch.randn_like(op(x, b, "ref"))
            seconds, results = {}, {}
            with torch.backends.cudnn.flags(allow_tf32=False):
                for impl in impls:
                    y = op(x, b, impl)
                    fell_back |= {name} if impl == "cuda" and "Cuda" not in type(y.grad_fn).__name__ else set()
                    (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
                    results[impl] = (y, dx, torch.autograd.grad(dx.square().sum(), x, allow_unused=True)[0])
            for impl in impls:
                seconds[impl] = median_seconds(lambda: torch.autograd.grad(op(x, b, impl), inputs, dy), s.device,
                                               s.iters, s.warmup)
                traffic = (2 * x.numel() + (3 if name == "bias_act" else 2) * dy.numel()) * 4
                percent.setdefault((name, impl), []).append(100 * traffic / seconds[impl] / copy_rate)
            if s.gpu:
                worst = max([worst] + [relative_error(u, v) for u, v in zip(results["cuda"], results["ref"])
                                       if u is not None and v is not None])
                speedups.append(f"{name} {r} px {seconds['ref'] / seconds['cuda']:.2f}x")
    note = f" (the {', '.join(sorted(fell_back))} kernel fell back to the reference)" if fell_back else ""
    rows = [("cuda vs ref max relative error, forward / backward / double backward",
             f"{worst:.1e}{note}" if s.gpu else "needs a GPU")]
    for name in run:
        rows.append((f"{name} bandwidth, forward+backward, % of copy bandwidth ({impls[0]})",
                     f"{max(percent[name, impls[0]]):.0f}% at the best shape"))
    rows.append(("cuda vs ref speed-up per shape", ", ".join(speedups) if speedups else "needs a GPU"))
    return rows


def tiny_networks(s):
    G = model.Generator(s.resolution, s.classes, 3, max_channels=s.max_channels).to(s.device)
    D_r = model.ImageDiscriminator(s.resolution, 3, max_channels=s.max_channels).to(s.device)
    D_m = model.MaskDiscriminator(3, s.classes, base_channels=min(64, s.max_channels),
                                  max_channels=s.max_channels).to(s.device)
    return G, D_r, D_m


def part_gradfix(s):
    """R1 on D_r (a double backward through its convolutions) and the path length on G, gradfix against
    PyTorch's own double backward, in fp32 and under fp16 autocast."""
    G, D_r, _ = tiny_networks(s)
    images = torch.randn(s.batch, 3, s.resolution, s.resolution, device=s.device)
    z = torch.randn(max(1, s.batch // 2), G.style_dim, device=s.device)
    rows = []
    for dtype in (torch.float32, torch.float16) if s.gpu else (torch.float32,):
        def r1():
            x = images.detach().requires_grad_(True)
            with torch.autocast(s.device.type, dtype=dtype, enabled=dtype != torch.float32):
                penalty = losses.r1_penalty(D_r(x).float().sum(), x)
            penalty.backward()

        def path_length():
            with torch.autocast(s.device.type, dtype=dtype, enabled=dtype != torch.float32):
                fake, _, w_plus = G([z], return_latents=True)
            penalty, _, _ = losses.path_length_penalty(fake.float(), w_plus, torch.zeros((), device=s.device))
            penalty.backward()

        for what, step in (("R1 on D_r", r1), ("path length on G", path_length)):
            times = {}
            for impl in ("cuda", "ref"):
                with ops_impl(impl):
                    times[impl] = median_seconds(step, s.device, s.iters, s.warmup)
            rows.append((f"conv2d gradfix vs PyTorch double backward, {what}, {str(dtype)[6:]}",
                         f"{times['cuda'] * 1000:.1f} ms vs {times['ref'] * 1000:.1f} ms "
                         f"({times['ref'] / times['cuda']:.2f}x)"))
    return rows


def part_networks(s):
    G, D_r, D_m = tiny_networks(s)
    z = torch.randn(s.batch, G.style_dim, device=s.device)
    image = torch.randn(s.batch, 3, s.resolution, s.resolution, device=s.device)
    mask = torch.rand(s.batch, s.classes, s.resolution, s.resolution, device=s.device)
    steps = {"G": lambda: sum(t.float().mean() for t in G(z)).backward(),
             "D_r": lambda: D_r(image).sum().backward(),
             "D_m": lambda: sum(scale[-1].mean() for scale in D_m(image, mask)).backward()}
    cells = []
    for name, step in steps.items():
        times = {}
        for impl in ("cuda", "ref"):
            with ops_impl(impl):
                times[impl] = median_seconds(step, s.device, s.iters, s.warmup) * 1000
        cells.append(f"{name} {times['cuda']:.1f} / {times['ref']:.1f} ms")
    return [(f"G / D_r / D_m forward+backward at {s.resolution} px, batch {s.batch}, cuda / ref ops", "; ".join(cells))]


def part_stage1(s):
    args = train_gan.parse_args(["--data", "demo", "--resolution", str(s.resolution), "--batch", str(s.batch),
                                 "--max-channels", str(s.max_channels)]
                                + (["--r1-every", "4", "--pl-every", "2"] if s.tiny else []))
    period = math.lcm(args.r1_every, args.pl_every)
    steps = max(period, s.steps // period * period)
    cells = []
    for precision in ("fp32", "bf16"):
        for impl in ("cuda", "ref"):
            with ops_impl(impl):
                torch.manual_seed(0)
                random.seed(0)
                G, G_ema, D_r, D_m = train_gan.build_networks(args, 3, s.classes, s.device)
                optimizers = train_gan.build_optimizers(args, G, D_r, D_m)
                args.precision = precision
                autocast, _ = model.make_autocast(args, s.device)
                state, batch = {"G_ema": G_ema, "mean_path_length": torch.zeros((), device=s.device)}, synthetic(s)
                for step in range(period):
                    train_gan.train_step(step, (G, D_r, D_m), optimizers, batch, args, state, autocast)

                def run():
                    began = time.perf_counter()
                    for step in range(period, period + steps):
                        train_gan.train_step(step, (G, D_r, D_m), optimizers, batch, args, state, autocast)
                    if s.gpu:
                        torch.cuda.synchronize(s.device)
                    return time.perf_counter() - began

                seconds, peak = peak_memory(s.device, run)
            cells.append(f"{precision} {impl} {steps * s.batch / seconds:.1f} img/s{gib(peak)}")
    return [(f"stage-1 training, {s.resolution} px, batch {s.batch}, {s.classes} classes, all regularisers",
             "; ".join(cells))]


def part_loader(s):
    args = argparse.Namespace(data=s.data, resolution=s.resolution, demo_length=max(64, 4 * s.batch),
                              num_classes=s.classes if s.data == "demo" else None)
    labeled, unlabeled, _ = data.build_datasets(args)
    cells = []
    for name, dataset in (("labeled", labeled), ("unlabeled", unlabeled)):
        loader = data.InfiniteLoader(dataset, s.batch, workers=data.default_workers() if s.gpu else 0)
        ready = lambda b: [t.to(s.device) for t in (b if isinstance(b, list) else [b])]  # noqa: E731
        seconds = median_seconds(lambda: ready(next(loader)), s.device, s.iters, s.warmup)
        cells.append(f"{name} {s.batch / seconds:.0f} img/s")
        loader.close()
    return [(f"loader throughput into GPU-ready batches ({s.data}, {s.resolution} px)", "; ".join(cells))]


def part_stage2(s):
    args = train_encoder.build_parser().parse_args(["--batch", str(s.batch), "--max-channels", str(s.max_channels)]
                                                  + (["--encoder-units", "1,1,1,1"] if s.tiny else []))
    G = model.Generator(s.resolution, s.classes, 3, max_channels=s.max_channels).to(s.device).eval()
    G.requires_grad_(False)
    E = model.Encoder(**train_encoder.encoder_config(args, G)).to(s.device)
    percept = losses.Perceptual("random").to(s.device)  # VGG's computation, untrained weights
    optimizers = (train_encoder.build_optimizer(args, E), train_encoder.build_optimizer(args, E))
    batch, cells = synthetic(s), []
    for precision in ("fp32", "bf16"):
        args.precision = precision
        autocast, _ = model.make_autocast(args, s.device)
        step = lambda: train_encoder.train_step(E, G, percept, optimizers, batch, args, (0.1, 0.3), autocast)  # noqa
        seconds, peak = peak_memory(s.device, lambda: median_seconds(step, s.device, s.iters, s.warmup))
        cells.append(f"{precision} {2 * s.batch / seconds:.1f} img/s{gib(peak)}")
    return [(f"stage-2 training, {s.resolution} px, batch {s.batch} unlabeled + {s.batch} labeled", "; ".join(cells))]


def part_inversion(s):
    args = invert.build_parser().parse_args(["x", "--steps", str(s.inversion_steps)])
    G = model.Generator(s.resolution, s.classes, 3, max_channels=s.max_channels).to(s.device).eval()
    E = model.Encoder(s.resolution, 3, G.style_dim, units=(1, 1, 1, 1) if s.tiny else (3, 4, 14, 3),
                      max_channels=s.max_channels).to(s.device).eval()
    G.requires_grad_(False), E.requires_grad_(False)
    percept = losses.Perceptual("random").to(s.device)
    autocast, _ = model.make_autocast(args, s.device)
    rates = {}
    for batch in s.inversion_batches:
        images = torch.rand(batch, 3, s.resolution, s.resolution, device=s.device) * 2 - 1
        seconds = median_seconds(lambda: invert.invert(G, E, percept, images, list(range(batch)), args, autocast),
                                 s.device, 1, 1)
        rates[batch] = batch / seconds
    best = max(rates, key=rates.get)
    return [(f"inversion, {s.resolution} px, {s.inversion_steps} steps: images/s at batch 1 and at the best batch",
             f"{rates[1]:.2f} at 1, {rates[best]:.2f} at {best} ({rates[best] / rates[1]:.1f}x)")]


PARTS = {"ops": part_ops, "gradfix": part_gradfix, "networks": part_networks, "stage1": part_stage1,
         "loader": part_loader, "stage2": part_stage2, "inversion": part_inversion}


# ----------------------------------------------------------------------------------------------------
# Command line


def settings(args):
    """What every part runs at: the paper's sizes on a GPU, tiny ones with --tiny."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.tiny
    return argparse.Namespace(device=device, gpu=device.type == "cuda", tiny=tiny, classes=8, data=args.data,
                              resolution=32 if tiny else 256, batch=2 if tiny else 16,
                              max_channels=16 if tiny else 512, iters=2 if tiny else 20, warmup=1 if tiny else 5,
                              steps=4 if tiny else 64, inversion_steps=2 if tiny else 100,
                              inversion_batches=(1, 2) if tiny else (1, 4, 8, 16, 32))


def build_parser():
    p = cli.ArgumentParser(description="Every speed figure of README's Performance section, from the project's "
                            "own code; prints the rows to paste.")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (32 px, narrow networks, batch 2): shows on a "
                   "CPU that every part runs")
    p.add_argument("--only", type=cli.choice_list(tuple(PARTS)), default=",".join(PARTS), help="the parts to run")
    p.add_argument("--data", default="demo", help="the data the loader part reads (a folder, or demo)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if there is one)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    s = settings(args)
    torch.backends.cudnn.benchmark = s.gpu
    name = torch.cuda.get_device_name(s.device) if s.gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"semanticgan benchmark on {name}, torch {torch.__version__}, {datetime.date.today()}: {s.resolution} px, "
          f"batch {s.batch}{' (tiny)' if s.tiny else ''}", flush=True)
    rows = []
    for part in args.only:
        began = time.time()
        rows += PARTS[part](s)
        print(f"{part}: {time.time() - began:.0f} s", flush=True)
    print("\n| what | figure | measured |\n|---|---|---|")
    for what, figure in rows:
        print(f"| {what} | {figure} | {name}, {datetime.date.today()}, `python benchmark.py` |")
    return rows


if __name__ == "__main__":
    main()
