"""Stage 1 of SemanticGAN: train the generator of images and masks (Li et al., CVPR 2021, Sec. 3.1-3.2).

    python train_gan.py --data IMAGES --labeled PAIRS --out runs/jsrt         # one GPU
    torchrun --nproc_per_node 8 train_gan.py --data ... --out ...              # several GPUs (DDP)
    python train_gan.py --data demo --resolution 32 --max-channels 32 ...      # CPU demo, no download

Every iteration (the official schedule, rosinality/stylegan2-pytorch as extended by the authors):

 1. D_r step   L_Dr on real images (labeled and unlabeled alike) against generated images.
 2. D_m step   L_Dm on labeled pairs against generated pairs; by default as the official code, the real
               mask one-hot in {-1, +1} and the generated one as raw logits (--dm-mask).
               Ours, --dm-mismatched: each real image with another labeled image's mask is a second kind
               of fake (losses.d_hinge_loss_mismatched), so D_m must judge whether a mask fits its image.
               Steps 1 and 2 share one generator forward: G is frozen in both, so one batch of fakes serves
               (--no-shared-fakes draws a second batch for step 2, as the official code does).
 3. R1         every 16 steps on D_r and on D_m (gamma 10), scaled by 16 (lazy regularisation); D_m's in
               the official form, 1/B^2 of a per-sample R1 (losses.py; --dm-r1 per-sample for the other).
 4. G step     L_G = non-saturating loss from D_r + hinge loss and feature matching from D_m, with the
               image of the generated pair detached (model.generated_pair): D_m shapes only the mask branch.
 5. Path length every 4 steps on half a batch (weight 2, scaled by 4).
 6. G_ema <- G_ema + (1 - 0.5 ** (32 / 10000)) (G - G_ema).

Starting from existing weights: --init PATH fills the networks from a checkpoint of this project, of the
official SemanticGAN code (g, g_ema, d_img, d_seg) or of a rosinality/stylegan2-pytorch StyleGAN2 (g_ema, d;
its tSeg and D_m start fresh), at step 0 with fresh optimisers; the networks' shape is read from the file,
the classes come from the data. --train seg then trains only tSeg and D_m on top of the frozen generator:
steps 1, 3 (D_r's half) and 5 are skipped, G's loss is D_m's, G_ema follows in tSeg alone.

Masks: K classes (background included) give K mask channels, except a task with one foreground class, which
gets one channel as in the official code (--binary sigmoid: D_m sees that logit against the real mask in
{-1, +1}, logit > 0 is the foreground); --binary softmax gives it two.

Batch: --batch is per GPU (as in the official code); the global batch is batch x GPUs and kimg counts
global images. The labeled and the unlabeled stream each deliver --batch samples per GPU and step.

Mixed precision: on a GPU the networks run under bf16 autocast by default (--precision); bf16 keeps fp32's
exponent range, so no loss scaling and no clamping of activations is needed. D_r's R1 (every 16th step)
runs in fp32: its double backward in bf16 measurably weakens it (README, "bf16 against fp32"); D_m's R1 and
the path length run in bf16. The optimisers and G_ema stay in fp32.

Mask quality at every snapshot, without an encoder: mask_area and mask_parts in the log are the mean area
and the mean number of connected regions of each class in the masks of 64 fixed latents of G_ema, divided
by the same of the labeled masks as D_m sees them (1 = like the labels). A mask branch that degrades while
the images stay good, masks shrinking to slivers or breaking up, shows as mask_area falling or mask_parts
rising.

Checkpoints (written atomically: a temporary file, then os.replace) hold state_dicts and plain data only
and are read with torch.load(weights_only=True) (model.load_checkpoint); `--resume auto` continues the
latest one in --out, with the optimisers, the path-length mean, the data streams' positions and every RNG,
so a resumed run continues exactly as if it had not stopped. A run never writes among another run's
checkpoints (find_resume), and a resume from an earlier snapshot than the latest moves the later ones aside
(set_aside_later_snapshots), so that --resume auto follows the run that goes on.

Long runs on shared clusters: SIGTERM (what SLURM and Kubernetes send before killing a job) or Ctrl-C
ends the current step, writes a checkpoint and exits (status 128 + the signal), every rank at the same
step; an unreadable image in the unlabeled pool is replaced by another and counted (--max-unreadable);
`--resume auto --new-data` continues the networks over a changed pool; a checkpoint that cannot be
written (disk full, --out gone) stops the run with the previous checkpoint intact.

Needs: model.py (the networks, reading checkpoints), losses.py, data.py.
"""

import _thread
import argparse
import copy
import datetime
import glob
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import data
import losses
import model

# ----------------------------------------------------------------------------------------------------
# Set-up


class TrainingError(Exception):
    """A problem the user can fix (an incompatible resume, a diverged run, a full disk): one line, exit 2, as a
    checkpoint that cannot be read (model.CheckpointError)."""


def setup_distributed():
    """(rank, world_size, device) from torchrun's environment, or a single process."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return rank, world, torch.device("cuda", local_rank)
    return rank, world, torch.device("cpu")


def build_networks(args, image_channels, num_classes, device, shapes=None):
    """G, G_ema, D_r, D_m for data of `num_classes` classes (background included): the mask has
    model.mask_channels of them (one for a binary task in the official --binary sigmoid form). `shapes`
    (model.official_shapes of an --init file): D_r and D_m take the widths of the file's, where it has them.
    With --train seg all but tSeg and D_m is frozen (no gradients) from the start."""
    channels = model.mask_channels(num_classes, args.binary)
    G = model.Generator(args.resolution, channels, image_channels, style_dim=args.style_dim, n_mlp=args.n_mlp,
                        channel_multiplier=args.channel_multiplier, max_channels=args.max_channels)
    d_r = (shapes or {}).get("image_discriminator") or dict(channel_multiplier=args.channel_multiplier,
                                                            max_channels=args.max_channels)
    D_r = model.ImageDiscriminator(args.resolution, image_channels, channel_multiplier=d_r["channel_multiplier"],
                                   max_channels=d_r["max_channels"])
    d_m = (shapes or {}).get("mask_discriminator") or dict(num_scales=3, base_channels=min(64, args.max_channels),
                                                           n_layers=3, max_channels=args.max_channels)
    D_m = model.MaskDiscriminator(image_channels, channels, num_scales=d_m["num_scales"],
                                  base_channels=d_m["base_channels"], n_layers=d_m["n_layers"],
                                  max_channels=d_m["max_channels"])
    G, D_r, D_m = G.to(device), D_r.to(device), D_m.to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    if args.train == "seg":
        G.requires_grad_(False)
        G.t_seg.requires_grad_(True)
        D_r.requires_grad_(False)
    if args.channels_last and device.type == "cuda":
        for net in (G, D_r, D_m, G_ema):
            net.to(memory_format=torch.channels_last)
    return G, G_ema, D_r, D_m


def build_optimizers(args, G, D_r, D_m):
    """Adam with the lazy-regularisation correction: a regulariser applied every k steps makes the
    effective step c = k / (k + 1) of the plain one, so lr * c and betas ** c (StyleGAN2 App. B). With
    --train seg G's optimiser holds tSeg alone, which no regulariser touches (path length is skipped): the
    plain step."""
    def adam(params, every):
        c = every / (every + 1) if every else 1.0
        return torch.optim.Adam(params, lr=args.lr * c, betas=(0 ** c, 0.99 ** c))
    opt_G = adam(G.t_seg.parameters(), None) if args.train == "seg" else adam(G.parameters(), args.pl_every)
    return opt_G, adam(D_r.parameters(), args.r1_every), adam(D_m.parameters(), args.r1_every)


def unwrap(net):
    return net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net


# ----------------------------------------------------------------------------------------------------
# One training iteration


def sample_z(batch, style_dim, mixing, device):
    """One code, or two with probability `mixing` (style mixing regularisation)."""
    if mixing > 0 and random.random() < mixing:
        return list(torch.randn(2, batch, style_dim, device=device).unbind(0))
    return [torch.randn(batch, style_dim, device=device)]


def mismatched_partners(identities):
    """For each labeled sample of a batch, the position of another image to take the mask of: the nearest
    before it (cyclically; with no image twice, the batch rolled by one) that is another labeled image, or -1
    where the batch holds no other. By identity, not position: with fewer labels than batch x processes the
    stream repeats images, and an image with its own mask is a true pair, not a mismatched one."""
    ids, B = identities.tolist(), len(identities)
    return torch.tensor([next(((i - k) % B for k in range(1, B) if ids[(i - k) % B] != ids[i]), -1)
                         for i in range(B)], dtype=torch.long)


def rows_of(outputs, rows):
    """D_m's outputs (per scale, per layer) of the samples `rows` only."""
    return [[t[rows] for t in scale] for scale in outputs]


@torch.no_grad()
def mismatched_logits_for_the_log(D_m, images, masks):
    """D_m's outputs for real images with other images' masks, in eval mode: spectral norm's power iteration
    does not advance, so measuring leaves training exactly as it was."""
    net = unwrap(D_m)
    net.eval()
    outputs = _float(net(images, masks))
    net.train()
    return outputs


def train_step(step, nets, optimizers, batch, args, state, autocast):
    """One iteration of the schedule in the module docstring. Returns the losses (detached tensors)."""
    G, D_r, D_m = nets
    opt_G, opt_D_r, opt_D_m = optimizers
    real_images, labeled_images, labeled_masks, *identities = batch  # identities: labeled_stream.indices
    B = real_images.shape[0]
    style_dim = unwrap(G).style_dim
    num_classes = unwrap(G).num_classes
    real_pair_mask = model.real_mask_input(labeled_masks, num_classes, args.dm_mask)
    # --train seg: the image branch and the synthesis layers are frozen, so the images do not change and D_r,
    # which judges nothing else, has nothing to learn: its steps are skipped, and G's loss is D_m's alone
    images_train = args.train == "all"
    out = {}

    # 1-2. discriminator steps on one batch of fakes, or one each (G frozen)
    G.requires_grad_(False)
    D_r.requires_grad_(images_train)
    D_m.requires_grad_(True)
    with torch.no_grad(), autocast():
        fake_images, fake_masks = G(sample_z(B, style_dim, args.mixing, real_images.device))
    if images_train:
        with autocast():
            loss = losses.d_logistic_loss(D_r(real_images).float(), D_r(fake_images).float())
        opt_D_r.zero_grad(set_to_none=True)
        loss.backward()
        opt_D_r.step()
        out["D_r"] = loss.detach()

    if not args.shared_fakes:
        with torch.no_grad(), autocast():
            fake_images, fake_masks = G(sample_z(B, style_dim, args.mixing, real_images.device))
    # mismatched pairs: each real image with another labeled image's mask, a pair whose image is real and
    # whose mask does not fit it (a batch of one image repeated has none)
    partners = mismatched_partners(identities[0] if identities else torch.arange(len(labeled_images)))
    paired = (partners >= 0).nonzero()[:, 0].to(labeled_images.device)
    partners = partners[partners >= 0].to(labeled_images.device)
    with autocast():
        fake_pair = model.generated_pair(fake_images, fake_masks, args.dm_mask)
        real_outputs, fake_outputs = _float(D_m(labeled_images, real_pair_mask)), _float(D_m(*fake_pair))
        mismatched_outputs = None
        if args.dm_mismatched and len(paired):  # a second kind of fake: D_m cannot judge by the image alone
            mismatched_outputs = _float(D_m(labeled_images[paired], real_pair_mask[partners]))
            loss = losses.d_hinge_loss_mismatched(real_outputs, fake_outputs, mismatched_outputs)
        else:
            loss = losses.d_hinge_loss(real_outputs, fake_outputs)
        if mismatched_outputs is None and len(paired) and step % args.r1_every == 0:  # only for the log
            mismatched_outputs = mismatched_logits_for_the_log(D_m, labeled_images[paired], real_pair_mask[partners])
    opt_D_m.zero_grad(set_to_none=True)
    loss.backward()
    opt_D_m.step()
    out["D_m"] = loss.detach()
    if mismatched_outputs is not None and step % args.r1_every == 0:
        # does D_m care whether a mask fits its image? Its mean logit on the real pairs minus on the same
        # images with another's mask, averaged over its scales: about 0 when it judges the images alone
        out["D_m_fit"] = ((losses.d_m_score(rows_of(real_outputs, paired)) - losses.d_m_score(mismatched_outputs))
                          / len(real_outputs)).detach()

    # 3. lazy R1 on both discriminators. D_r's runs in fp32 whatever --precision says: under bf16 its weight
    # gradient (a double backward) is 46% off fp32's at trained weights, more than one batch differs from the
    # next, and a bf16 run keeps R1_D_r 1.5x the fp32 runs' for 10 kimg (README, "bf16 against fp32")
    if step % args.r1_every == 0 and images_train:
        images = real_images.detach().requires_grad_(True)
        logits = D_r(images)
        penalty = losses.r1_penalty(logits.float().sum(), images)
        opt_D_r.zero_grad(set_to_none=True)
        # "+ 0 * logits": every parameter of D_r takes part, which DDP requires of each backward
        (args.r1 / 2 * penalty * args.r1_every + 0 * logits.float().sum()).backward()
        opt_D_r.step()
        out["R1_D_r"] = penalty.detach()
    if step % args.r1_every == 0:
        pair = [labeled_images.detach().requires_grad_(True), real_pair_mask.detach().requires_grad_(True)]
        with autocast():
            outputs = D_m(*pair)
        score = losses.d_m_score(outputs, per_sample=args.dm_r1 == "per-sample")
        penalty = losses.r1_penalty(score, pair)
        opt_D_m.zero_grad(set_to_none=True)
        (args.r1 / 2 * penalty * args.r1_every + 0 * score).backward()
        opt_D_m.step()
        out["R1_D_m"] = penalty.detach()

    # 4. generator step (--train seg: tSeg alone)
    (G if images_train else unwrap(G).t_seg).requires_grad_(True)
    D_r.requires_grad_(False)
    D_m.requires_grad_(False)
    with autocast():
        fake_images, fake_masks = G(sample_z(B, style_dim, args.mixing, real_images.device))
        adv_r = losses.g_nonsaturating_loss(D_r(fake_images).float()) if images_train else None
        fake_outputs = _float(D_m(*model.generated_pair(fake_images, fake_masks, args.dm_mask)))
        with torch.no_grad():
            real_outputs = _float(D_m(labeled_images, real_pair_mask))
        adv_m = losses.g_hinge_loss(fake_outputs)
        feature_matching = losses.feature_matching_loss(fake_outputs, real_outputs)
    loss = adv_m + args.fm_weight * feature_matching + (adv_r if images_train else 0)
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    out["G"] = loss.detach()
    if images_train:
        out["G_r"] = adv_r.detach()
    out.update(G_m=adv_m.detach(), G_fm=feature_matching.detach())

    # 5. lazy path-length regularisation on half a batch. Not with --train seg: the path length is the image's
    # sensitivity to w, whose gradient reaches the frozen layers only (the mapping, the synthesis convolutions,
    # tImage), so it would change nothing that trains
    if images_train and args.pl_weight > 0 and step % args.pl_every == 0:
        pl_batch = max(1, B // args.pl_batch_shrink)
        with autocast():
            images, masks, w_plus = G(sample_z(pl_batch, style_dim, args.mixing, real_images.device),
                                      return_latents=True)
        penalty, state["mean_path_length"], path_length = losses.path_length_penalty(
            images.float(), w_plus, state["mean_path_length"], sync=args.pl_mean_sync)
        opt_G.zero_grad(set_to_none=True)
        # "+ 0 * outputs": the tSeg layers and the last biases take part (with zero gradient), which DDP
        # requires of each backward
        (args.pl_weight * penalty * args.pl_every + 0 * (images.float().sum() + masks.float().sum())).backward()
        opt_G.step()
        out.update(PL=penalty.detach(), path_length=path_length)

    # 6. exponential moving average of G (--train seg: of tSeg, the rest of G_ema stays as it was)
    if images_train:
        accumulate(state["G_ema"], unwrap(G), args.ema_decay)
    else:
        accumulate(state["G_ema"].t_seg, unwrap(G).t_seg, args.ema_decay)
    return out


def _float(outputs):
    return [[t.float() for t in scale] for scale in outputs]


@torch.no_grad()
def accumulate(ema, net, decay):
    """ema <- decay * ema + (1 - decay) * net, parameter by parameter (buffers are copied)."""
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1 - decay)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


# ----------------------------------------------------------------------------------------------------
# Mask quality without an encoder: the generated masks' area and number of parts, against the labeled masks'.
# A mask branch that degrades while the images stay good (masks shrinking to slivers or breaking into pieces)
# shows in the log as mask_area falling below 1 or mask_parts rising above it, not only in the grids.

MASK_STATS_SIZE = 64  # the statistics are taken at 64 px at most (nearest), so that they cost little


def mask_parts(masks):
    """The number of 4-connected foreground regions of each boolean mask [N, H, W]: every foreground pixel
    takes the largest label among itself and its foreground neighbours until nothing changes, and the
    labels left are the regions."""
    N, H, W = masks.shape
    inside = masks.float()
    labels = torch.arange(1, H * W + 1, dtype=torch.float32, device=masks.device).view(1, H, W) * inside
    while True:
        p = torch.nn.functional.pad(labels, (1, 1, 1, 1))
        neighbours = torch.stack([p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]).amax(0)
        grown = torch.maximum(labels, neighbours) * inside
        if torch.equal(grown, labels):
            return torch.tensor([int((labels[i].unique() > 0).sum()) for i in range(N)])
        labels = grown


def mask_statistics(class_maps, num_labels):
    """(area [L-1], parts [L-1], background parts) of class maps [N, H, W]: for each foreground class, its
    mean share of the pixels and its mean number of regions over the masks that contain it (0 where none
    does: a collapsed mask branch has no region of the class); and the background's mean number of regions,
    which counts holes: a hole in a lung is a background region of its own."""
    if class_maps.shape[-1] > MASK_STATS_SIZE:
        class_maps = torch.nn.functional.interpolate(class_maps[:, None].float(), size=MASK_STATS_SIZE)[:, 0].long()
    area, parts = [], []
    for c in range(1, num_labels):
        present = class_maps == c
        area.append(present.float().mean().item())
        counted = mask_parts(present[present.flatten(1).any(1)])
        parts.append(counted.float().mean().item() if len(counted) else 0.0)
    background = mask_parts(class_maps == 0).float().mean().item()
    return torch.tensor(area), torch.tensor(parts), background


@torch.no_grad()
def mask_quality(G_ema, latents, batch, reference):
    """{'mask_area', 'mask_parts', 'mask_holes'}: the generated masks' area and number of regions per class
    divided by the labeled masks' (`reference`, from mask_statistics), averaged over the classes the labels
    contain, and their number of background regions divided by the labels' (holes and cut-off corners); 1 is
    "like the labels"."""
    maps = torch.cat([model.mask_classes(G_ema(chunk, randomize_noise=False)[1].float()).cpu()
                      for chunk in latents.split(batch)])
    area, parts, background = mask_statistics(maps, losses.label_count(G_ema.num_classes))
    known = reference[0] > 0
    return {"mask_area": torch.tensor((area[known] / reference[0][known]).mean().item()),
            "mask_parts": torch.tensor((parts[known] / reference[1][known]).mean().item()),
            "mask_holes": torch.tensor(background / max(reference[2], 1e-12))}


def labeled_mask_statistics(labeled, num_labels, batch, seed, count=64):
    """mask_statistics of `count` labeled masks as D_m sees them (augmented), from a stream of their own."""
    stream = iter(data.InfiniteLoader(labeled, batch, seed=seed, workers=0, name="labeled pairs"))
    masks = torch.cat([next(stream)[1] for _ in range(math.ceil(count / batch))])[:count]
    return mask_statistics(masks, num_labels)


# ----------------------------------------------------------------------------------------------------
# Samples: image | coloured mask | overlay, from fixed latents of G_ema

@torch.no_grad()
def save_grid(G_ema, latents, path, batch, columns=4):
    """Render `latents` in chunks of `batch` (never all at once: big grids at high resolution run out of
    memory) and write a PNG with, per sample, the image, its mask and the mask over the image."""
    tiles = []
    for chunk in latents.split(batch):
        images, masks = G_ema(chunk, randomize_noise=False)
        for image, classes in zip(images, model.mask_classes(masks.float())):
            rgb, coloured = data.image_to_uint8(image), data.colour_mask(classes.cpu().numpy())
            overlay = np.where(classes.cpu().numpy()[..., None] > 0, (0.5 * rgb + 0.5 * coloured).astype(np.uint8), rgb)
            tiles.append(np.concatenate([rgb, coloured, overlay], axis=1))
    rows = [np.concatenate(tiles[i:i + columns] + [np.zeros_like(tiles[0])] * (columns - len(tiles[i:i + columns])),
                           axis=1) for i in range(0, len(tiles), columns)]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    zoom = max(1, 128 // tiles[0].shape[0])  # small demo resolutions are enlarged (nearest) to be seen
    grid.resize((grid.width * zoom, grid.height * zoom), Image.NEAREST).save(path)


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_path(out_dir, step):
    return os.path.join(out_dir, f"checkpoint-{step:08d}.pt")


def list_checkpoints(out_dir):
    """Complete checkpoints in out_dir, oldest first (temporary files of interrupted writes are ignored)."""
    paths = glob.glob(os.path.join(out_dir, "checkpoint-*.pt"))
    return sorted(p for p in paths if re.fullmatch(r"checkpoint-\d{8}\.pt", os.path.basename(p)))


def save_checkpoint(payload, path, keep):
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a run killed at any
    moment leaves the previous checkpoint intact and never a half-written file under a checkpoint's name.
    A write that fails (disk full, quota, --out removed or read-only) is a TrainingError: training on
    without a way back would only lose more work."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        previous = [p for p in list_checkpoints(os.path.dirname(path)) if p != path]
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise TrainingError(f"cannot write {path} ({model.short_error(error)}): {kept}; free space or fix the "
                            "folder, then continue with --resume auto") from None
    finally:
        if os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass
    if keep:  # only the last `keep` checkpoint-STEP.pt stay (None: rotate nothing, for other files)
        for old in list_checkpoints(os.path.dirname(path))[:-keep]:
            os.remove(old)


def writable_folder(path):
    """Create --out and check that a file can be written there, before any training is spent."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise TrainingError(f"--out {path}: cannot write there ({model.short_error(error)}); pass a writable "
                            "folder") from None


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# Arguments that must match for a resumed run to make sense (the rest, e.g. --iter or --snap, may change).
ARCHITECTURE_ARGS = ("resolution", "style_dim", "n_mlp", "channel_multiplier", "max_channels", "dm_mask")


# ----------------------------------------------------------------------------------------------------
# The training loop


class Stopped(Exception):
    """The run stopped on a signal (main() reports it and exits 128 + signal): after writing a checkpoint
    at `step`, or, with step None, without one because the step under way did not end (StopOnSignal)."""

    def __init__(self, signum, step=None, out=None, waited=None):
        by = signal.Signals(signum).name if signum else "a signal to another process"
        if step is None:
            message = (f"stopped by {by}: the step under way had not ended {waited:.0f} s later, so no checkpoint "
                       "was written (the last one is intact); continue with --resume auto")
        else:
            message = (f"stopped by {by} at step {step}: checkpoint {checkpoint_path(out, step)} written; "
                       "continue with --resume auto")
        super().__init__(message)
        self.signum = signum or signal.SIGTERM


class StopOnSignal:
    """SIGTERM and SIGINT ask the run to stop after the current step (`signum` is then set); a second
    Ctrl-C stops at once (KeyboardInterrupt; the last checkpoint stays). The data loaders' workers ignore
    both (data.leave_signals_to_the_main_process), so a signal sent to the whole job, as SLURM sends it,
    leaves them running until the checkpoint is written.

    A step that cannot end (a data loader that never delivers, a wait that never returns) must not make
    the process deaf: after the first signal a watchdog thread watches the steps, and when one has run on
    for GRACE seconds since the signal (or 3 times the longest step so far, if that is longer) it interrupts
    the main thread,
    which stops with Stopped and no checkpoint. It watches the steps only, between step_started() and
    step_ended(), never what the loop does between them (validation, checkpoints, grids: a snapshot that
    takes its time is written whole), and the interrupt acts only if, when it arrives, a step is still
    under way and the watchdog still armed; disarm() once the loop has agreed to stop. What it cannot do:
    a wait inside C code (a collective whose peer died, a read from a hung file system) runs on until it
    returns, since Python acts on a signal only between its own instructions."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    GRACE = 60.0

    def __init__(self):
        self.signum, self.previous, self.pid = None, {}, os.getpid()
        self.signalled_at = self.step_start = time.monotonic()
        self.in_step = False
        self.longest_step, self.disarmed, self.expired, self.fired = 0.0, False, None, False
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self.previous = {s: signal.signal(s, self.handler) for s in self.SIGNALS}

    def handler(self, signum, frame):
        if os.getpid() != self.pid:  # a loader worker (it inherited the handler): the main process decides
            return
        if self.fired:  # the watchdog's interrupt: act only if the step is still under way
            self.fired = False
            if self.in_step and not self.disarmed:
                raise Stopped(self.signum, waited=self.expired)
            return
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:  # nothing printed here: the handler may interrupt a print
            self.signum, self.signalled_at = signum, time.monotonic()
            threading.Thread(target=self.watch, daemon=True).start()

    def step_started(self):
        self.step_start, self.in_step = time.monotonic(), True

    def step_ended(self):
        """Record the end of a step; returns the signal received so far, or None."""
        self.in_step = False
        self.longest_step = max(self.longest_step, time.monotonic() - self.step_start)
        return self.signum

    def watch(self):
        while not self.disarmed:
            waited = time.monotonic() - max(self.signalled_at, self.step_start)
            if self.in_step and not self.fired and waited > max(self.GRACE, 3 * self.longest_step):
                self.expired, self.fired = waited, True
                _thread.interrupt_main()  # SIGINT's handler (this one) runs in the main thread
            time.sleep(0.1)

    def disarm(self):
        self.disarmed = True

    def restore(self):
        self.disarm()
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Agreement:
    """Decisions that every rank must take at the same step although each has its own clock and its own
    signals (stop now? report now?). Each step, every rank all-reduces (MAX) its flags and reads the
    result one step later: all ranks then act at the same step, one after the first rank wanted to,
    and the host never waits for the GPU (the flags are copied back to pinned memory behind the step
    that produced them, so reading them waits only for that step, long finished). One process: at once."""

    def __init__(self, world, device, count):
        self.world, self.device = world, device
        pin = device.type == "cuda"
        self.send, self.receive = torch.zeros(count, pin_memory=pin), torch.zeros(count, pin_memory=pin)
        self.done = None  # the CUDA event after the last exchange (True on the CPU, where it is synchronous)

    def __call__(self, *flags):
        if self.world == 1:
            return tuple(bool(f) for f in flags)
        agreed = (False,) * len(flags)
        if self.done is not None:
            if self.done is not True:
                self.done.synchronize()
            agreed = tuple(v > 0 for v in self.receive.tolist())
        self.send.copy_(torch.tensor([float(bool(f)) for f in flags]))
        exchanged = self.send.to(self.device, non_blocking=True)
        dist.all_reduce(exchanged, op=dist.ReduceOp.MAX)
        self.receive.copy_(exchanged, non_blocking=True)
        self.done = True
        if self.device.type == "cuda":
            self.done = torch.cuda.Event()
            self.done.record()
        return agreed


def warn_unreadable(stream, first=5):
    """Name the first few unreadable pool images on stderr; past them, the progress line counts them."""
    already = stream.reported
    for count, (path, reason) in enumerate(stream.new_unreadable(), start=already + 1):
        if count <= first:
            print(f"warning: {reason}; replaced by another image of the pool", file=sys.stderr, flush=True)
        if count == first:
            print("warning: further unreadable images are only counted: progress line and log.jsonl "
                  "(unreadable_images)", file=sys.stderr, flush=True)


def tensorboard_writer(args, rank, step):
    """--tensorboard: a SummaryWriter into --out on rank 0 (None on the others, or without the option), whose
    event files get what log.jsonl gets and the sample grids. Here because train_encoder.py takes its
    progress reporting from this file too. Without the tensorboard package, a TrainingError (one line) on
    every rank before training starts; the package stays optional (not in requirements.txt)."""
    if not args.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainingError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    if rank != 0:
        return None
    # a resumed run logs the steps after its checkpoint again: TensorBoard hides the stopped run's (purge_step)
    return SummaryWriter(args.out, purge_step=step or None)


class Progress:
    """Sums the losses on the device (no synchronisation per step) and reports every --log-every seconds:
    a line on the console and the same numbers as a JSON line in OUT/log.jsonl, with the wall-clock time
    ("time", ISO 8601 with the UTC offset) and the seconds of training so far ("elapsed": a resumed run
    continues from its checkpoint's, the time it was stopped not counted); and to TensorBoard's event files
    when a writer is given (--tensorboard)."""

    def __init__(self, path, global_batch, total_steps, start_step, device, elapsed=0.0, tensorboard=None):
        self.path, self.global_batch, self.total_steps, self.device = path, global_batch, total_steps, device
        self.sums, self.counts, self.measured = {}, {}, set()
        self.last_time, self.last_step = time.time(), start_step
        self.started, self.tensorboard = self.last_time - elapsed, tensorboard

    def elapsed(self):
        return time.time() - self.started

    def add(self, values, measured=False):
        """Losses, or with `measured` numbers that measure the run (the masks' quality, validation scores):
        a loss that is not finite stops the run, a measurement is logged (null in log.jsonl) and the run
        goes on: a collapsed mask branch is what mask_parts exists to report, not a reason to stop."""
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
            self.counts[k] = self.counts.get(k, 0) + 1
            if measured:
                self.measured.add(k)

    def averages(self):
        """The mean of each loss since the last report. Synchronises with the device."""
        return {k: (v / self.counts[k]).item() for k, v in self.sums.items()}

    def report(self, step, rank, world, counts=None):
        """Called at the same step on every rank. `counts`: totals (e.g. unreadable_images), summed over
        the ranks and shown when not zero."""
        means, counts = self.averages(), dict(counts or {})
        if world > 1:  # every rank checks for NaN, so every rank must see the same numbers
            names, count_names = sorted(means), sorted(counts)
            t = torch.tensor([means[n] for n in names] + [float(counts[n]) for n in count_names], device=self.device)
            dist.all_reduce(t)
            means = dict(zip(names, (t[:len(names)] / world).tolist()))
            counts = {n: int(v) for n, v in zip(count_names, t[len(names):].tolist())}
        bad = [k for k, v in means.items() if not math.isfinite(v) and k not in self.measured]
        if bad:
            raise TrainingError(f"the loss {', '.join(bad)} became {means[bad[0]]} by step {step}: training diverged. "
                                f"The last good checkpoint is untouched; resume from it with a lower --lr or a larger --r1")
        now = time.time()
        seconds = now - self.last_time
        steps = max(step - self.last_step, 1)
        img_per_s = steps * self.global_batch / max(seconds, 1e-9)
        record = {"step": step, "kimg": step * self.global_batch / 1000,
                  "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "elapsed": now - self.started, "img_per_s": img_per_s,
                  "sec_per_kimg": 1000 / max(img_per_s, 1e-9),
                  "eta_hours": (self.total_steps - step) * self.global_batch / max(img_per_s, 1e-9) / 3600,
                  **{k: v if math.isfinite(v) else None for k, v in means.items()}, **counts}
        if self.device.type == "cuda":
            record["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        if rank == 0:
            losses_text = "  ".join(f"{k} {v:.4f}" for k, v in means.items())
            mem = f"  mem {record['gpu_mem_gib']:.1f} GiB" if "gpu_mem_gib" in record else ""
            counted = "".join(f"  {k.replace('_', ' ')} {v}" for k, v in counts.items() if v)
            print(f"step {step:>8}  kimg {record['kimg']:9.1f}  {img_per_s:7.1f} img/s  {record['sec_per_kimg']:7.2f} s/kimg  "
                  f"eta {record['eta_hours']:6.2f} h  {losses_text}{mem}{counted}", flush=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tensorboard is not None:
                for key, value in record.items():
                    if key not in ("step", "time") and value is not None:
                        self.tensorboard.add_scalar(key, value, step)
                self.tensorboard.flush()
        self.sums, self.counts = {}, {}
        self.last_time, self.last_step = now, step

    def image(self, tag, path, step):
        """A sample grid, as written to `path`, to TensorBoard (rank 0, --tensorboard)."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
            self.tensorboard.flush()

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()


def train(args):
    rank, world, device = setup_distributed()
    try:
        _train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def open_streams(args, labeled, unlabeled, rank, world, seed):
    """The labeled and the unlabeled stream, seeded (`seed`, and `seed` + 1)."""
    return (data.InfiniteLoader(labeled, args.batch, seed=seed, rank=rank, world_size=world, workers=args.workers,
                                name="labeled pairs"),
            data.InfiniteLoader(unlabeled, args.batch, seed=seed + 1, rank=rank, world_size=world,
                                workers=args.workers, name="unlabeled pool", max_unreadable=args.max_unreadable))


def find_resume(args):
    """The checkpoint to resume from: --resume, the latest in --out for 'auto', or None (a fresh start). A
    run never writes its checkpoints among another run's (rotation would remove them, --resume auto would
    mix the two): a fresh start into an --out that holds checkpoints, or a resume from a checkpoint of
    another folder into one, is a TrainingError."""
    found = list_checkpoints(args.out)
    resume = args.resume
    if resume == "auto":
        resume = found[-1] if found else None
    elsewhere = resume and os.path.isfile(resume) and not os.path.samefile(os.path.dirname(os.path.abspath(resume)),
                                                                         args.out)
    if found and (not resume or elsewhere):
        raise TrainingError(f"--out {args.out} holds the checkpoints of another run (the latest {found[-1]}): "
                            "continue it with --resume auto (or one of its checkpoints), or pass another --out")
    if args.new_data and not resume:
        raise TrainingError("--new-data continues a run over changed data: pass it with --resume (no checkpoint "
                            f"found in {args.out})")
    return resume


def checkpoint_step(path):
    return int(re.search(r"-(\d{8})\.\w+$", path)[1])


def set_aside_later_snapshots(out, step, also=()):
    """Resuming from a checkpoint older than the latest in --out (rolling back) makes the later snapshots
    another run's: they move to OUT/abandoned-after-STEP/ (checkpoints, grids, the log's later records, and
    the files of `also`, e.g. model.pt, when they were written later), so that rotation and --resume auto
    follow the run that goes on and nothing is lost. Returns that folder, or None when there was none."""
    later = [p for p in list_checkpoints(out) if checkpoint_step(p) > step]
    if not later:
        return None
    aside, n = os.path.join(out, f"abandoned-after-{step:08d}"), 1
    while os.path.exists(aside):
        n += 1
        aside = os.path.join(out, f"abandoned-after-{step:08d}-{n}")
    os.makedirs(aside)
    grids = [p for p in glob.glob(os.path.join(out, "samples-*.png"))
             if re.fullmatch(r"samples-\d{8}\.png", os.path.basename(p)) and checkpoint_step(p) > step]
    written_later = [os.path.join(out, name) for name in also
                     if os.path.isfile(os.path.join(out, name))
                     and model.load_checkpoint(os.path.join(out, name)).get("step", 0) > step]
    for path in later + grids + written_later:
        os.replace(path, os.path.join(aside, os.path.basename(path)))
    log = os.path.join(out, "log.jsonl")
    if os.path.isfile(log):
        with open(log) as f:
            lines = f.readlines()
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        with open(os.path.join(aside, "log.jsonl"), "w") as f:
            f.writelines(line for line in lines if json.loads(line).get("step", 0) > step)
        with open(log + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(log + ".tmp", log)
    return aside


def check_resumable(ckpt, path):
    """A CheckpointError (one line, pointing to --init where that is what was meant) unless `ckpt` is a
    stage-1 checkpoint of train_gan.py, which alone holds what --resume continues: the optimisers, the
    step, the data streams, the RNGs."""
    source = model.checkpoint_source(ckpt)
    if isinstance(ckpt, dict) and ckpt.get("stage") == "encoder":
        raise model.CheckpointError(f"{path} is a checkpoint of train_encoder.py: resume it with train_encoder.py "
                                    "--resume")
    if isinstance(ckpt, dict) and ckpt.get("format") == model.BUNDLE_FORMAT:
        what = "a model.pt of train_encoder.py"
    elif source in ("official", "rosinality"):
        what = f"a checkpoint of {model.SOURCES[source]}"
    elif not isinstance(ckpt, dict) or not RESUMED <= set(ckpt) or not isinstance(ckpt["args"], dict):
        what = f"not a checkpoint of train_gan.py ({type(ckpt).__name__} without {', '.join(sorted(RESUMED))})"
    else:
        return ckpt
    raise model.CheckpointError(f"{path} is {what}: --resume continues a train_gan.py run; to start a new run "
                                f"from its weights pass --init {path}")


# What a stage-1 checkpoint must hold for --resume to continue it.
RESUMED = {"G", "G_ema", "D_r", "D_m", "opt_G", "opt_D_r", "opt_D_m", "step", "mean_path_length", "labeled_stream",
           "unlabeled_stream", "rng", "image_channels", "num_classes", "args"}


def check_out_apart(out, *folders):
    """--out must not lie inside the data (its sample grids would become training images) nor be a folder the
    run reads from."""
    for option, folder in folders:
        if folder and folder != "demo" and os.path.isdir(folder) and data.inside(out, folder):
            raise TrainingError(f"--out {out} lies inside {option} {folder}: the sample grids written there would "
                                "be read as images; pass an --out outside the data")


def resumed_streams(args, saved, labeled, unlabeled, rank, world):
    """The data streams of a resumed run: where checkpoint `saved` left them, or with --new-data fresh ones
    over the data as it is now, seeded by the step."""
    if args.new_data:
        return open_streams(args, labeled, unlabeled, rank, world, args.seed + 7919 * saved["step"])
    streams = open_streams(args, labeled, unlabeled, rank, world, args.seed)
    for stream, key in zip(streams, ("labeled_stream", "unlabeled_stream")):
        stream.load_state_dict(saved[key])
    return streams


# ----------------------------------------------------------------------------------------------------
# Starting from existing weights (--init): a checkpoint of this project, of the official SemanticGAN code, or a
# StyleGAN2 generator of rosinality/stylegan2-pytorch (model.py maps them onto these networks)


NETWORK_ARGS = ("resolution", "style_dim", "n_mlp", "channel_multiplier", "max_channels")


def read_init(args, resume=None):
    """The networks of --init: {"path", "source", "tensors" (official layout), "shapes"} (model.read_networks).
    The shape is the file's: --resolution and the network options are set from it, and one given with another
    value is a TrainingError. Resuming, the file read is the checkpoint `resume` (of the same shape, which
    --init gave it), so that a run continues when its --init file has gone."""
    path = resume or args.init
    source, tensors, shapes = model.read_networks(path, "pass --init a checkpoint of train_gan.py, of the official "
                                                  "train_seg_gan.py or of rosinality/stylegan2-pytorch")
    generator, parser = shapes["generator"], build_parser()
    for key in NETWORK_ARGS:
        given = getattr(args, key)
        if given != parser.get_default(key) and given != generator[key]:
            option = "--" + key.replace("_", "-")
            raise TrainingError(f"{'--resume' if resume else '--init'} {path} holds a generator with {option} "
                                f"{generator[key]}, not {given}: leave {option} out (the file's is used)")
        setattr(args, key, generator[key])
    return {"path": path, "source": source, "tensors": tensors, "shapes": shapes}


def check_image_channels(init, image_channels):
    """An --init generator of other images than the data's (an RGB FFHQ generator, grey radiographs) cannot
    be trained on them: a TrainingError saying so."""
    made = init["shapes"]["generator"]["image_channels"]
    if made != image_channels:
        kind = {1: "grey", 3: "RGB"}
        raise TrainingError(f"--init {init['path']} generates {kind.get(made, made)} images ({made} channels), the data "
                            f"is {kind.get(image_channels, image_channels)} ({image_channels}): pass --channels {made} "
                            f"to read the images as {kind.get(made, made)}, or --init a generator of "
                            f"{image_channels}-channel images")


def start_from(init, G, G_ema, D_r, D_m, args):
    """Fill the networks from --init (step 0, fresh optimisers): G and G_ema, D_r and D_m where the file has
    them. The classes are the data's: a file with another number of mask channels, or none (a StyleGAN2
    generator), leaves tSeg (and D_m's first layers, which read the mask) as initialised. Returns the line
    that says what came from where."""
    tensors, path, saved = init["tensors"], init["path"], init["shapes"]["generator"]["num_classes"]
    other_classes = saved != G.num_classes
    trained = init["shapes"].get("dm_mask")  # what the file's D_m saw of a mask, and its tSeg learnt to give it
    if trained and not other_classes and trained != args.dm_mask:
        raise TrainingError(f"--init {path} learnt its masks for a D_m that saw {trained}, this run gives D_m "
                            f"{args.dm_mask}: pass --dm-mask {trained}")
    # --train seg learns tSeg on the generator that is used afterwards, G_ema ("g" holds the last iterate)
    g = "g" if "g" in tensors and args.train == "all" else "g_ema"
    model.load_official(G, tensors[g], path, g, fresh=r"t_seg\." if other_classes else None)
    model.load_official(G_ema, tensors["g_ema"], path, "g_ema", fresh=r"t_seg\." if other_classes else None)
    taken, fresh = [f"G from {g}", "G_ema from g_ema"], []
    d_img = "d" if init["source"] == "rosinality" else "d_img"
    if "d_img" in tensors:
        model.load_official(D_r, tensors["d_img"], path, d_img)
        taken.append(f"D_r from {d_img}")
    else:
        fresh.append("D_r")
    if "d_seg" in tensors:
        model.load_official(D_m, tensors["d_seg"], path, "d_seg",
                            fresh=r"scales\.\d+\.layers\.0\." if other_classes else None)
        taken.append("D_m from d_seg")
    else:
        fresh.append("D_m")
    if saved is None:
        fresh.append("tSeg (the file has no mask branch)")
    elif other_classes:
        first = " and D_m's first layers" if "d_seg" in tensors else ""
        fresh.append(f"tSeg{first} (the file's masks have {saved} channel(s), the data's {G.num_classes})")
    return (f"started from {path} ({model.SOURCES[init['source']]}): {', '.join(taken)}"
            + (f"; fresh: {', '.join(fresh)}" if fresh else "") + "; step 0, fresh optimisers")


def _train(args, rank, world, device):
    torch.manual_seed(args.seed)  # the same initial weights on every rank (G_ema is copied before DDP syncs G)
    if device.type == "cuda":
        # PyTorch's defaults otherwise, as the official code ran: TF32 convolutions, fp32 matmuls (the
        # mapping network); bf16 autocast, the default here, runs both in bf16 anyway
        torch.backends.cudnn.benchmark = True

    check_out_apart(args.out, ("--data", args.data), ("--labeled", args.labeled))
    writable_folder(args.out)
    resume = find_resume(args)
    if args.train == "seg" and not args.init and not resume:
        raise TrainingError("--train seg trains the mask branch of an existing generator: pass --init with a "
                            "checkpoint of this project, of the official SemanticGAN code or a rosinality StyleGAN2")
    init = read_init(args, resume) if args.init else None  # before the data: it decides the resolution
    labeled, unlabeled, info = data.build_datasets(args, replace_unreadable=True)
    if labeled is None:
        raise TrainingError("D_m needs labeled pairs: pass a folder with images/ and masks/ via --labeled "
                            "(or as --data), or --data demo")
    if args.dm_mismatched and info["labeled_count"] < 2:
        raise TrainingError("--dm-mismatched pairs labeled images with other labeled images' masks: it needs 2 "
                            "labeled pairs or more")
    image_channels, num_classes = info["channels"], info["num_classes"]
    if init:
        check_image_channels(init, image_channels)
    G, G_ema, D_r, D_m = build_networks(args, image_channels, num_classes, device, init and init["shapes"])
    opt_G, opt_D_r, opt_D_m = build_optimizers(args, G, D_r, D_m)
    autocast, precision = model.make_autocast(args, device)
    labeled_stream, unlabeled_stream = open_streams(args, labeled, unlabeled, rank, world, args.seed)
    state = {"G_ema": G_ema, "mean_path_length": torch.zeros((), device=device)}
    step = 0
    torch.manual_seed(args.seed + rank)  # from here on each rank draws its own latents and noise
    random.seed(args.seed + rank)

    if resume:
        ckpt = check_resumable(model.load_checkpoint(resume), resume)
        for key in ARCHITECTURE_ARGS:
            if ckpt["args"].get(key) != getattr(args, key):
                raise TrainingError(f"checkpoint {resume} was trained with --{key.replace('_', '-')} "
                                    f"{ckpt['args'].get(key)}, not {getattr(args, key)}: pass the same value to resume")
        trained = ckpt["args"].get("train", "all")  # older checkpoints: all
        if trained != args.train:
            raise TrainingError(f"checkpoint {resume} was trained with --train {trained}, not {args.train}: pass the "
                                f"same value to resume (a new run can start from it: --init {resume} --train "
                                f"{args.train})")
        if (ckpt["image_channels"], ckpt["num_classes"]) != (image_channels, num_classes):
            raise TrainingError(f"checkpoint {resume} has {ckpt['image_channels']} image channels and "
                                f"{ckpt['num_classes']} classes, the data {image_channels} and {num_classes}")
        saved_channels = ckpt.get("mask_channels", ckpt["num_classes"])  # older checkpoints: one per class
        if saved_channels != G.num_classes:
            form = "sigmoid" if saved_channels == 1 else "softmax"
            raise TrainingError(f"checkpoint {resume} has {saved_channels} mask channel(s), --binary "
                                f"{args.binary} makes {G.num_classes}: pass --binary {form} to resume it")
        G.load_state_dict(ckpt["G"])
        G_ema.load_state_dict(ckpt["G_ema"])
        D_r.load_state_dict(ckpt["D_r"])
        D_m.load_state_dict(ckpt["D_m"])
        opt_G.load_state_dict(ckpt["opt_G"])
        opt_D_r.load_state_dict(ckpt["opt_D_r"])
        opt_D_m.load_state_dict(ckpt["opt_D_m"])
        state["mean_path_length"] = ckpt["mean_path_length"].to(device)
        step = ckpt["step"]
        labeled_stream, unlabeled_stream = resumed_streams(args, ckpt, labeled, unlabeled, rank, world)
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank])
        else:  # a different number of processes: fresh, distinct streams per rank
            torch.manual_seed(args.seed + rank + 7919 * step)
            random.seed(args.seed + rank + 7919 * step)
        if rank == 0:
            fresh = " with fresh data streams (--new-data)" if args.new_data else ""
            print(f"resumed from {resume} at step {step}{fresh}", flush=True)
            aside = set_aside_later_snapshots(args.out, step)
            if aside:
                print(f"rolled back: the later snapshots of {args.out} moved to {aside}", flush=True)
    elif init:
        taken = start_from(init, G, G_ema, D_r, D_m, args)
        if rank == 0:
            print(taken, flush=True)

    nets = (G, D_r, D_m)
    if world > 1:
        ddp = lambda m: torch.nn.parallel.DistributedDataParallel(  # noqa: E731
            m, device_ids=[device.index] if device.type == "cuda" else None)
        # a network without trainable parameters (D_r with --train seg) takes no part in any backward
        nets = tuple(ddp(m) if any(p.requires_grad for p in m.parameters()) else m for m in nets)

    global_batch = args.batch * world
    total_steps = args.iter
    grid_latents = torch.randn(args.grid, args.style_dim, generator=torch.Generator().manual_seed(args.seed + 12345))
    grid_latents = grid_latents.to(device)
    snapshot_every = max(1, round(args.snap_kimg * 1000 / global_batch))
    quality_latents = torch.randn(64, args.style_dim, generator=torch.Generator().manual_seed(args.seed + 54321))
    quality_latents = quality_latents.to(device)
    label_statistics = labeled_mask_statistics(labeled, losses.label_count(G.num_classes), args.batch, args.seed + 2)
    if rank == 0:
        counts = f"{info['labeled_count']} labeled pairs and {info['unlabeled_count']} images from {info['source']}"
        masks = "one sigmoid mask channel" if G.num_classes == 1 else f"{G.num_classes} mask channels"
        print(f"semanticgan stage 1: {args.resolution} px, {image_channels} image channels, {num_classes} classes "
              f"({masks}); "
              f"{world} process(es) on {device.type}, batch {args.batch} per process = {global_batch} global; "
              f"precision {precision}; {total_steps} steps = {total_steps * global_batch / 1000:.1f} kimg; "
              f"snapshot every {snapshot_every} steps; data: {counts}", flush=True)
        print("labeled masks, per foreground class: area " + ", ".join(f"{a:.3f}" for a in label_statistics[0].tolist())
              + "; regions " + ", ".join(f"{p:.2f}" for p in label_statistics[1].tolist())
              + f"; background regions {label_statistics[2]:.2f}"
              + " (at every snapshot, mask_area, mask_parts and mask_holes: the generated masks' against these, "
                "1 = alike)",
              flush=True)
        print(f"G {sum(p.numel() for p in G.parameters()):,} parameters, D_r {sum(p.numel() for p in D_r.parameters()):,}, "
              f"D_m {sum(p.numel() for p in D_m.parameters()):,}", flush=True)
    progress = Progress(os.path.join(args.out, "log.jsonl"), global_batch, total_steps, step, device,
                        elapsed=ckpt.get("elapsed", 0.0) if resume else 0.0,
                        tensorboard=tensorboard_writer(args, rank, step))
    last_log = time.time()
    labeled_iter, unlabeled_iter = iter(labeled_stream), iter(unlabeled_stream)
    stopper, agree = StopOnSignal(), Agreement(world, device, 2)
    try:
        while step < total_steps:
            stopper.step_started()
            real_images = next(unlabeled_iter)
            warn_unreadable(unlabeled_stream)
            labeled_images, labeled_masks = next(labeled_iter)
            batch = (real_images.to(device, non_blocking=True), labeled_images.to(device, non_blocking=True),
                     labeled_masks.to(device, non_blocking=True), labeled_stream.indices)
            if args.channels_last and device.type == "cuda":
                batch = tuple(t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t for t in batch)
            progress.add(train_step(step, nets, (opt_G, opt_D_r, opt_D_m), batch, args, state, autocast))
            step += 1

            stop, log_due = agree(stopper.step_ended(), time.time() - last_log >= args.log_every)
            if stop:
                stopper.disarm()  # the step ended: what is left is the checkpoint
            snapshot = step % snapshot_every == 0 or step == total_steps or stop
            if snapshot:  # every rank the same numbers (the same G_ema and latents)
                progress.add(mask_quality(G_ema, quality_latents, args.batch, label_statistics), measured=True)
            if snapshot or log_due:
                # raises on NaN before anything is written
                progress.report(step, rank, world, {"unreadable_images": len(unlabeled_stream.unreadable)})
                last_log = time.time()
            if snapshot:
                rngs = [rng_state()]
                if world > 1:
                    rngs = [None] * world
                    dist.all_gather_object(rngs, rng_state())
                if rank == 0:
                    payload = {"G": unwrap(G).state_dict(), "G_ema": G_ema.state_dict(), "D_r": unwrap(D_r).state_dict(),
                               "D_m": unwrap(D_m).state_dict(), "opt_G": opt_G.state_dict(),
                               "opt_D_r": opt_D_r.state_dict(), "opt_D_m": opt_D_m.state_dict(), "step": step,
                               "mean_path_length": state["mean_path_length"].detach().cpu(),
                               "labeled_stream": labeled_stream.state_dict(),
                               "unlabeled_stream": unlabeled_stream.state_dict(), "rng": rngs,
                               "image_channels": image_channels, "num_classes": num_classes,
                               "mask_channels": G_ema.num_classes, "elapsed": progress.elapsed(),
                               "args": {k: v for k, v in vars(args).items()}}
                    save_checkpoint(payload, checkpoint_path(args.out, step), args.keep)
                    if not stop:  # the grid after the checkpoint: a preempted job has seconds left
                        grid_path = os.path.join(args.out, f"samples-{step:08d}.png")
                        save_grid(G_ema, grid_latents, grid_path, args.batch)
                        progress.image("samples", grid_path, step)
                if world > 1:
                    dist.barrier()
                if stop:
                    raise Stopped(stopper.signum, step, args.out)
    finally:
        stopper.restore()
        progress.close()
    if rank == 0:
        print(f"done: {step} steps; checkpoints and samples in {args.out}", flush=True)
    return {"G": unwrap(G), "G_ema": G_ema, "D_r": unwrap(D_r), "D_m": unwrap(D_m)}


# ----------------------------------------------------------------------------------------------------
# Throughput benchmark: the real training step on synthetic batches already on the device


def benchmark(args):
    """Steady-state throughput: img/s over --bench-steps full iterations (a multiple of the
    regularisation intervals, so R1 and path length are counted at their real frequency) after one interval
    of warm-up, and the peak memory, for each precision x ops implementation."""
    _, _, device = setup_distributed()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels, classes, B, R = args.channels or 3, args.num_classes or 8, args.batch, args.resolution
    period = math.lcm(args.r1_every, args.pl_every)
    steps = max(period, args.bench_steps // period * period)
    trained = "all regularisers on" if args.train == "all" else "--train seg (tSeg and D_m; no D_r, no path length)"
    print(f"stage-1 training throughput: {R} px, batch {B}, {classes} classes, {channels} image channels, "
          f"{trained}; {steps} steps timed after {period} warm-up, on {device}")
    print(f"{'precision':<10} {'ops':<5} {'img/s':>8} {'s/kimg':>8} {'peak GiB':>9}")
    for precision in args.bench_precisions:
        for impl in args.bench_impls:
            os.environ["SEMANTICGAN_OPS"] = "ref" if impl == "ref" else ""
            torch.manual_seed(0)
            random.seed(0)
            G, G_ema, D_r, D_m = build_networks(args, channels, classes, device)
            optimizers = build_optimizers(args, G, D_r, D_m)
            args.precision = precision
            autocast, _ = model.make_autocast(args, device)
            state = {"G_ema": G_ema, "mean_path_length": torch.zeros((), device=device)}
            batch = (torch.randn(B, channels, R, R, device=device), torch.randn(B, channels, R, R, device=device),
                     torch.randint(0, classes, (B, R, R), device=device))
            if args.channels_last and device.type == "cuda":
                batch = tuple(t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t for t in batch)
            for step in range(period):
                train_step(step, (G, D_r, D_m), optimizers, batch, args, state, autocast)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for step in range(period, period + steps):
                train_step(step, (G, D_r, D_m), optimizers, batch, args, state, autocast)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
            img_per_s = steps * B / seconds
            print(f"{precision:<10} {impl:<5} {img_per_s:>8.1f} {1000 / img_per_s:>8.2f} {peak:>9.2f}", flush=True)
            del G, G_ema, D_r, D_m, optimizers, state
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    """The options, each checked when parsed (data.number: one error line for a bad value)."""
    p = data.ArgumentParser(description="Stage 1 of SemanticGAN: train G (image + mask), D_r and D_m.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.add_data_args(p, resolutions=model.RESOLUTIONS)
    g = p.add_argument_group("training (defaults: the official configuration)")
    g.add_argument("--out", default="runs/semanticgan", help="output folder: checkpoints, sample grids, log.jsonl")
    g.add_argument("--iter", type=data.POSITIVE_INT, default=800000, help="training iterations")
    g.add_argument("--kimg", type=data.POSITIVE, default=None,
                   help="budget in thousands of global images (overrides --iter)")
    g.add_argument("--batch", type=data.POSITIVE_INT, default=16,
                   help="batch per GPU / process (global = batch x processes)")
    g.add_argument("--lr", type=data.POSITIVE, default=0.002)
    g.add_argument("--r1", type=data.NON_NEGATIVE, default=10.0, help="R1 gamma, for D_r and D_m")
    g.add_argument("--r1-every", type=data.POSITIVE_INT, default=16)
    g.add_argument("--pl-weight", type=data.NON_NEGATIVE, default=2.0, help="path-length weight (0 disables)")
    g.add_argument("--pl-every", type=data.POSITIVE_INT, default=4)
    g.add_argument("--pl-batch-shrink", type=data.POSITIVE_INT, default=2)
    g.add_argument("--fm-weight", type=data.NON_NEGATIVE, default=2.0, help="D_m feature-matching weight")
    g.add_argument("--dm-mask", choices=model.DM_MASK_INPUTS, default="logits",
                   help="what D_m sees of a mask: the official raw logits against one-hot in {-1, +1}, or "
                        "softmax probabilities against one-hot in {0, 1}")
    g.add_argument("--binary", choices=model.BINARY_FORMS, default="sigmoid",
                   help="data with one foreground class: one mask channel decided by sigmoid > 0.5 (the "
                        "official form) or two softmax channels")
    g.add_argument("--dm-r1", choices=["official", "per-sample"], default="official",
                   help="D_m's R1: the official score (batch-mean logits, 1/B^2 of a per-sample R1) or a "
                        "per-sample R1 with the full gamma, as D_r's")
    g.add_argument("--dm-mismatched", action="store_true",
                   help="ours: D_m also learns real images with another labeled image's mask as fakes, so that "
                        "it judges whether a mask fits its image (README, issue 21)")
    g.add_argument("--shared-fakes", action=argparse.BooleanOptionalAction, default=True,
                   help="one generator forward serves the D_r and the D_m step (the official code runs two)")
    g.add_argument("--pl-mean-sync", action=argparse.BooleanOptionalAction, default=True,
                   help="all processes share one path-length running mean (the official code keeps one each)")
    g.add_argument("--mixing", type=data.FRACTION, default=0.9, help="style-mixing probability")
    g.add_argument("--ema-decay", type=data.FRACTION, default=0.5 ** (32 / 10000), help="G_ema decay per step")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto = bf16 autocast on GPUs that have it, fp32 elsewhere")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format on GPU")
    g.add_argument("--resume", default=None, help="a checkpoint, or 'auto' for the latest in --out (fresh start if none)")
    g.add_argument("--new-data", action="store_true", help="with --resume: keep the networks, optimisers, G_ema "
                   "and step, and start fresh seeded data streams (the data changed since the checkpoint)")
    g.add_argument("--init", default=None, metavar="PATH", help="start from these weights (step 0, fresh "
                   "optimisers): a checkpoint or --out folder of this project, a checkpoint of the official "
                   "train_seg_gan.py, or a rosinality/stylegan2-pytorch StyleGAN2 (its tSeg and D_m start fresh); "
                   "the networks' shape is the file's, the classes the data's")
    g.add_argument("--train", choices=["all", "seg"], default="all", help="seg: only tSeg and D_m train, the image "
                   "branch and the synthesis layers stay frozen and D_r's step is skipped (a segmenter on top of "
                   "an --init generator)")
    g.add_argument("--snap-kimg", type=data.POSITIVE, default=50.0,
                   help="sample grid + checkpoint every this many kimg")
    g.add_argument("--keep", type=data.POSITIVE_INT, default=3, help="checkpoints kept")
    g.add_argument("--grid", type=data.POSITIVE_INT, default=16, help="samples in the grid")
    g.add_argument("--log-every", type=data.NON_NEGATIVE, default=10.0, help="seconds between progress lines")
    g.add_argument("--tensorboard", action="store_true", help="also write the progress numbers and the sample "
                   "grids as TensorBoard event files in --out (needs pip install tensorboard)")
    b = p.add_argument_group("benchmark (instead of training)")
    b.add_argument("--benchmark", action="store_true", help="time the training step on synthetic data and exit")
    b.add_argument("--bench-steps", type=data.POSITIVE_INT, default=64)
    b.add_argument("--bench-precisions", type=data.choice_list(("fp32", "bf16")), default="fp32,bf16")
    b.add_argument("--bench-impls", type=data.choice_list(("cuda", "ref")), default="cuda,ref",
                   help="'cuda' = fused ops + gradfix, 'ref' = plain PyTorch")
    n = p.add_argument_group("networks (defaults: StyleGAN2 config-f; narrow them for CPU demos)")
    n.add_argument("--style-dim", type=data.POSITIVE_INT, default=512)
    n.add_argument("--n-mlp", type=data.POSITIVE_INT, default=8, help="mapping layers")
    n.add_argument("--channel-multiplier", type=data.POSITIVE_INT, default=2)
    n.add_argument("--max-channels", type=data.POSITIVE_INT, default=512, help="cap on feature maps in G, D_r, D_m")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.kimg is not None:
        args.iter = max(1, round(args.kimg * 1000 / (args.batch * int(os.environ.get("WORLD_SIZE", 1)))))
    if args.dm_mismatched and args.batch < 2:
        sys.exit("error: --dm-mismatched pairs each labeled image with another one's mask, so it needs --batch 2 "
                 "or more (per process)")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.benchmark:
            return benchmark(args)
        train(args)
    except (data.DataError, TrainingError, model.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Stopped as e:
        print(e, file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is intact; continue with --resume auto", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
