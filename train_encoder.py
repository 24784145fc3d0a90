"""Stage 2 of SemanticGAN: an encoder into the frozen generator's W+ (Li et al., CVPR 2021, Sec. 3.2).

    python train_encoder.py --ckpt runs/jsrt/checkpoint-00800000.pt --out runs/jsrt-enc    # one GPU
    python train_encoder.py --ckpt runs/jsrt --out runs/jsrt-enc                           # its latest checkpoint
    python train_encoder.py --ckpt official/ckpt/100000.pt --out runs/enc                  # the official code's
    torchrun --nproc_per_node 8 train_encoder.py --ckpt ... --out ...                      # several (DDP)

The encoder E: x -> w+ (model.Encoder, pSp) learns to invert G_ema of a stage-1 checkpoint, which stays
frozen: G_x(E(x)) must reproduce the image, and for labeled pairs G_y(E(x)) the mask (paper Eq. 5, L_E):

    L_u = 10 LPIPS(x, G_x(E(x))) + 1 MSE(x, G_x(E(x)))                          unlabeled images x
    L_s = 1 CE(y, G_y(E(x))) + 1 Dice(y, G_y(E(x))) + 10 LPIPS + 1 MSE          labeled pairs (x, y)

As the official semanticGAN/train_enc.py (weights, clips and schedule are its defaults):
 * every iteration takes two optimiser steps on separate batches, each with its own optimiser (and moment
   estimates): the unlabeled batch (L_u, gradient norm clipped at 2.0), then the labeled one (L_s, at 5.0);
 * the mask losses have temperatures (losses.py): CE on logits / 0.1 (binary CE on logits / 0.3 for one
   class), Dice on sigmoid(logits / 0.3) without the background; they fit the logits of about +-1 that the
   official D_m input teaches (--dm-mask logits); for --dm-mask probabilities generators both default to 1;
 * G_ema in eval mode, fresh random noise on every forward, no truncation;
 * lr 1e-3, then a cosine down to 1e-5 from 30% of --iter: the official 30k-to-100k decay for our default
   --iter 100000 (the official 800k iterations spend the last 700k at 1e-5);
 * the official Ranger (RAdam + Lookahead + gradient centralisation) is not in torch: `--optimizer radam`
   is torch's RAdam with Ranger's betas (0.95, 0.999) and eps 1e-5, `--optimizer adam` the official other;
 * validation every 100 iterations: the encoder alone as a segmenter of held-back pairs, per-image DICE for
   one foreground class, the data set's mIoU otherwise.

Ours: pSp's encoder (IR-SE body, feature pyramid, map2style heads) starting from G's mean latent (the official
one is a pyramid over a ResNet-50 starting from W = 0); best.pt at the best validation; exact resume; BN back in
training mode after validation (the official code leaves it in eval mode after the first). Every validation
also scores the encoder on G's own samples (`own_dice` / `own_miou`: G_y(w) against G_y(E(G_x(w)))), the
upper bound of what it can recover; far below the validation score it prints a warning (OWN_ERROR_RATIO_LIMIT).

Outputs in --out: the progress line and log.jsonl; samples-STEP.png (input | reconstruction | predicted mask |
true mask); checkpoint-STEP.pt (`--resume auto`); model.pt, the inference bundle invert.py reads (G_ema, E,
the preprocessing, the classes, the LPIPS network, report.labeled_errors, and 8 held-out images invert.py
calibrates its flag on); best.pt, the same at the best validation score. Long runs behave as train_gan.py's
(training.py).

Needs: training.py (the run machinery), model.py (the networks, reading checkpoints and model.pt), weights.py
(an official checkpoint), report.py (the flag's reference), losses.py, data.py.
"""

import argparse
import math
import os
import random

import numpy as np
import torch
import torch.nn.functional as F

import cli
import data
import losses
import model
import report
import training
import weights

# ----------------------------------------------------------------------------------------------------
# The frozen generator and the encoder


def encoder_config(args, G):  # E reads G's images and writes G's W+
    return dict(resolution=G.resolution, image_channels=G.image_channels, style_dim=G.style_dim,
                units=args.encoder_units, max_channels=args.max_channels)


def mask_temperatures(args, ckpt_args, num_classes):
    """(CE, Dice) temperatures: the official (0.1, or 0.3 for one class; 0.3) for a generator whose D_m saw
    logits, 1 for one whose D_m saw probabilities (module docstring); an explicit option wins."""
    official = ckpt_args.get("dm_mask", "probabilities") == "logits"  # checkpoints older than the option: probabilities
    ce = args.ce_temperature or ((0.3 if num_classes == 1 else 0.1) if official else 1.0)
    dice = args.dice_temperature or (0.3 if official else 1.0)
    return ce, dice


def learning_rate(step, args):
    """lr, constant until --lr-decay-start x --iter, then a cosine down to --lr-min at --iter."""
    start = args.lr_decay_start * args.iter
    if step < start:
        return args.lr
    t = min(1.0, (step - start) / max(1.0, args.iter - start))
    return args.lr_min + 0.5 * (args.lr - args.lr_min) * (1 + math.cos(math.pi * t))


def build_optimizer(args, E):
    if args.optimizer == "adam":
        return torch.optim.Adam(E.parameters(), lr=args.lr)
    return torch.optim.RAdam(E.parameters(), lr=args.lr, betas=(0.95, 0.999), eps=1e-5)


# ----------------------------------------------------------------------------------------------------
# One iteration


def reconstruction_loss(percept, reconstruction, images, args):
    """(args.lpips_weight LPIPS + args.mse_weight MSE, LPIPS, MSE), LPIPS averaged over the batch."""
    lpips_value = percept(reconstruction.float(), images).mean()
    mse = F.mse_loss(reconstruction.float(), images)
    return args.lpips_weight * lpips_value + args.mse_weight * mse, lpips_value, mse


def train_step(E, G, percept, optimizers, batch, args, temperatures, autocast):
    """The two optimiser steps of one iteration (module docstring). Returns the losses (detached)."""
    opt_unlabeled, opt_labeled = optimizers
    unlabeled_images, labeled_images, labeled_masks = batch
    out = {}

    with autocast():
        reconstruction, _ = G(E(unlabeled_images), input_is_w=True)
        loss, lpips_value, mse = reconstruction_loss(percept, reconstruction, unlabeled_images, args)
    opt_unlabeled.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(E.parameters(), args.clip_unlabeled)
    opt_unlabeled.step()
    out.update(L_u=loss.detach(), lpips_u=lpips_value.detach(), mse_u=mse.detach())

    with autocast():
        reconstruction, mask_logits = G(E(labeled_images), input_is_w=True)
        loss, lpips_value, mse = reconstruction_loss(percept, reconstruction, labeled_images, args)
        ce = losses.mask_cross_entropy(mask_logits, labeled_masks, temperatures[0])
        dice = losses.dice_loss(mask_logits, labeled_masks, temperatures[1])
        loss = loss + args.ce_weight * ce + args.dice_weight * dice
    opt_labeled.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(E.parameters(), args.clip_labeled)
    opt_labeled.step()
    out.update(L_s=loss.detach(), ce=ce.detach(), dice=dice.detach(), lpips_s=lpips_value.detach(),
               mse_s=mse.detach())
    return out


# ----------------------------------------------------------------------------------------------------
# The encoder as a segmenter: validation and the sample grid


@torch.no_grad()
def encode(E, G, images, autocast):
    """(reconstruction, mask logits) of G at E(images), with G's fixed noise maps (deterministic)."""
    with autocast():
        reconstruction, mask_logits = G(E(images), input_is_w=True, randomize_noise=False)
    return reconstruction.float(), mask_logits.float()


@torch.no_grad()
def encoder_score(E, G, batches, autocast, kind):
    """{kind_dice}: the mean per-image DICE of class 1 for one foreground class, else {kind_miou}: the data
    set's mIoU, of the encoder alone's masks G_y(E(x)) against the true ones over `batches` of (images,
    masks); E in eval mode meanwhile."""
    was_training, labels = E.training, losses.label_count(G.num_classes)
    E.eval()
    dices, intersection, union = [], torch.zeros(labels, dtype=torch.long), torch.zeros(labels, dtype=torch.long)
    for images, truth in batches:
        prediction = model.mask_classes(encode(E, G, images, autocast)[1]).cpu()
        if labels == 2:
            dices.append(losses.dice_jaccard(prediction, truth, 1)[0])
        else:
            i, u = losses.intersection_union(prediction, truth, labels)
            intersection, union = intersection + i, union + u
    E.train(was_training)
    score = torch.cat(dices).mean().item() if labels == 2 else losses.mean_iou(intersection, union)
    return {f"{kind}_dice" if labels == 2 else f"{kind}_miou": score}


def validate(E, G, dataset, batch, device, autocast):
    """{'val_dice' or 'val_miou'}: the encoder alone as a segmenter of held-back pairs."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=0)
    return encoder_score(E, G, ((images.to(device), masks) for images, masks in loader), autocast, "val")


@torch.no_grad()
def own_sample_score(E, G, count, batch, device, autocast, seed=0):
    """{'own_dice' or 'own_miou'}: how well E recovers the masks of G's own samples, G_y(w) against
    G_y(E(G_x(w))), for `count` fixed latents (no truncation, G's fixed noise). The upper bound of the
    encoder's task: if it is high while the validation score is low, G does not yet draw the data's anatomy;
    if it is low, the encoder is the limit."""
    z = torch.randn(count, G.style_dim, generator=torch.Generator().manual_seed(seed)).to(device)

    def drawn():
        for chunk in z.split(batch):
            with autocast():
                image, mask_logits = G(chunk, randomize_noise=False)
            # the encoder reads images in [-1, 1], as the data streams give them
            yield image.float().clamp(-1, 1), model.mask_classes(mask_logits.float()).cpu()

    return encoder_score(E, G, drawn(), autocast, "own")


# The bound against the validation score (docs/mask-branch-stability.md, "The warning"): the encoder's error on G's
# own samples, 1 - own, over its error on the held-out pairs, 1 - val. Generators whose masks fit their images gave
# 1.4 (chest, a pool of the labels' source) and 1.7 (the demo); those whose masks had drifted off the anatomy 3.4-6.2
# (chest, a pool of another source), while their validation scores were as good.
OWN_ERROR_RATIO_LIMIT = 2.5


def bound_warning(measured):
    """The warning for an encoder that recovers G's own masks far worse than the held-out labels (a line), or None."""
    kind = "dice" if "own_dice" in measured else "miou"
    own, val = (float(measured[f"{k}_{kind}"]) if f"{k}_{kind}" in measured else None for k in ("own", "val"))
    if own is None or val is None or (1 - own) <= OWN_ERROR_RATIO_LIMIT * (1 - val):  # NaN warns
        return None
    ratio = (1 - own) / max(1 - val, 1e-9)
    return (f"own_{kind} {own:.3f} against val_{kind} {val:.3f}: the encoder misses {ratio:.2f} times as much of "
            f"G's own masks as of the held-out labels (above {OWN_ERROR_RATIO_LIMIT}). G's masks do not fit its "
            "images: the encoder reaches codes whose masks fit the labels, and the inversion's optimisation moves "
            "away from them (invert.py --steps 0 may segment better). Check stage 1's mask_parts and mask_holes; "
            "measured remedies in stage 1: --dm-look-augment (D_m's images alike in look), "
            "--dm-mask probabilities, an unlabeled pool from the labeled images' source "
            "(docs/mask-branch-stability.md)")


@torch.no_grad()
def save_grid(E, G, labeled, unlabeled, path, batch, autocast):
    """A row per fixed labeled pair and per fixed unlabeled image, from the encoder alone: input |
    reconstruction | predicted mask | true mask (black if unknown)."""
    was_training, rows = E.training, []
    E.eval()
    for images, masks in ((labeled[0], labeled[1]), (unlabeled, None)):
        for start in range(0, images.shape[0], batch):
            chunk = images[start:start + batch].to(G.constant.device)
            reconstruction, mask_logits = encode(E, G, chunk, autocast)
            for k, (image, rec, predicted) in enumerate(zip(chunk, reconstruction, model.mask_classes(mask_logits))):
                blank = np.zeros_like(data.image_to_uint8(image))
                truth = blank if masks is None else data.colour_mask(masks[start + k].numpy())
                rows.append(np.concatenate([data.image_to_uint8(image), data.image_to_uint8(rec),
                                            data.colour_mask(predicted.cpu().numpy()), truth], axis=1))
    E.train(was_training)
    data.save_grid(rows, path)


def fixed_samples(dataset, count):
    """The first `count` samples of a dataset built without augmentation, stacked: (images, masks) or images."""
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    return tuple(map(torch.stack, zip(*items))) if isinstance(items[0], (tuple, list)) else torch.stack(items)


# ----------------------------------------------------------------------------------------------------
# The inference bundle


def fixed_inputs(args, validation):
    """The labeled pairs unaugmented (report.labeled_errors measures them), the sample grid's fixed inputs (the
    validation or labeled pairs, and unlabeled images) and the flag's held-out images."""
    plain_labeled, plain_unlabeled, _ = data.build_datasets(args, augment=False)
    grid = (fixed_samples(validation if validation is not None else plain_labeled, args.grid),
            fixed_samples(plain_unlabeled, args.grid))
    return plain_labeled, grid, flag_images(validation, plain_labeled)


FLAG_IMAGES = 8  # invert.py's flag: a new image of their kind moves further than all 8 with probability 1/9


def flag_images(validation, labeled):
    """The first FLAG_IMAGES validation images (the labeled ones without --val) as uint8 [N, C, R, R], and which."""
    images = fixed_samples(validation if validation is not None else labeled, FLAG_IMAGES)[0]
    source = "the validation pairs" if validation is not None else "the labeled training images"
    return {"images": images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8), "source": source}


def make_bundle(G, E, fit, class_names, lpips, step=0, validation=None, args=None, stage1_args=None,
                labeled_errors=None, flag_images=None):
    """What invert.py needs and nothing else: state_dicts and plain data (weights_only=True loads it); the keys
    are listed at model.BUNDLE_FORMAT."""
    E = training.unwrap(E)
    return {"format": model.BUNDLE_FORMAT, "G_ema": G.state_dict(), "generator": G.config, "E": E.state_dict(),
            "encoder": E.config, "mean_latent": E.latent_avg.detach().cpu().clone(),
            "preprocessing": {"resolution": G.resolution, "channels": G.image_channels, "fit": fit},
            "num_classes": losses.label_count(G.num_classes), "class_names": class_names, "lpips": lpips, "step": step,
            "validation": validation, "args": args or {}, "stage1_args": stage1_args or {},
            "labeled_errors": labeled_errors, "flag_images": flag_images}


# ----------------------------------------------------------------------------------------------------
# The training loop


# Stage-1 options stage 2 inherits unless given (the same data, the same labeled subset), and two of their
# names in checkpoints of before 2026-12-06.
INHERITED = ("data", "labeled_dir", "resolution", "channels", "num_classes", "class_map", "num_labels",
             "labels_seed", "split", "fit", "augment", "flip", "skip_unpaired", "demo_length")
OLD_NAMES = {"labeled": "labeled_dir", "labels": "num_labels"}


def check_fits(args, G, info, labeled):
    """The data must be what G generates: its resolution, image channels and classes."""
    Error = training.TrainingError
    if labeled is None:
        raise Error("stage 2 needs labeled pairs for the mask losses: pass --labeled-dir (or --num-labels N > 0)")
    if args.resolution != G.resolution:
        raise Error(f"{args.ckpt} generates {G.resolution} px images, not --resolution {args.resolution}: leave "
                    f"--resolution out (it is taken from the checkpoint) or pass {G.resolution}")
    if info["channels"] != G.image_channels:
        raise Error(f"the data has {info['channels']} image channels, {args.ckpt} generates {G.image_channels}: "
                    f"pass --channels {G.image_channels} or the data stage 1 trained on")
    classes = losses.label_count(G.num_classes)
    if info["num_classes"] != classes:
        raise Error(f"the data has {info['num_classes']} classes, {args.ckpt} generates masks of {classes}: pass "
                    f"--num-classes {classes} (or the stage-1 --class-map)")


def restore(resume, args, G, E, optimizers):
    """The encoder, G_ema and both optimisers from a stage-2 checkpoint trained with the same encoder, batch and
    optimiser; returns the checkpoint."""
    state = model.load_checkpoint(resume)
    if not isinstance(state, dict) or state.get("stage") != "encoder":
        raise training.TrainingError(f"{resume} is not a checkpoint of train_encoder.py; pass another --resume")
    saved = dict(state["args"])
    if isinstance(saved.get("encoder_units"), str):  # checkpoints before the option was parsed: "3,4,14,3"
        saved["encoder_units"] = tuple(int(u) for u in saved["encoder_units"].split(","))
    for key in ("encoder_units", "max_channels", "batch", "optimizer"):
        if saved.get(key) != getattr(args, key):
            raise training.TrainingError(f"checkpoint {resume} was trained with --{key.replace('_', '-')} "
                                         f"{saved.get(key)}, not {getattr(args, key)}: pass the same value to resume")
    G.load_state_dict(state["G_ema"])
    E.load_state_dict(state["E"])
    for optimizer, saved in zip(optimizers, state["optimizers"]):
        optimizer.load_state_dict(saved)
    return state


def announce(args, info, G, E, world, device, precision, temperatures, validation_source):
    print(f"semanticgan stage 2: encoder for {args.ckpt} ({G.resolution} px, {G.image_channels} image channels, "
          f"{info['num_classes']} classes, {G.num_classes} mask channel(s)); {world} process(es) on {device.type}, "
          f"batch {args.batch} unlabeled + {args.batch} labeled per process; precision {precision}; "
          f"{args.iter} steps; data: {info['labeled_count']} labeled pairs and {info['unlabeled_count']} images "
          f"from {info['source']}; validation: {validation_source}", flush=True)
    lpips_note = " (an UNTRAINED backbone: for tests and offline demos)" if args.lpips == "random" else ""
    print(f"E {sum(p.numel() for p in E.parameters()):,} parameters, {args.optimizer}; LPIPS {args.lpips}{lpips_note}; "
          f"mask temperatures CE {temperatures[0]}, Dice {temperatures[1]}", flush=True)


def _train(args, ckpt, rank, world, device):
    torch.manual_seed(args.seed)  # the same initial encoder on every rank
    torch.backends.cudnn.benchmark = device.type == "cuda"
    training.check_out_apart(args.out, ("--data", args.data), ("--labeled-dir", args.labeled_dir), ("--val", args.val))
    training.writable_folder(args.out)
    resume = training.find_resume(args)  # also: never a fresh run among another run's checkpoints
    G = model.load_generator(ckpt, args.ckpt, device)
    labeled, unlabeled, info = data.build_datasets(args, replace_unreadable=True)
    check_fits(args, G, info, labeled)
    validation, validation_source = data.build_validation(args, args.val)
    temperatures = mask_temperatures(args, ckpt["args"], G.num_classes)
    percept = losses.Perceptual(args.lpips).to(device)
    E = model.Encoder(**encoder_config(args, G)).to(device)
    E.latent_avg.copy_(G.mean_latent(4096, device)[0])  # start every image at the mean latent
    optimizers = (build_optimizer(args, E), build_optimizer(args, E))
    autocast, precision = model.make_autocast(args, device)
    streams = training.open_streams(args, labeled, unlabeled, rank, world, args.seed)
    step, best, state = 0, {"score": None, "due": False}, {}
    torch.manual_seed(args.seed + rank)  # from here on each rank draws its own noise
    random.seed(args.seed + rank)
    if resume:
        state = restore(resume, args, G, E, optimizers)
        step, best["score"] = state["step"], state["best"]
        streams = training.resumed_streams(args, state, labeled, unlabeled, rank, world)
        training.restore_rng_states(state["rng"], rank, world, args.seed, step)
        training.resumed(args, resume, step, rank, also=("model.pt", "best.pt"))
    net = E if world == 1 else torch.nn.parallel.DistributedDataParallel(
        E, device_ids=[device.index] if device.type == "cuda" else None)
    plain_labeled, grid, held_out = fixed_inputs(args, validation)
    if rank == 0:
        announce(args, info, G, E, world, device, precision, temperatures, validation_source)
    progress = training.Progress(os.path.join(args.out, "log.jsonl"), 2 * args.batch * world, args.iter, step,
                                 device, state.get("elapsed", 0.0), training.tensorboard_writer(args, rank, step))

    def one_step(step, unlabeled_images, labeled_pair, identities):
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args)
        batch = [t.to(device, non_blocking=True) for t in (unlabeled_images, *labeled_pair)]
        return train_step(net, G, percept, optimizers, batch, args, temperatures, autocast)

    def measure(step, checkpoint):  # the encoder alone as a segmenter, every rank the same numbers
        if validation is None or not (step % args.val_every == 0 or step == args.iter):
            return {}
        validated = validate(E, G, validation, args.batch, device, autocast)
        if args.own_samples:
            validated.update(own_sample_score(E, G, args.own_samples, args.batch, device, autocast))
        score = next(iter(validated.values()))
        best["due"] = best["score"] is None or score > best["score"]
        best["score"] = score if best["due"] else best["score"]
        return {k: torch.tensor(v) for k, v in validated.items()}

    def checkpoint_state(step):
        return {"stage": "encoder", "E": E.state_dict(), "G_ema": G.state_dict(),
                "optimizers": [o.state_dict() for o in optimizers], "best": best["score"]}

    def write(step, measured, checkpoint, stopping):
        warning = bound_warning(measured)
        if warning:
            progress.warn(f"at step {step}, {warning}", step)
        due = {"best.pt": {k: v.item() for k, v in measured.items()}} if measured and best["due"] else {}
        due.update({"model.pt": None} if checkpoint else {})
        errors = report.labeled_errors(E, G, percept, plain_labeled, args.batch, device) if due else None  # once
        for name, validated in due.items():
            training.save_checkpoint(make_bundle(G, E, info["fit"], info.get("class_names"), args.lpips, step,
                                                 validated, vars(args), ckpt["args"], errors, held_out),
                                     os.path.join(args.out, name))
        if checkpoint and not stopping:
            grid_path = os.path.join(args.out, f"samples-{step:08d}.png")
            save_grid(E, G, *grid, grid_path, args.batch, autocast)
            progress.image("samples", grid_path, step)

    step = training.train_loop(args, step, args.iter, args.snap_every, progress, streams, one_step, measure,
                               checkpoint_state, write, rank, world, device)
    if rank == 0:
        best_text = f"; best validation {best['score']:.4f} in best.pt" if best["score"] is not None else ""
        print(f"done: {step} steps; model.pt, checkpoints and samples in {args.out}{best_text}", flush=True)
    return {"E": E, "G_ema": G}


# ----------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    p = cli.ArgumentParser(description="Stage 2 of SemanticGAN: train the encoder against a frozen generator.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", help="a stage-1 checkpoint of train_gan.py, or its --out folder (the latest "
                   "checkpoint), or a checkpoint of the official train_seg_gan.py; its G_ema is used")
    data.add_data_args(p, resolutions=model.RESOLUTIONS)
    p.set_defaults(**{k: None for k in INHERITED})  # None: taken from the stage-1 checkpoint
    g = p.add_argument_group("training (defaults: the official configuration)")
    g.add_argument("--out", default="runs/encoder", help="output folder: model.pt, best.pt, checkpoints, grids, log")
    g.add_argument("--iter", type=cli.POSITIVE_INT, default=100000, help="iterations (an unlabeled and a labeled step)")
    g.add_argument("--batch", type=cli.POSITIVE_INT, default=16, help="batch per GPU / process, of each kind")
    g.add_argument("--lr", type=cli.POSITIVE, default=1e-3)
    g.add_argument("--lr-min", type=cli.NON_NEGATIVE, default=1e-5, help="learning rate at the end of the decay")
    g.add_argument("--lr-decay-start", type=cli.FRACTION, default=0.3, help="fraction of --iter where it starts")
    g.add_argument("--optimizer", choices=["radam", "adam"], default="radam")
    g.add_argument("--lpips", choices=losses.Perceptual.NETS, default="vgg",
                   help="LPIPS network; random = untrained backbone (tests, offline demos)")
    g.add_argument("--lpips-weight", type=cli.NON_NEGATIVE, default=10.0)
    g.add_argument("--mse-weight", type=cli.NON_NEGATIVE, default=1.0)
    g.add_argument("--ce-weight", type=cli.NON_NEGATIVE, default=1.0)
    g.add_argument("--dice-weight", type=cli.NON_NEGATIVE, default=1.0)
    g.add_argument("--ce-temperature", type=cli.POSITIVE, default=None, help="default: 0.1 (0.3 for one class), or 1 "
                   "for a generator trained with --dm-mask probabilities")
    g.add_argument("--dice-temperature", type=cli.POSITIVE, default=None, help="default: 0.3, or 1 as above")
    g.add_argument("--clip-unlabeled", type=cli.POSITIVE, default=2.0, help="gradient-norm clip of the unlabeled step")
    g.add_argument("--clip-labeled", type=cli.POSITIVE, default=5.0, help="gradient-norm clip of the labeled step")
    g.add_argument("--val", default=None, help="a labeled folder or a split file to validate on (default: the "
                   "labeled pairs --num-labels leaves unused)")
    g.add_argument("--val-every", type=cli.POSITIVE_INT, default=100, help="steps between validations")
    g.add_argument("--own-samples", type=cli.COUNT, default=128,
                   help="at every validation, also score E on this many of G's own samples: G_y(w) against "
                        "G_y(E(G_x(w))), the encoder's upper bound (0: off)")
    g.add_argument("--grid", type=cli.POSITIVE_INT, default=8, help="labeled and unlabeled rows in the grid")
    training.add_run_args(g, "the encoder")
    n = p.add_argument_group("encoder (default: pSp's IR-SE-50; narrow it for CPU demos)")
    n.add_argument("--encoder-units", type=cli.number_list(int, low=1, count=4), default="3,4,14,3",
                   help="IR-SE units in the four stages")
    n.add_argument("--max-channels", type=cli.POSITIVE_INT, default=512, help="cap on the encoder's feature maps")
    return p


def parse_args(argv=None):
    """(args, stage-1 checkpoint): the data options left out are taken from the checkpoint's arguments."""
    args = build_parser().parse_args(argv)
    if not args.ckpt:
        raise training.TrainingError("pass --ckpt OUT/checkpoint-STEP.pt of a train_gan.py run (stage 2 trains "
                                     "against it)")
    args.ckpt = model.resolve_checkpoint(args.ckpt)  # a stage-1 output folder: its latest checkpoint
    ckpt = model.load_checkpoint(args.ckpt, "pass --ckpt OUT/checkpoint-STEP.pt of a complete train_gan.py run")
    ckpt = weights.as_stage1(ckpt, args.ckpt)  # an official SemanticGAN checkpoint: its g_ema, its shape as arguments
    if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict):
        stage1 = {OLD_NAMES.get(k, k): v for k, v in ckpt["args"].items()}
        for key in INHERITED:
            if getattr(args, key) is None:
                setattr(args, key, stage1.get(key))
    defaults = {"resolution": 256, "labels_seed": 0, "fit": "pad", "augment": True, "skip_unpaired": False,
                "demo_length": 1000}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args, ckpt


def main(argv=None):
    def run():
        args, ckpt = parse_args(argv)
        return training.distributed(_train, args, ckpt)
    training.main(run)


if __name__ == "__main__":
    main()
