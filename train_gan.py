"""Stage 1 of SemanticGAN: train the generator of images and masks (Li et al., CVPR 2021, Sec. 3.1-3.2).

    python train_gan.py --data IMAGES --labeled-dir PAIRS --out runs/jsrt     # one GPU
    torchrun --nproc_per_node 8 train_gan.py --data ... --out ...              # several GPUs (DDP)
    python train_gan.py --data demo --resolution 32 --max-channels 32 ...      # CPU demo, no download

Every iteration (the official schedule, rosinality/stylegan2-pytorch as extended by the authors):

 1. D_r step   L_Dr on real images (labeled and unlabeled alike) against generated images.
 2. D_m step   L_Dm on labeled pairs against generated pairs; by default as the official code, the real
               mask one-hot in {-1, +1} and the generated one as raw logits (--dm-mask).
               Ours, --dm-mismatched: each real image with another labeled image's mask is a second kind
               of fake (losses.d_hinge_loss_mismatched), so D_m must judge whether a mask fits its image.
               Ours, --dm-look-augment: D_m's real and generated images get a random change of look alike
               (look_augment), so that a pool of another source than the labels cannot teach D_m to judge the
               pairs by the source's look (issue 36).
               Steps 1 and 2 share one generator forward: G is frozen in both, so one batch of fakes serves
               (--no-shared-fakes draws a second batch for step 2, as the official code does).
 3. R1         every 16 steps on D_r and on D_m (gamma 10), scaled by 16 (lazy regularisation); D_m's in
               the official form, 1/B^2 of a per-sample R1 (losses.py).
 4. G step     L_G = non-saturating loss from D_r + hinge loss and feature matching from D_m, with the
               image of the generated pair detached (model.generated_pair): D_m shapes only the mask branch.
 5. Path length every 4 steps on half a batch (weight 2, scaled by 4).
 6. G_ema <- G_ema + (1 - 0.5 ** (32 / 10000)) (G - G_ema).

Starting from existing weights: --init PATH fills the networks from a checkpoint of this project, of the official
SemanticGAN code (g, g_ema, d_img, d_seg) or of a rosinality/stylegan2-pytorch StyleGAN2 (g_ema, d; its tSeg and D_m
start fresh), at step 0 with fresh optimisers; the networks' shape is the file's, the classes the data's. --train
seg then trains only tSeg and D_m on top of the frozen generator: the images do not change, so D_r has nothing to
learn (steps 1 and 3's half are skipped), nor has step 5 (its gradient reaches frozen layers only); G's loss is
D_m's, G_ema follows in tSeg alone.

Masks: K classes (background included) give K mask channels, except a task with one foreground class, which
gets one channel as in the official code (--binary sigmoid: D_m sees that logit against the real mask in
{-1, +1}, logit > 0 is the foreground); --binary softmax gives it two.

Batch: --batch is per GPU (as in the official code); the global batch is batch x GPUs and kimg counts
global images. The labeled and the unlabeled stream each deliver --batch samples per GPU and step.

Mixed precision: on a GPU the networks run under bf16 autocast by default (--precision); bf16 keeps fp32's exponent
range, so no loss scaling and no clamping of activations is needed. The optimisers, G_ema and D_r's R1 stay in fp32
(D_m's R1 and the path length run in bf16): in bf16 D_r's R1 weight gradient (a double backward) is 46% off fp32's at
trained weights (beyond batch noise) and R1_D_r stays 1.5x the fp32 runs' for 10 kimg (docs/precision.md).

Mask quality at every snapshot, without an encoder: mask_area, mask_parts and mask_holes in the log are the
mean area and number of regions of each class (holes: of the background) in the masks of 64 fixed latents of
G_ema, over the same of the labeled masks as D_m sees them (1 = alike). Masks that shrink to slivers or break
up while the images stay good show as mask_area falling or mask_parts rising; past 4 kimg, numbers outside the
labels' range (MASK_BAND) print a warning that names the measured remedies.

Every --snap-every steps a sample grid and a checkpoint (the networks, the optimisers, the path-length mean, the
data streams' positions, every RNG): `--resume auto` continues the latest exactly as if the run had not stopped.

Needs: model.py (the networks), weights.py (--init from other code), losses.py, data.py, training.py (the run
machinery: checkpoints, resume and rollback, SIGTERM, the progress line, DDP; shared with stage 2).
"""

import argparse
import copy
import math
import os
import random
import sys

import numpy as np
import torch

import cli
import data
import losses
import model
import training
import weights

# ----------------------------------------------------------------------------------------------------
# Set-up: the networks and their optimisers


def build_networks(args, image_channels, num_classes, device, shapes=None):
    """G, G_ema, D_r, D_m for `num_classes` classes (background included; model.mask_channels: one channel for
    a binary task with --binary sigmoid). D_r and D_m take the widths of `shapes` (weights.official_shapes of an
    --init file) where it has them. --train seg freezes all but tSeg and D_m from the start."""
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
        G.requires_grad_(False).t_seg.requires_grad_(True)
        D_r.requires_grad_(False)
    return G, G_ema, D_r, D_m


def build_optimizers(args, G, D_r, D_m):
    """Adam with the lazy-regularisation correction: a regulariser applied every k steps makes the
    effective step c = k / (k + 1) of the plain one, so lr * c and betas ** c (StyleGAN2 App. B). With
    --train seg G's optimiser holds tSeg alone, which no regulariser touches: the plain step."""
    def adam(params, every):
        c = every / (every + 1) if every else 1.0
        return torch.optim.Adam(params, lr=args.lr * c, betas=(0 ** c, 0.99 ** c))
    opt_G = adam(G.t_seg.parameters(), None) if args.train == "seg" else adam(G.parameters(), args.pl_every)
    return opt_G, adam(D_r.parameters(), args.r1_every), adam(D_m.parameters(), args.r1_every)


# ----------------------------------------------------------------------------------------------------
# One training iteration


PL_BATCH_SHRINK = 2  # the path length on half a batch (the official --path_batch_shrink)
EMA_DECAY = 0.5 ** (32 / 10000)  # G_ema's half-life: 10k images at batch 32 (the official accumulate)


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


def _float(outputs):
    return [[t.float() for t in scale] for scale in outputs]


@torch.no_grad()
def mismatched_logits_for_the_log(D_m, images, masks):
    """D_m's outputs for real images with other images' masks, in eval mode: spectral norm's power iteration
    does not advance, so measuring leaves training exactly as it was."""
    net = training.unwrap(D_m).eval()
    outputs = _float(net(images, masks))
    net.train()
    return outputs


def look_augment(images, strength=1.0):
    """A random change of look per image, the same distribution for D_m's real and generated images (--dm-look-
    augment, issue 36 part 3): gamma and contrast in 2**[-s, s], a Gaussian blur of up to s * R / 64 pixels and
    noise of up to 0.05 s (of the [0, 1] range), so that the look of the labeled images' source alone cannot tell
    real pairs from generated ones. Images in [-1, 1], no gradient needed (D_m's images are detached)."""
    B, C, H, W = images.shape
    x, u = (images.float() + 1) / 2, torch.rand(B, 4, 1, 1, 1, device=images.device)
    x = x.clamp(min=1e-4) ** (2 ** (strength * (2 * u[:, 0] - 1)))  # gamma
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * 2 ** (strength * (2 * u[:, 1] - 1))  # contrast
    sigma = (strength * u[:, 2] * H / 64).clamp(min=1e-3).view(B, 1, 1)
    radius = max(1, math.ceil(3 * strength * H / 64))
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=x.dtype).view(1, 1, -1)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum(-1, keepdim=True)).repeat_interleave(C, 0)  # [B*C, 1, taps]
    x = x.reshape(1, B * C, H, W)
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (radius, radius, 0, 0), mode="reflect"),
                                   kernel.unsqueeze(2), groups=B * C)
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 0, radius, radius), mode="reflect"),
                                   kernel.unsqueeze(3), groups=B * C).reshape(B, C, H, W)
    x = x + 0.05 * strength * u[:, 3] * torch.randn_like(x)  # noise
    return (x * 2 - 1).to(images.dtype)


def _update(optimizer, loss):
    """One optimiser step on `loss`; returns the loss detached."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_step(step, nets, optimizers, batch, args, state, autocast):
    """One iteration of the schedule in the module docstring. Returns the losses (detached tensors)."""
    (G, D_r, D_m), (opt_G, opt_D_r, opt_D_m) = nets, optimizers
    real_images, labeled_images, labeled_masks, *identities = batch  # identities: labeled_stream.indices
    B, net, r1_due = real_images.shape[0], training.unwrap(G), step % args.r1_every == 0
    z = lambda n: sample_z(n, net.style_dim, args.mixing, real_images.device)  # noqa: E731
    real_pair_mask = model.real_mask_input(labeled_masks, net.num_classes, args.dm_mask)
    look = look_augment if args.dm_look_augment else (lambda images: images)  # D_m's images only  # noqa: E731
    labeled_images = look(labeled_images)
    images_train, out = args.train == "all", {}  # not --train seg (module docstring)

    # 1-2. discriminator steps on one batch of fakes, or one each (G frozen)
    G.requires_grad_(False)
    D_r.requires_grad_(images_train)
    D_m.requires_grad_(True)
    with torch.no_grad(), autocast():
        fake_images, fake_masks = G(z(B))
    if images_train:
        with autocast():
            loss = losses.d_logistic_loss(D_r(real_images).float(), D_r(fake_images).float())
        out["D_r"] = _update(opt_D_r, loss)
    if not args.shared_fakes:
        with torch.no_grad(), autocast():
            fake_images, fake_masks = G(z(B))
    # mismatched pairs: each real image with another labeled image's mask (none in a batch of one image repeated),
    # for --dm-mismatched and, every --r1-every steps, for D_m_fit
    paired = partners = torch.zeros(0, dtype=torch.long)
    if args.dm_mismatched or r1_due:
        partners = mismatched_partners(identities[0] if identities else torch.arange(len(labeled_images)))
        paired = (partners >= 0).nonzero()[:, 0].to(labeled_images.device)
        partners = partners[partners >= 0].to(labeled_images.device)
    with autocast():
        fake_pair = model.generated_pair(look(fake_images), fake_masks, args.dm_mask)
        real_outputs, fake_outputs = _float(D_m(labeled_images, real_pair_mask)), _float(D_m(*fake_pair))
        mismatched_outputs = None
        if args.dm_mismatched and len(paired):  # a second kind of fake: D_m cannot judge by the image alone
            mismatched_outputs = _float(D_m(labeled_images[paired], real_pair_mask[partners]))
            loss = losses.d_hinge_loss_mismatched(real_outputs, fake_outputs, mismatched_outputs)
        else:
            loss = losses.d_hinge_loss(real_outputs, fake_outputs)
        if mismatched_outputs is None and len(paired) and r1_due:  # only for the log
            mismatched_outputs = mismatched_logits_for_the_log(D_m, labeled_images[paired], real_pair_mask[partners])
    out["D_m"] = _update(opt_D_m, loss)
    if mismatched_outputs is not None and r1_due:
        # does D_m care whether a mask fits its image? Its mean logit on the real pairs minus on the same
        # images with another's mask, averaged over its scales: about 0 when it judges the images alone
        out["D_m_fit"] = ((losses.d_m_score(rows_of(real_outputs, paired)) - losses.d_m_score(mismatched_outputs))
                          / len(real_outputs)).detach()

    # 3. lazy R1 on both discriminators, D_r's in fp32 whatever --precision says (module docstring). "+ 0 * the
    # output": every parameter of the discriminator takes part, which DDP requires of each backward
    if r1_due and images_train:
        images = real_images.detach().requires_grad_(True)
        logits = D_r(images)
        penalty = losses.r1_penalty(logits.float().sum(), images)
        _update(opt_D_r, args.r1 / 2 * penalty * args.r1_every + 0 * logits.float().sum())
        out["R1_D_r"] = penalty.detach()
    if r1_due:
        pair = [labeled_images.detach().requires_grad_(True), real_pair_mask.detach().requires_grad_(True)]
        with autocast():
            outputs = D_m(*pair)
        score = losses.d_m_score(outputs)
        penalty = losses.r1_penalty(score, pair)
        _update(opt_D_m, args.r1 / 2 * penalty * args.r1_every + 0 * score)
        out["R1_D_m"] = penalty.detach()

    # 4. generator step (--train seg: tSeg alone)
    (G if images_train else net.t_seg).requires_grad_(True)
    D_r.requires_grad_(False)
    D_m.requires_grad_(False)
    with autocast():
        fake_images, fake_masks = G(z(B))
        adv_r = losses.g_nonsaturating_loss(D_r(fake_images).float()) if images_train else None
        fake_outputs = _float(D_m(*model.generated_pair(look(fake_images.detach()), fake_masks, args.dm_mask)))
        with torch.no_grad():
            real_outputs = _float(D_m(labeled_images, real_pair_mask))
        adv_m = losses.g_hinge_loss(fake_outputs)
        feature_matching = losses.feature_matching_loss(fake_outputs, real_outputs)
    out["G"] = _update(opt_G, adv_m + args.fm_weight * feature_matching + (adv_r if images_train else 0))
    if images_train:
        out["G_r"] = adv_r.detach()
    out.update(G_m=adv_m.detach(), G_fm=feature_matching.detach())

    # 5. lazy path length (not with --train seg: it is the image's sensitivity to w)
    if images_train and args.pl_weight > 0 and step % args.pl_every == 0:
        with autocast():
            images, masks, w_plus = G(z(max(1, B // PL_BATCH_SHRINK)), return_latents=True)
        penalty, state["mean_path_length"], path_length = losses.path_length_penalty(
            images.float(), w_plus, state["mean_path_length"], sync=args.pl_mean_sync)
        # "+ 0 * outputs": the tSeg layers and the last biases take part (with zero gradient), for DDP
        _update(opt_G, args.pl_weight * penalty * args.pl_every + 0 * (images.float().sum() + masks.float().sum()))
        out.update(PL=penalty.detach(), path_length=path_length)

    # 6. G_ema (--train seg: its tSeg alone, the rest stays as it was)
    ema, source = (state["G_ema"], net) if images_train else (state["G_ema"].t_seg, net.t_seg)
    accumulate(ema, source, EMA_DECAY)
    return out


@torch.no_grad()
def accumulate(ema, net, decay):
    """ema <- decay * ema + (1 - decay) * net, parameter by parameter (buffers are copied)."""
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1 - decay)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


# ----------------------------------------------------------------------------------------------------
# Mask quality without an encoder (module docstring): the generated masks' area and parts against the labels'

MASK_STATS_SIZE = 64  # the statistics are taken at 64 px at most (nearest), so that they cost little


def mask_parts(masks):
    """The number of 4-connected foreground regions of each boolean mask [N, H, W]: every foreground pixel
    takes the largest label among itself and its foreground neighbours until nothing changes, and the
    labels left are the regions."""
    (N, H, W), inside = masks.shape, masks.float()
    labels = torch.arange(1, H * W + 1, dtype=torch.float32, device=masks.device).view(1, H, W) * inside
    while True:
        p = torch.nn.functional.pad(labels, (1, 1, 1, 1))
        neighbours = torch.stack([p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]).amax(0)
        grown = torch.maximum(labels, neighbours) * inside
        if torch.equal(grown, labels):
            return torch.tensor([int((labels[i].unique() > 0).sum()) for i in range(N)])
        labels = grown


def mask_statistics(class_maps, num_labels):
    """(area [L-1], parts [L-1], background parts) of class maps [N, H, W]: per foreground class its mean share of
    the pixels and its mean number of regions over the masks that contain it (0 where none does: a collapsed mask
    branch has none); and the background's mean number of regions, which counts holes (a region of their own)."""
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
    """{'mask_area', 'mask_parts', 'mask_holes'}: mask_statistics of G_ema's masks of `latents` over the labeled
    masks' (`reference`), averaged over the classes the labels contain; 1 is "like the labels"."""
    maps = torch.cat([model.mask_classes(G_ema(chunk, randomize_noise=False)[1].float()).cpu()
                      for chunk in latents.split(batch)])
    area, parts, background = mask_statistics(maps, losses.label_count(G_ema.num_classes))
    known = reference[0] > 0
    return {"mask_area": torch.tensor((area[known] / reference[0][known]).mean().item()),
            "mask_parts": torch.tensor((parts[known] / reference[1][known]).mean().item()),
            "mask_holes": torch.tensor(background / max(reference[2], 1e-12))}


# The labels' range, and the warning outside it (docs/mask-branch-stability.md, "The warning"). Past 4 kimg the runs
# whose grids showed the labels' anatomy stayed at area 0.7-1.4 and regions and holes up to 1.3 times the labels';
# the official input's break-up reached regions 3-11 and holes 3-20 or area 0.2-0.5, the pool's later drift regions
# and holes of 1.5-2.2 with half the grid's masks off the lungs. Before 4 kimg the masks are still forming: every run
# measured was outside the band there (holes up to 4, area up to 2), the ones that went on to fit the labels too.
MASK_BAND = {"mask_area": (0.5, 2.0), "mask_parts": (0.0, 1.5), "mask_holes": (0.0, 1.5)}
MASK_BAND_AFTER_KIMG = 4.0


def mask_warning(measured, kimg):
    """The warning for masks outside MASK_BAND (a line), or None: inside it, or not yet past MASK_BAND_AFTER_KIMG."""
    values = {k: float(measured[k]) for k in MASK_BAND if k in measured}
    outside = [k for k, v in values.items() if not MASK_BAND[k][0] <= v <= MASK_BAND[k][1]]  # NaN is outside
    if kimg <= MASK_BAND_AFTER_KIMG or not outside:
        return None
    named = ", ".join(f"{k} {values[k]:.2f}" for k in outside)
    return (f"at {kimg:.1f} kimg the generated masks left the labels' range ({named}; the band: mask_area 0.5-2, "
            "mask_parts and mask_holes up to 1.5, 1 = like the labels): the mask branch is drifting off the anatomy, "
            "which the images and D_m's loss do not show. Measured remedies: --dm-mask probabilities against the "
            "early break-up; against the later drift --dm-look-augment (D_m's images alike in look) or an unlabeled "
            "pool from the labeled images' source; or keep the last checkpoint before this one "
            "(docs/mask-branch-stability.md)")


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
            rgb, classes = data.image_to_uint8(image), classes.cpu().numpy()
            tiles.append(np.concatenate([rgb, data.colour_mask(classes), data.overlay(rgb, classes)], axis=1))
    rows = [np.concatenate(tiles[i:i + columns] + [np.zeros_like(tiles[0])] * (columns - len(tiles[i:i + columns])),
                           axis=1) for i in range(0, len(tiles), columns)]
    data.save_grid(rows, path)


# ----------------------------------------------------------------------------------------------------
# Resuming: a stage-1 checkpoint of the same networks, --train, data and mask form


# The networks and optimisers a checkpoint holds, and all it must hold for --resume to continue it.
CHECKPOINTED = ("G", "G_ema", "D_r", "D_m", "opt_G", "opt_D_r", "opt_D_m")
RESUMED = {*CHECKPOINTED, "step", "mean_path_length", "labeled_stream", "unlabeled_stream", "rng", "image_channels",
           "num_classes", "args"}
# Options that must match for a resumed run to make sense (the rest, e.g. --iter or --snap-every, may change).
NETWORK_ARGS = ("resolution", "style_dim", "n_mlp", "channel_multiplier", "max_channels")  # and an --init file's
ARCHITECTURE_ARGS = NETWORK_ARGS + ("dm_mask",)


def check_resumable(ckpt, path):
    """A CheckpointError (one line, pointing to --init where that is what was meant) unless `ckpt` is a stage-1
    checkpoint of train_gan.py, which alone holds what --resume continues: optimisers, step, data streams, RNGs."""
    source = weights.checkpoint_source(ckpt)
    if isinstance(ckpt, dict) and ckpt.get("stage") == "encoder":
        raise model.CheckpointError(f"{path} is a checkpoint of train_encoder.py: resume it with train_encoder.py "
                                    "--resume")
    if isinstance(ckpt, dict) and ckpt.get("format") == model.BUNDLE_FORMAT:
        what = "a model.pt of train_encoder.py"
    elif source in ("official", "rosinality"):
        what = f"a checkpoint of {weights.SOURCES[source]}"
    elif not isinstance(ckpt, dict) or not RESUMED <= set(ckpt) or not isinstance(ckpt["args"], dict):
        what = f"not a checkpoint of train_gan.py ({type(ckpt).__name__} without {', '.join(sorted(RESUMED))})"
    else:
        return ckpt
    raise model.CheckpointError(f"{path} is {what}: --resume continues a train_gan.py run; to start a new run "
                                f"from its weights pass --init {path}")


def restore(ckpt, resume, nets, optimizers, state, args, image_channels, num_classes):
    """Load a stage-1 checkpoint into the networks, the optimisers and the path-length mean, after checking
    that it was trained with the same networks, --train, data shape and mask form."""
    G, saved = nets[0], ckpt["args"]
    for key in ARCHITECTURE_ARGS:
        if saved.get(key) != getattr(args, key):
            raise training.TrainingError(f"checkpoint {resume} was trained with --{key.replace('_', '-')} "
                                         f"{saved.get(key)}, not {getattr(args, key)}: pass the same value to resume")
    trained = saved.get("train", "all")  # older checkpoints: all
    if trained != args.train:
        raise training.TrainingError(f"checkpoint {resume} was trained with --train {trained}, not {args.train}: "
                                     "pass the same value to resume (a new run can start from it: --init "
                                     f"{resume} --train {args.train})")
    if (ckpt["image_channels"], ckpt["num_classes"]) != (image_channels, num_classes):
        raise training.TrainingError(f"checkpoint {resume} has {ckpt['image_channels']} image channels and "
                                     f"{ckpt['num_classes']} classes, the data {image_channels} and {num_classes}")
    saved_channels = ckpt.get("mask_channels", ckpt["num_classes"])  # older checkpoints: one per class
    if saved_channels != G.num_classes:
        form = "sigmoid" if saved_channels == 1 else "softmax"
        raise training.TrainingError(f"checkpoint {resume} has {saved_channels} mask channel(s), --binary "
                                     f"{args.binary} makes {G.num_classes}: pass --binary {form} to resume it")
    for part, key in zip((*nets, *optimizers), CHECKPOINTED):
        part.load_state_dict(ckpt[key])
    state["mean_path_length"] = ckpt["mean_path_length"].to(G.constant.device)


# ----------------------------------------------------------------------------------------------------
# Starting from existing weights (--init; weights.py maps other code's networks onto these)


def read_init(args, resume=None):
    """The networks of --init: {"path", "source", "tensors" (official layout), "shapes"} (weights.read_networks),
    whose shape sets --resolution and the network options (one given otherwise is a TrainingError). Resuming, the
    file read is the checkpoint `resume` (of the same shape), so that a run continues when its --init file has gone."""
    path = resume or args.init
    source, tensors, shapes = weights.read_networks(path, "pass --init a checkpoint of train_gan.py, of the official "
                                                  "train_seg_gan.py or of rosinality/stylegan2-pytorch")
    generator, parser = shapes["generator"], build_parser()
    for key in NETWORK_ARGS:
        given = getattr(args, key)
        if given != parser.get_default(key) and given != generator[key]:
            option = "--" + key.replace("_", "-")
            raise training.TrainingError(f"{'--resume' if resume else '--init'} {path} holds a generator with {option} "
                                         f"{generator[key]}, not {given}: leave {option} out (the file's is used)")
        setattr(args, key, generator[key])
    return {"path": path, "source": source, "tensors": tensors, "shapes": shapes}


def start_from(init, G, G_ema, D_r, D_m, args):
    """Fill G and G_ema, and D_r and D_m where the file has them, from --init. A file with another number of
    mask channels than the data's, or none (a StyleGAN2 generator), leaves tSeg (and D_m's first layers, which read
    the mask) as initialised. Returns the line that says what came from where."""
    tensors, path, saved = init["tensors"], init["path"], init["shapes"]["generator"]["num_classes"]
    other_classes = saved != G.num_classes
    trained = init["shapes"].get("dm_mask")  # what the file's D_m saw of a mask, and its tSeg learnt to give it
    if trained and not other_classes and trained != args.dm_mask:
        raise training.TrainingError(f"--init {path} learnt its masks for a D_m that saw {trained}, this run gives D_m "
                                     f"{args.dm_mask}: pass --dm-mask {trained}")
    # --train seg learns tSeg on the generator that is used afterwards, G_ema ("g" holds the last iterate)
    g = "g" if "g" in tensors and args.train == "all" else "g_ema"
    weights.load_official(G, tensors[g], path, g, fresh=r"t_seg\." if other_classes else None)
    weights.load_official(G_ema, tensors["g_ema"], path, "g_ema", fresh=r"t_seg\." if other_classes else None)
    taken, fresh = [f"G from {g}", "G_ema from g_ema"], []
    for net, name, key, keep in ((D_r, "D_r", "d_img", None),
                                 (D_m, "D_m", "d_seg", r"scales\.\d+\.layers\.0\." if other_classes else None)):
        shown = "d" if key == "d_img" and init["source"] == "rosinality" else key  # as the file names it
        if key in tensors:
            weights.load_official(net, tensors[key], path, shown, fresh=keep)
            taken.append(f"{name} from {shown}")
        else:
            fresh.append(name)
    if saved is None:
        fresh.append("tSeg (the file has no mask branch)")
    elif other_classes:
        first = " and D_m's first layers" if "d_seg" in tensors else ""
        fresh.append(f"tSeg{first} (the file's masks have {saved} channel(s), the data's {G.num_classes})")
    return (f"started from {path} ({weights.SOURCES[init['source']]}): {', '.join(taken)}"
            + (f"; fresh: {', '.join(fresh)}" if fresh else "") + "; step 0, fresh optimisers")


# ----------------------------------------------------------------------------------------------------
# The run


def check_data(args, labeled, info, init):
    """Labeled pairs for D_m, two of them for --dm-mismatched, and an --init generator of the data's images."""
    if labeled is None:
        raise training.TrainingError("D_m needs labeled pairs: pass a folder with images/ and masks/ via "
                                     "--labeled-dir (or as --data), or --data demo")
    if args.dm_mismatched and info["labeled_count"] < 2:
        raise training.TrainingError("--dm-mismatched pairs labeled images with other labeled images' masks: it "
                                     "needs 2 labeled pairs or more")
    made, image_channels = init and init["shapes"]["generator"]["image_channels"], info["channels"]
    if init and made != image_channels:
        kind = {1: "grey", 3: "RGB"}
        theirs, ours = kind.get(made, made), kind.get(image_channels, image_channels)
        raise training.TrainingError(f"--init {init['path']} generates {theirs} images ({made} channels), the data is "
                                     f"{ours} ({image_channels}): pass --channels {made} to read the images as "
                                     f"{theirs}, or --init a generator of {image_channels}-channel images")


def announce(args, info, G, D_r, D_m, world, device, precision, label_statistics):
    """The run's first lines (rank 0): what trains on what, and the labeled masks' statistics."""
    counts = f"{info['labeled_count']} labeled pairs and {info['unlabeled_count']} images from {info['source']}"
    masks = "one sigmoid mask channel" if G.num_classes == 1 else f"{G.num_classes} mask channels"
    d_m = [f"D_m sees mask {args.dm_mask}"] + ["mismatched pairs"] * args.dm_mismatched + [
        "the look augmented"] * args.dm_look_augment
    print(f"semanticgan stage 1: {args.resolution} px, {info['channels']} image channels, {info['num_classes']} "
          f"classes ({masks}); {world} process(es) on {device.type}, batch {args.batch} per process = "
          f"{args.batch * world} global; precision {precision}; {args.iter} steps = "
          f"{args.iter * args.batch * world / 1000:.1f} kimg; snapshot every {args.snap_every} steps; data: {counts}; "
          + ", ".join(d_m), flush=True)
    print("labeled masks, per foreground class: area " + ", ".join(f"{a:.3f}" for a in label_statistics[0].tolist())
          + "; regions " + ", ".join(f"{p:.2f}" for p in label_statistics[1].tolist())
          + f"; background regions {label_statistics[2]:.2f} (at every snapshot, mask_area, mask_parts and "
          "mask_holes: the generated masks' against these, 1 = alike)", flush=True)
    print(f"G {sum(p.numel() for p in G.parameters()):,} parameters, D_r {sum(p.numel() for p in D_r.parameters()):,}, "
          f"D_m {sum(p.numel() for p in D_m.parameters()):,}", flush=True)


def _train(args, rank, world, device):
    torch.manual_seed(args.seed)  # the same initial weights on every rank (G_ema is copied before DDP syncs G)
    # PyTorch's defaults otherwise, as the official code ran: TF32 convolutions, fp32 matmuls (the mapping)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    training.check_out_apart(args.out, ("--data", args.data), ("--labeled-dir", args.labeled_dir))
    training.writable_folder(args.out)
    resume = training.find_resume(args)
    if args.train == "seg" and not args.init and not resume:
        raise training.TrainingError("--train seg trains the mask branch of an existing generator: pass --init with a "
                                     "checkpoint of this project, of the official SemanticGAN code or a rosinality "
                                     "StyleGAN2")
    init = read_init(args, resume) if args.init else None  # before the data: it decides the resolution
    labeled, unlabeled, info = data.build_datasets(args, replace_unreadable=True)
    check_data(args, labeled, info, init)
    image_channels, num_classes = info["channels"], info["num_classes"]
    G, G_ema, D_r, D_m = build_networks(args, image_channels, num_classes, device, init and init["shapes"])
    optimizers = build_optimizers(args, G, D_r, D_m)
    autocast, precision = model.make_autocast(args, device)
    streams = training.open_streams(args, labeled, unlabeled, rank, world, args.seed)
    state, step, ckpt = {"G_ema": G_ema, "mean_path_length": torch.zeros((), device=device)}, 0, {}
    torch.manual_seed(args.seed + rank)  # from here on each rank draws its own latents and noise
    random.seed(args.seed + rank)
    if resume:
        ckpt = check_resumable(model.load_checkpoint(resume), resume)
        restore(ckpt, resume, (G, G_ema, D_r, D_m), optimizers, state, args, image_channels, num_classes)
        step = ckpt["step"]
        streams = training.resumed_streams(args, ckpt, labeled, unlabeled, rank, world)
        training.restore_rng_states(ckpt["rng"], rank, world, args.seed, step)
        training.resumed(args, resume, step, rank)
    elif init:
        taken = start_from(init, G, G_ema, D_r, D_m, args)
        if rank == 0:
            print(taken, flush=True)
    # DDP, but not for a network without trainable parameters (D_r with --train seg): it takes part in no backward
    ids = [device.index] if device.type == "cuda" else None
    nets = tuple(torch.nn.parallel.DistributedDataParallel(m, device_ids=ids)
                 if world > 1 and any(p.requires_grad for p in m.parameters()) else m for m in (G, D_r, D_m))
    seeded = ((args.grid, args.seed + 12345), (64, args.seed + 54321))  # fixed latents: the grid's, mask quality's
    grid_latents, quality_latents = (torch.randn(n, args.style_dim, generator=torch.Generator().manual_seed(seed))
                                     .to(device) for n, seed in seeded)
    label_statistics = labeled_mask_statistics(labeled, losses.label_count(G.num_classes), args.batch, args.seed + 2)
    if rank == 0:
        announce(args, info, G, D_r, D_m, world, device, precision, label_statistics)
    progress = training.Progress(os.path.join(args.out, "log.jsonl"), args.batch * world, args.iter, step, device,
                                 ckpt.get("elapsed", 0.0), training.tensorboard_writer(args, rank, step))

    def one_step(step, real_images, labeled_pair, identities):
        batch = (*(t.to(device, non_blocking=True) for t in (real_images, *labeled_pair)), identities)
        return train_step(step, nets, optimizers, batch, args, state, autocast)

    def measure(step, checkpoint):  # the masks' quality, at every snapshot
        return mask_quality(G_ema, quality_latents, args.batch, label_statistics) if checkpoint else {}

    def checkpoint_state(step):  # G, D_r, D_m unwrapped (nets holds the DDP wrappers)
        saved = {key: part.state_dict() for key, part in zip(CHECKPOINTED, (G, G_ema, D_r, D_m, *optimizers))}
        return {**saved, "mean_path_length": state["mean_path_length"].detach().cpu(), "image_channels": image_channels,
                "num_classes": num_classes, "mask_channels": G_ema.num_classes}

    def write(step, measured, checkpoint, stopping):
        warning = mask_warning(measured, step * args.batch * world / 1000) if measured else None
        if warning:
            progress.warn(warning, step)
        if checkpoint and not stopping:
            grid_path = os.path.join(args.out, f"samples-{step:08d}.png")
            save_grid(G_ema, grid_latents, grid_path, args.batch)
            progress.image("samples", grid_path, step)

    step = training.train_loop(args, step, args.iter, args.snap_every, progress, streams, one_step, measure,
                               checkpoint_state, write, rank, world, device)
    if rank == 0:
        print(f"done: {step} steps; checkpoints and samples in {args.out}", flush=True)
    return {"G": G, "G_ema": G_ema, "D_r": D_r, "D_m": D_m}


# ----------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    """The options, each checked when parsed (cli.number: one error line for a bad value)."""
    p = cli.ArgumentParser(description="Stage 1 of SemanticGAN: train G (image + mask), D_r and D_m.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.add_data_args(p, resolutions=model.RESOLUTIONS)
    g = p.add_argument_group("training (defaults: the official configuration)")
    g.add_argument("--out", default="runs/semanticgan", help="output folder: checkpoints, sample grids, log.jsonl")
    g.add_argument("--iter", type=cli.POSITIVE_INT, default=800000, help="training iterations")
    g.add_argument("--kimg", type=cli.POSITIVE, help="budget in thousands of global images (overrides --iter)")
    g.add_argument("--batch", type=cli.POSITIVE_INT, default=16,
                   help="batch per GPU / process (global = batch x processes)")
    g.add_argument("--lr", type=cli.POSITIVE, default=0.002)
    g.add_argument("--r1", type=cli.NON_NEGATIVE, default=10.0, help="R1 gamma, for D_r and D_m")
    g.add_argument("--r1-every", type=cli.POSITIVE_INT, default=16)
    g.add_argument("--pl-weight", type=cli.NON_NEGATIVE, default=2.0, help="path-length weight (0 disables)")
    g.add_argument("--pl-every", type=cli.POSITIVE_INT, default=4)
    g.add_argument("--fm-weight", type=cli.NON_NEGATIVE, default=2.0, help="D_m feature-matching weight")
    g.add_argument("--dm-mask", choices=model.DM_MASK_INPUTS, default="logits",
                   help="what D_m sees of a mask: the official raw logits against one-hot in {-1, +1}, or "
                        "softmax probabilities against one-hot in {0, 1}")
    g.add_argument("--binary", choices=model.BINARY_FORMS, default="sigmoid",
                   help="data with one foreground class: one mask channel decided by sigmoid > 0.5 (the "
                        "official form) or two softmax channels")
    g.add_argument("--dm-mismatched", action="store_true",
                   help="ours: D_m also learns real images with another labeled image's mask as fakes, so that "
                        "it judges whether a mask fits its image (docs/mask-branch-stability.md)")
    g.add_argument("--dm-look-augment", action="store_true",
                   help="ours: a random gamma, contrast, blur and noise alike for D_m's real and generated images, "
                        "so that an unlabeled pool of another source than the labels does not untie the masks from "
                        "the images (docs/mask-branch-stability.md)")
    g.add_argument("--shared-fakes", action=argparse.BooleanOptionalAction, default=True,
                   help="one generator forward serves the D_r and the D_m step (the official code runs two)")
    g.add_argument("--pl-mean-sync", action=argparse.BooleanOptionalAction, default=True,
                   help="all processes share one path-length running mean (the official code keeps one each)")
    g.add_argument("--mixing", type=cli.FRACTION, default=0.9, help="style-mixing probability")
    g.add_argument("--init", metavar="PATH", help="start from these weights (step 0, fresh optimisers): a checkpoint "
                   "or --out folder of this project, a checkpoint of the official train_seg_gan.py, or a "
                   "rosinality/stylegan2-pytorch StyleGAN2 (its tSeg and D_m start fresh); the networks' shape is the "
                   "file's, the classes the data's")
    g.add_argument("--train", choices=["all", "seg"], default="all", help="seg: only tSeg and D_m train, the image "
                   "branch and the synthesis layers stay frozen and D_r's step is skipped (a segmenter on top of "
                   "an --init generator)")
    g.add_argument("--grid", type=cli.POSITIVE_INT, default=16, help="samples in the grid")
    training.add_run_args(g, "the networks, G_ema")
    n = p.add_argument_group("networks (defaults: StyleGAN2 config-f; narrow them for CPU demos)")
    n.add_argument("--style-dim", type=cli.POSITIVE_INT, default=512)
    n.add_argument("--n-mlp", type=cli.POSITIVE_INT, default=8, help="mapping layers")
    n.add_argument("--channel-multiplier", type=cli.POSITIVE_INT, default=2)
    n.add_argument("--max-channels", type=cli.POSITIVE_INT, default=512, help="cap on feature maps in G, D_r, D_m")
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
    training.main(lambda: training.distributed(_train, args))


if __name__ == "__main__":
    main()
