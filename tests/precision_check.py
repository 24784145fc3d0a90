"""bf16 autocast against fp32, one step of each stage at the same weights and on the same batch.

    python tests/precision_check.py --data demo --num-classes 3 --resolution 32 --max-channels 32
    python tests/precision_check.py --data ../shared/data/cxr_unlabeled --labeled-dir ../shared/data/jsrt \\
        --split splits/jsrt/train.txt --num-labels 9 --resolution 64 --batch 8 --ckpt runs/jsrt --model runs/jsrt-enc/model.pt

The data options are train_gan.py's; --ckpt (a stage-1 checkpoint or run folder) and --model (a model.pt) give
trained weights, else the networks are drawn from --seed with the architecture options. For one batch the
script runs, once in fp32 and once under bf16 autocast (the GPU default of both training scripts):

 * stage 1: train_gan.train_step at a step where R1 and the path length both run: every loss term, the
   step's update of the path-length running mean, and the gradient each network is given at each of its
   optimiser steps (G_ema is updated outside autocast, from the fp32 weights: bf16 does not reach it);
 * stage 2: train_encoder.train_step: every loss and the encoder's gradient at both of its steps (before the
   norm clip, so that the clip cannot hide a difference);
 * inversion: the encoder's starting w+, the mask decided there, and invert.objective with its gradient with
   respect to w+ and to the noise maps, from the same fp32 starting point.

Optimisers that record the gradient and change nothing stand in for the real ones, and the same RNG state is
set before each run, so the two runs see the same latents, noise and mixing. Each row gives the fp32 value
(norm), the relative difference |bf16 - fp32| / |fp32|, and, as the scale that training lives with anyway,
the relative difference between fp32 on this batch and fp32 on another batch (other images, latents and
noise). tests/test_precision.py bounds the bf16 column.
"""

import argparse
import copy
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import data  # noqa: E402
import invert  # noqa: E402
import losses  # noqa: E402
import model  # noqa: E402
import train_encoder  # noqa: E402
import train_gan  # noqa: E402
import training  # noqa: E402


class Recorder:
    """An optimiser that records the gradients it is given and changes nothing."""

    def __init__(self, params):
        self.params = list(params)
        self.param_groups = [{"lr": 0.0, "params": self.params}]
        self.seen = []

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.seen.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.params])


def autocast_for(precision):
    """The training scripts' own autocast (model.make_autocast) for 'fp32' or 'bf16', on the CPU."""
    return model.make_autocast(argparse.Namespace(precision=precision), torch.device("cpu"))[0]


def flat(value):
    if isinstance(value, (list, tuple)):
        return torch.cat([flat(v) for v in value])
    return value.detach().double().flatten()


def relative(value, reference):
    """|value - reference| / |reference| (Euclidean norms over every entry)."""
    value, reference = flat(value), flat(reference)
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def seeded(seed):
    torch.manual_seed(seed)
    random.seed(seed)


def stage1(nets, mean_path_length, batch, args, precision, seed):
    """Losses and gradients of one stage-1 iteration (with R1 and path length) at fixed weights."""
    G, D_r, D_m = (copy.deepcopy(n) for n in nets)
    optimizers = [Recorder(n.parameters()) for n in (G, D_r, D_m)]
    state = {"G_ema": copy.deepcopy(G), "mean_path_length": mean_path_length.clone()}
    seeded(seed)
    out = train_gan.train_step(0, (G, D_r, D_m), optimizers, batch, args, state, autocast_for(precision))
    opt_G, opt_D_r, opt_D_m = optimizers
    values = {f"stage 1: {k}": v for k, v in out.items()}
    values["stage 1: path-length mean, the step's update"] = state["mean_path_length"] - mean_path_length
    values["stage 1: gradient of D_r, logistic loss"] = opt_D_r.seen[0]
    values["stage 1: gradient of D_r, R1"] = opt_D_r.seen[1]
    values["stage 1: gradient of D_m, hinge loss"] = opt_D_m.seen[0]
    values["stage 1: gradient of D_m, R1"] = opt_D_m.seen[1]
    values["stage 1: gradient of G, adversarial + feature matching"] = opt_G.seen[0]
    if len(opt_G.seen) > 1:
        values["stage 1: gradient of G, path length"] = opt_G.seen[1]
    return values


def stage2(G, E, percept, batch, args, temperatures, precision, seed):
    """Losses and the encoder's (unclipped) gradients of one stage-2 iteration at fixed weights."""
    E = copy.deepcopy(E).train().requires_grad_(True)
    optimizers = (Recorder(E.parameters()), Recorder(E.parameters()))
    seeded(seed)
    out = train_encoder.train_step(E, G, percept, optimizers, batch, args, temperatures, autocast_for(precision))
    values = {f"stage 2: {k}": v for k, v in out.items()}
    values["stage 2: gradient of E, unlabeled step"] = optimizers[0].seen[0]
    values["stage 2: gradient of E, labeled step"] = optimizers[1].seen[0]
    return values


def inversion(G, E, percept, images, args, precision, seed):
    """The encoder's start and mask, and the objective and its gradients at the fp32 start."""
    autocast = autocast_for(precision)
    noise = invert.make_noise(G, [seed + i for i in range(images.shape[0])], images.device)
    with torch.no_grad():
        start = E(images).float()  # the same starting point for both precisions
        with autocast():
            encoded = E(images).float()
            _, mask_logits = G(encoded, input_is_w=True, noise=noise)
            target_features = percept.features(images)
        _, reference_logits = G(start, input_is_w=True, noise=noise)
    w_plus = start.clone().requires_grad_(True)
    noise = [n.clone().requires_grad_(True) for n in noise]
    with autocast():
        per_image = invert.objective(G, E, percept, w_plus, noise, images, target_features, args)
    grads = torch.autograd.grad(per_image.sum(), [w_plus] + noise)
    classes, reference = model.mask_classes(mask_logits.float()), model.mask_classes(reference_logits)
    return {"inversion: encoder's w+": encoded,
            "inversion: objective per image": per_image,
            "inversion: gradient of w+": grads[0],
            "inversion: gradient of the noise maps": list(grads[1:]),
            # a fraction, not a difference: the pixels whose class changes, in the column of the other batch
            "inversion: pixels whose class changes at the encoder's w+": (classes != reference).double().mean()}


def networks(args, info, ckpt_path, model_path):
    """(G, D_r, D_m, path-length mean, G_ema, E, temperatures): from the files, or drawn from args.seed."""
    device = torch.device("cpu")
    torch.manual_seed(args.seed)
    G, G_ema, D_r, D_m = train_gan.build_networks(args, info["channels"], info["num_classes"], device)
    mean_path_length = torch.ones(())  # a running mean of the size trained networks reach, not the initial 0
    ckpt_args = vars(args)
    for net in (G, G_ema):  # as in a trained G, the noise reaches the outputs (the strengths start at zero)
        for layer in net.modules():
            if isinstance(layer, model.NoiseInjection):
                layer.strength.data.fill_(0.1)
    if ckpt_path:
        path = ckpt_path
        if os.path.isdir(path):
            path = model.list_checkpoints(path)[-1]
        ckpt = model.load_checkpoint(path)
        for net, key in ((G, "G"), (G_ema, "G_ema"), (D_r, "D_r"), (D_m, "D_m")):
            net.load_state_dict(ckpt[key])
        mean_path_length, ckpt_args = ckpt["mean_path_length"], ckpt["args"]
    encoder_args = train_encoder.build_parser().parse_args(["--max-channels", str(args.max_channels)])
    if model_path:
        G_ema, E, _ = model.load_bundle(model_path, device)
    else:
        E = model.Encoder(**train_encoder.encoder_config(encoder_args, G_ema))
        E.latent_avg.copy_(G_ema.mean_latent(4096, device)[0])
    G_ema = G_ema.eval().requires_grad_(False)
    E = E.eval().requires_grad_(False)
    temperatures = train_encoder.mask_temperatures(encoder_args, ckpt_args, G_ema.num_classes)
    return (G, D_r, D_m), mean_path_length, G_ema, E, temperatures


def first_batches(args, count=2):
    """`count` consecutive batches of the training streams (unlabeled images, labeled images, masks)."""
    labeled, unlabeled, info = data.build_datasets(args)
    labeled_stream, unlabeled_stream = training.open_streams(args, labeled, unlabeled, 0, 1, args.seed)
    labeled_iter, unlabeled_iter = iter(labeled_stream), iter(unlabeled_stream)
    return [(next(unlabeled_iter), *next(labeled_iter)) for _ in range(count)], info


def compare(args, ckpt_path=None, model_path=None, lpips="random"):
    """{row: (fp32 norm, bf16 vs fp32, another batch vs this batch in fp32)} for every quantity above."""
    (batch, other), info = first_batches(args)
    nets, mean_path_length, G_ema, E, temperatures = networks(args, info, ckpt_path, model_path)
    percept = losses.Perceptual(lpips)
    encoder_args = train_encoder.build_parser().parse_args(["--lpips", lpips])
    encoder_args.clip_unlabeled = encoder_args.clip_labeled = float("inf")  # the gradients as computed
    invert_args = invert.build_parser().parse_args(["unused.png"])

    def run(precision, batch, seed):
        values = stage1(nets, mean_path_length, batch, args, precision, seed)
        values.update(stage2(G_ema, E, percept, batch, encoder_args, temperatures, precision, seed))
        values.update(inversion(G_ema, E, percept, batch[1], invert_args, precision, seed))
        return values

    fp32, bf16, elsewhere = run("fp32", batch, args.seed), run("bf16", batch, args.seed), run("fp32", other, args.seed + 1)
    rows = {}
    for key, reference in fp32.items():
        if key.endswith("changes at the encoder's w+"):
            rows[key] = (float("nan"), bf16[key].item(), float("nan"))
            continue
        rows[key] = (flat(reference).norm().item(), relative(bf16[key], reference),
                     relative(elsewhere[key], reference) if key in elsewhere else float("nan"))
    return rows


def print_table(rows):
    print(f"| {'quantity':<58} | {'fp32 (norm)':>11} | {'bf16 vs fp32':>12} | {'other batch':>11} |")
    print(f"|{'-' * 60}|{'-' * 13}:|{'-' * 14}:|{'-' * 13}:|")
    for key, (norm, bf16, other) in rows.items():
        norm, other = ("-" if v != v else f"{v:{spec}}" for v, spec in ((norm, ".4g"), (other, ".2f")))
        print(f"| {key:<58} | {norm:>11} | {bf16:>12.2e} | {other:>11} |")


def main(argv=None):
    parser = train_gan.build_parser()
    parser.description = "bf16 autocast against fp32 at one step of each stage (tests/precision_check.py)"
    parser.add_argument("--ckpt", help="a stage-1 checkpoint or run folder (default: networks drawn from --seed)")
    parser.add_argument("--model", help="a model.pt of train_encoder.py for the encoder (default: drawn)")
    args = parser.parse_args(argv)
    print_table(compare(args, args.ckpt, args.model))


if __name__ == "__main__":
    main()
