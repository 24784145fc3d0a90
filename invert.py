"""Segment new images by inverting them into the generator (Li et al., CVPR 2021, Sec. 3.3), and score them.

    python invert.py img.png                                      # the newest model.pt under runs/
    python invert.py scans/ more/*.png --model runs/jsrt-enc/model.pt --out segmentations/
    python invert.py test/images --eval test/masks                # and score them: DICE, Jaccard, mIoU

An image x is explained by the generator: its latent code w+ starts at the encoder's guess E(x), the noise
maps n at random, and both are optimised for --steps steps (paper Eq. 6, with the official inference.py's
weights and schedule) on

    L(w+, n) = LPIPS(x, G_x(w+, n)) + lambda3 MSE(x, G_x(w+, n)) + lambda2 MSE(w+, E(G_x(w+, n)))
               + lambda_n NoiseReg(n)

per image: lambda3 = 0.1 (--mse-weight), lambda2 = 1e-3 (--encoder-weight; E's output a constant target),
lambda_n = 100 (--noise-weight); NoiseReg is the squared mean of each noise map times itself shifted by one
pixel in x and in y, over a pyramid of 2x pooled maps down to 8 px, so the maps cannot carry the image's
structure. Adam, lr 0.1 ramped up over the first 5% of the steps and down (cosine) over the last 25%, the
noise renormalised after every step, 100 steps; --steps 0 is the encoder alone ("Ours-NO" in the paper).

The mask is the argmax of G_y(w+*, n*) (one class: logit > 0), its logits resized back to the input's own
geometry (undoing data.py's --fit). The images of a batch are optimised together but independently (each its
own w+, noise seeded by --seed and its name, and loss): a mask does not depend on its batch-mates or order.

Outputs, in --out, keeping the inputs' sub-folders: NAME.png (the class-index mask), NAME_color.png,
NAME_overlay.png, with --save-reconstruction NAME_recon.png; with --eval the scores of the optimised masks
and of the encoder alone (losses.Scores); always the trust signals, the flag (flag_limit: first the held-out
images model.pt holds are inverted alike, and an image whose mask moves further than theirs is flagged) and a
report (report.py). --out may lie inside an input folder, never be or hold an input; --overwrite replaces an
earlier run whole and nothing else.

Needs: model.py, losses.py, report.py and data.py; never the training scripts, so that this file can be
copied with those and ops/.
"""

import argparse
import collections
import glob
import math
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import cli
import data
import losses
import model
import report

# ----------------------------------------------------------------------------------------------------
# Inputs: files, folders, globs


class Input:
    """One image to segment: its file, its name (its outputs' path in --out, without extension), its key (by
    which --split and --eval find it: the name, without an extension a clash added), its tensor and size."""

    __slots__ = ("path", "name", "key", "image", "size")

    def __init__(self, path, name):
        self.path, self.name, self.key, self.image, self.size = path, name, name, None, None


def collect_inputs(specs, out):
    """Files, folders (searched recursively; names keep the sub-folders) and globs, each file once. Nothing
    inside `out` is an input: a folder that holds it is searched without it (a second run into IMAGES/seg
    does not segment the first run's masks), and a file or folder named inside it is a DataError."""
    found, others = [], []
    for spec in specs:
        path = Path(spec)
        if path.exists() and data.inside(path, out):
            raise data.DataError(f"{path}: an input inside --out {out}, where the masks are written; pass an --out "
                                 "that holds none of the inputs (a new folder, or one inside the input folder)")
        if path.is_dir():
            files = data.list_images(path, exclude=[out], others=others)
            if not files:
                raise data.DataError(f"{path}: no images in this folder (looked for "
                                     f"{', '.join(data.IMAGE_EXTENSIONS)}, recursively)")
            found += [(f, f.relative_to(path).with_suffix("").as_posix()) for f in files]
        elif path.is_file():
            found.append((path, path.stem))
        elif glob.has_magic(spec):
            files = sorted(Path(f) for f in glob.glob(spec, recursive=True)
                           if Path(f).is_file() and not data.inside(f, out))
            if not files:
                raise data.DataError(f"{spec}: the pattern matches no file (outside --out)")
            found += [(f, f.stem) for f in files]
        else:
            raise data.DataError(f"{spec}: no such file or folder; pass image files, folders or globs")
    if others:
        print(f"note: {len(others)} file(s) in the input folders are not images ({', '.join(data.IMAGE_EXTENSIONS)}) "
              f"and are left out, the first {data.printable(others[0])}", flush=True)
    unique = {}
    for path, name in found:  # each file once, under its first name
        unique.setdefault(path.resolve(), (path, name))
    return [Input(path, name) for path, name in unique.values()]


def load_input(item, preprocessing):
    """Read and fit the image as data.py fits training images; keep the original size for the mask."""
    file, resolution = data.open_image_file(item.path), preprocessing["resolution"]
    item.size = file.size
    if file.format == "JPEG":  # decoded at a reduced scale when it is at least twice the model's size
        file.draft(file.mode, (resolution, resolution))
    image = data.to_channels(data.decode(file, item.path), preprocessing["channels"])
    square = data.fit_square(image, resolution, preprocessing["fit"], Image.Resampling.BILINEAR)
    item.image = data.image_to_tensor(square)
    return item


def to_input_geometry(mask_logits, size, fit):
    """Mask logits [K, R, R] of the fitted square to a class map [H, W] (uint8 numpy) of the input's size:
    bilinear on the logits, then argmax (one class: logit > 0)."""
    width, height = size

    def classes_at(side_h, side_w):
        up = F.interpolate(mask_logits[None].float(), size=(side_h, side_w), mode="bilinear", align_corners=False)
        return model.mask_classes(up)[0].to(torch.uint8).cpu().numpy()

    if fit == "stretch" or width == height:
        return classes_at(height, width)
    if fit == "pad":  # data.fit_square pasted the image at ((side - W) // 2, (side - H) // 2)
        side = max(width, height)
        left, top = (side - width) // 2, (side - height) // 2
        return classes_at(side, side)[top:top + height, left:left + width]
    side = min(width, height)  # crop: the model saw the centred square only
    left, top = (width - side) // 2, (height - side) // 2
    out = np.zeros((height, width), np.uint8)
    out[top:top + side, left:left + side] = classes_at(side, side)
    return out


# ----------------------------------------------------------------------------------------------------
# The optimisation (module docstring)


def image_seed(seed, name):
    """A seed of the image's own: the run's --seed and a checksum of its name (its key, so that a mask does not
    depend on which other files a run has)."""
    return (seed * 1000003 + zlib.crc32(os.fsencode(name))) % 2 ** 63


def make_noise(G, seeds, device):
    """One noise map per layer and image [B, 1, r, r], each image's drawn from its own generator."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return [torch.stack([torch.randn(1, r, r, generator=g) for g in generators]).to(device)
            for r in G.noise_resolutions]


def noise_regularization(noise):
    """Per image [B]: sum over maps and pyramid levels of the squared mean of n * shift(n) in x and in y."""
    total = 0
    for n in noise:
        while True:
            total = total + (n * torch.roll(n, 1, dims=3)).mean([1, 2, 3]).square() \
                          + (n * torch.roll(n, 1, dims=2)).mean([1, 2, 3]).square()
            if n.shape[2] <= 8:
                break
            n = F.avg_pool2d(n, 2)
    return total


@torch.no_grad()
def normalize_noise_(noise):  # mean 0, standard deviation 1 per image and map
    for n in noise:
        n.sub_(n.mean([1, 2, 3], keepdim=True)).div_(n.std([1, 2, 3], keepdim=True))


def learning_rate(t, lr, rampup=0.05, rampdown=0.25):
    """The official schedule at progress t in [0, 1): linear ramp-up, cosine ramp-down (0 at t = 0)."""
    ramp = 0.5 - 0.5 * math.cos(min(1.0, (1 - t) / rampdown) * math.pi)
    return lr * ramp * min(1.0, t / rampup)


def objective(G, E, percept, w_plus, noise, target, target_features, args):
    """The objective per image [B] at (w+, noise): LPIPS (times --lpips-weight, 1) + lambda3 MSE between the
    target and G_x(w+), and lambda2 times the mean square distance of w+ to E(G_x(w+)) (no gradient through
    E), plus the noise regulariser (constant when the noise maps stay fixed)."""
    reconstruction, _ = G(w_plus, input_is_w=True, noise=noise)
    compared = F.adaptive_avg_pool2d(reconstruction, 256) if reconstruction.shape[-1] > 256 else reconstruction
    with torch.no_grad():
        w_target = E(reconstruction).float()
    perceptual = percept.distance_to(compared, target_features).float() if args.lpips_weight else 0
    return (args.lpips_weight * perceptual
            + args.mse_weight * (compared.float() - target.float()).square().flatten(1).mean(1)
            + args.encoder_weight * (w_plus - w_target).square().flatten(1).mean(1)
            + args.noise_weight * noise_regularization(noise))


# invert()'s result, detached: mask logits and G_x at w+* and at E(x) (same noise), the last objective [B]
Inversion = collections.namedtuple("Inversion", "mask_logits reconstruction encoder_logits encoder_reconstruction "
                                                "losses")


def invert(G, E, percept, images, seeds, args, autocast, trace=None):
    """Optimise w+ and the noise of a batch of images; an Inversion. `trace`, a list, receives each step's
    losses per image."""
    noise = make_noise(G, seeds, images.device)
    with torch.no_grad(), autocast():
        w_plus = E(images).float()
        encoder_reconstruction, encoder_logits = G(w_plus, input_is_w=True, noise=noise)
    w_plus = w_plus.clone().requires_grad_(True)
    optimised = [w_plus] + ([n.requires_grad_(True) for n in noise] if args.optimize_noise else [])
    optimizer = torch.optim.Adam(optimised, lr=args.lr)
    per_image = torch.zeros(images.shape[0], device=images.device)
    # as the official code: LPIPS and MSE at 256 px at most
    target = F.adaptive_avg_pool2d(images, 256) if images.shape[-1] > 256 else images
    if args.steps:
        with torch.no_grad(), autocast():
            target_features = percept.features(target)  # the target's half of LPIPS, once
    for step in range(args.steps):
        optimizer.param_groups[0]["lr"] = learning_rate(step / args.steps, args.lr)
        with autocast():
            per_image = objective(G, E, percept, w_plus, noise, target, target_features, args)
        if trace is not None:
            trace.append(per_image.detach().cpu())
        optimizer.zero_grad(set_to_none=True)
        per_image.sum().backward()
        optimizer.step()
        if args.optimize_noise:
            normalize_noise_(noise)
    with torch.no_grad(), autocast():
        reconstruction, mask_logits = G(w_plus, input_is_w=True, noise=noise)
    return Inversion(mask_logits.float(), reconstruction.float(), encoder_logits.float(),
                     encoder_reconstruction.float(), per_image.detach())


# ----------------------------------------------------------------------------------------------------
# Outputs


def save_outputs(item, classes, reconstruction, paths, written):
    """The mask (class indices), its colours, the overlay on the input and, when asked, the reconstruction."""
    for path in paths.values():
        written.add(path)
    paths["mask"].parent.mkdir(parents=True, exist_ok=True)
    data.save_png(Image.fromarray(classes, "L"), paths["mask"])
    data.save_png(data.colour_mask(classes), paths["color"])
    original = np.asarray(data.to_channels(data.decode(data.open_image_file(item.path), item.path), 3))
    data.save_png(data.overlay(original, classes), paths["overlay"])
    if "recon" in paths:
        data.save_png(data.image_to_uint8(reconstruction), paths["recon"])


# ----------------------------------------------------------------------------------------------------
# Ground truth and scores


def find_masks(inputs, source, lut, num_labels, out):
    """{key: (path, ground-truth class map)} for every input, from a folder of masks or a labeled folder."""
    folder = Path(source) / "masks" if (Path(source) / "masks").is_dir() else Path(source)
    if not folder.is_dir():
        raise data.DataError(f"{source}: no such folder; pass --eval a folder of masks or a labeled folder")
    by_name = data.files_by_name(folder, exclude=[out])
    masks = {}
    for item in inputs:
        path = by_name.get(item.key) or by_name.get(Path(item.key).name)
        if path is None:
            raise data.DataError(f"{folder}/{item.key}.png: no ground-truth mask for {item.path}; add it, or "
                                 "leave the image out of the evaluation")
        values = data.remap(data.load_mask(path), lut, path)
        if values.size and int(values.max()) >= num_labels:
            raise data.DataError(f"{path}: mask value {int(values.max())} is not one of the model's {num_labels} "
                                 "classes; pass the training --class-map")
        masks[item.key] = (path, values)
    return masks


# ----------------------------------------------------------------------------------------------------
# The command


def newest_model(root="runs"):
    found = [p for p in glob.glob(os.path.join(root, "**", "model.pt"), recursive=True) if os.path.isfile(p)]
    if not found:
        raise model.CheckpointError(f"no model.pt under {root}/: pass --model OUT/model.pt of a train_encoder.py "
                                    "run (the README's demo command leaves one in runs/)")
    return max(found, key=os.path.getmtime)


def run(args, argv):
    """The command: the model, the inputs, then batch after batch inverted and written; a namespace `r` holds
    what the steps share (report.write_summaries reads it too)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_path = args.model or newest_model()
    if os.path.isfile(os.path.join(model_path, "model.pt")):  # a run folder, as the other scripts take
        model_path = os.path.join(model_path, "model.pt")
    r = argparse.Namespace(args=args, argv=argv, model_path=model_path, rows=[], files={}, skipped=[],
                           start=time.time())
    if not args.model:
        print(f"using {data.printable(r.model_path)} (the newest model.pt under runs/; pass --model to choose)",
              flush=True)
    report.check_apart(args.out, (("--model", r.model_path), ("--eval", args.eval), ("--split", args.split)))
    r.G, r.E, r.bundle = model.load_bundle(r.model_path, device)
    labels = r.num_labels = losses.label_count(r.bundle["num_classes"])
    r.class_names = r.bundle.get("class_names") or []
    if len(r.class_names) != labels:
        r.class_names = ["background"] + [f"class{c}" for c in range(1, labels)]
    r.lpips_net = args.lpips or r.bundle["lpips"]
    r.percept = losses.Perceptual(r.lpips_net).to(device)  # also with --steps 0: the trust signals need it
    r.autocast, r.precision = model.make_autocast(args, device)
    inputs = in_split(collect_inputs(args.inputs, args.out), args.split)
    lut = data.lookup_table(data.parse_class_map(args.class_map)[0]) if args.class_map else None
    r.truth = find_masks(inputs, args.eval, lut, labels, args.out) if args.eval else None
    r.written = report.start(inputs, args.out, args.save_reconstruction, args.overwrite)  # --out made here
    batch = args.batch or (16 if device.type == "cuda" else 4)
    note = " (an UNTRAINED backbone: the scores are not the paper's)" if r.lpips_net == "random" else ""
    print(f"semanticgan inversion: {len(inputs)} images, {args.steps} steps, batch {batch}, on {device.type} "
          f"({r.precision}); model {data.printable(r.model_path)} ({r.bundle['preprocessing']['resolution']} px, "
          f"{labels} classes); LPIPS {r.lpips_net}{note}", flush=True)
    r.reference = report.error_reference(r.bundle, r.lpips_net)
    r.limit, r.why_not = flag_limit(r, batch)
    if r.why_not:
        print(f"note: {data.printable(r.why_not)}: no image is flagged", flush=True)
    r.scores = {"optimised": losses.Scores(labels)}
    if r.truth is not None and args.steps > 0:
        r.scores["encoder_only"] = losses.Scores(labels)
    failed = None
    for first in range(0, len(inputs), batch):
        chunk = load_chunk(inputs[first:first + batch], r, len(inputs))
        try:
            if chunk:
                segment_chunk(chunk, r)
        except OSError as error:  # a full disk, a folder gone: keep what is done, and its report
            failed = f"cannot write into {args.out} ({model.short_error(error)})"
            break
        rate = len(r.rows) / max(time.time() - r.start, 1e-9)
        print(f"{len(r.rows)}/{len(inputs)} images  {rate:.2f} img/s  eta "
              f"{(len(inputs) - len(r.rows) - len(r.skipped)) / max(rate, 1e-9):.0f} s", flush=True)
    try:
        summary = report.write_summaries(r)
    except OSError as error:
        failed, summary = failed or f"cannot write into {args.out} ({model.short_error(error)})", None
    if failed:
        raise data.DataError(f"{failed}: the {len(r.rows)} images before it are complete in {args.out}, "
                             f"{'with' if summary else 'without'} their report; free space or fix the folder, then "
                             "run again with --overwrite")
    print(summary, flush=True)
    return r.scores


def mask_agreements(result, num_labels):
    """Per image of an Inversion: the mIoU of the encoder's and the optimised mask at the model's resolution (the
    held-out images the flag is calibrated on have no other), 1 where the optimisation moved nothing."""
    pairs = zip(model.mask_classes(result.mask_logits).cpu(), model.mask_classes(result.encoder_logits).cpu())
    return [losses.mean_iou(*losses.intersection_union(final, encoder, num_labels)) for final, encoder in pairs]


def flag_limit(r, batch):
    """(limit, why not): the flag's limit, the lowest agreement of the encoder's and the optimised mask over the
    held-out images model.pt holds, inverted as this run inverts (its settings, noise seeded by --seed), and None;
    or None and why there is none."""
    stored = r.bundle.get("flag_images")
    if r.args.steps == 0:
        return None, "--steps 0 leaves the encoder's masks as they are, and the flag measures how far they move"
    if not stored:
        return None, f"{r.model_path} holds no held-out images to calibrate the flag on (trained before " \
                     "train_encoder.py stored them)"
    images = stored["images"].float().div(127.5).sub(1).to(r.G.constant.device)
    agreements = []
    for first in range(0, len(images), batch):
        chunk = images[first:first + batch]
        seeds = [image_seed(r.args.seed, f"held-out image {first + k}") for k in range(len(chunk))]
        agreements += mask_agreements(invert(r.G, r.E, r.percept, chunk, seeds, r.args, r.autocast), r.num_labels)
    limit = min(agreements)
    print(f"flag: calibrated on {len(agreements)} held-out images of {stored['source']} (their masks moved to an "
          f"agreement mIoU of {limit:.4f} at the most): an image whose mask moves further is flagged", flush=True)
    return limit, None


def in_split(inputs, split):
    """The inputs a split file names (prepare.py split's test.txt), matched by name, in its order; all without."""
    if not split:
        return inputs
    wanted, by_key = data.read_split_file(split), collections.defaultdict(list)
    for item in inputs:
        by_key[item.key].append(item)
    missing = [n for n in wanted if n not in by_key]
    if missing:
        raise data.DataError(f"{split}: names {missing[0]} (of {len(missing)} missing), which is not among the input "
                             "images; pass the folder that holds them")
    return [item for n in wanted for item in by_key[n]]


def load_chunk(items, r, total):
    """The images of a batch that can be read; an unreadable one is skipped and named (--strict: a DataError)."""
    chunk = []
    for item in items:
        try:
            chunk.append(load_input(item, r.bundle["preprocessing"]))
        except data.DataError as error:
            if r.args.strict or total == 1:
                raise
            r.skipped.append(item.path)
            print(f"skipped: {error}", file=sys.stderr, flush=True)
    return chunk


def segment_chunk(chunk, r):
    """Invert a batch, write each image's outputs, and add its trust signals and scores."""
    args, fit = r.args, r.bundle["preprocessing"]["fit"]
    images = torch.stack([item.image for item in chunk]).to(r.G.constant.device)
    seeds = [image_seed(args.seed, item.key) for item in chunk]  # the key: whatever other files the run has
    result = invert(r.G, r.E, r.percept, images, seeds, args, r.autocast)
    errors = torch.stack([*losses.reconstruction_errors(r.percept, result.reconstruction, images),
                          *losses.reconstruction_errors(r.percept, result.encoder_reconstruction, images)], 1)
    agreements = mask_agreements(result, r.num_labels)
    for k, item in enumerate(chunk):
        classes = to_input_geometry(result.mask_logits[k], item.size, fit)
        encoder_classes = classes if args.steps == 0 else to_input_geometry(result.encoder_logits[k], item.size, fit)
        paths = report.output_paths(args.out, item.name, args.save_reconstruction)
        save_outputs(item, classes, result.reconstruction[k], paths, r.written)
        r.rows.append(report.trust_signals(item.name, classes, agreements[k], errors[k].tolist(), r.num_labels,
                                           r.reference, r.limit))
        r.files[item.name] = (item.path, paths)
        if r.truth is not None:
            path, values = r.truth[item.key]
            if values.shape != classes.shape:
                raise data.DataError(f"{path}: mask is {values.shape[1]}x{values.shape[0]}, its image {item.path} "
                                     f"{classes.shape[1]}x{classes.shape[0]}; save the mask at the image's size")
            for kind, predicted in (("optimised", classes), ("encoder_only", encoder_classes)):
                if kind in r.scores:
                    r.scores[kind].add(item.name, predicted, values)
        item.image = None  # the tensors are not needed any more


def build_parser():
    p = cli.ArgumentParser(description="Segment images by inverting them into a SemanticGAN generator "
                            "(and score the masks).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files, folders (searched recursively) or globs")
    p.add_argument("--model", help="model.pt of train_encoder.py, or its --out folder (default: the newest under runs/)")
    p.add_argument("--out", default="segmentations", help="output folder (inside an input folder is fine)")
    p.add_argument("--steps", type=cli.COUNT, default=100, help="optimisation steps (0: the encoder alone)")
    p.add_argument("--lr", type=cli.POSITIVE, default=0.1)
    p.add_argument("--mse-weight", type=cli.NON_NEGATIVE, default=0.1, help="lambda3")
    p.add_argument("--encoder-weight", type=cli.NON_NEGATIVE, default=1e-3, help="lambda2")
    p.add_argument("--noise-weight", type=cli.NON_NEGATIVE, default=100.0, help="noise regularisation weight")
    p.add_argument("--lpips-weight", type=cli.NON_NEGATIVE, default=1.0, help="LPIPS weight (ours; 0: MSE only)")
    p.add_argument("--optimize-noise", action=argparse.BooleanOptionalAction, default=True,
                   help="optimise the noise maps with w+ (official), or keep each image's seeded maps fixed")
    p.add_argument("--lpips", choices=losses.Perceptual.NETS, help="LPIPS network (default: stage 2's)")
    p.add_argument("--batch", type=cli.POSITIVE_INT, help="images optimised together (default: 16 on a GPU, 4 on CPUs)")
    p.add_argument("--seed", type=cli.COUNT, default=0, help="seed of the noise maps (with each image's name)")
    p.add_argument("--split", metavar="FILE", help="only the images named in FILE (prepare.py split's test.txt)")
    p.add_argument("--eval", metavar="MASKS", help="score against a folder of true masks or a labeled folder")
    p.add_argument("--class-map", help="merge the ground-truth classes as in training")
    p.add_argument("--save-reconstruction", action="store_true", help="also write NAME_recon.png, G_x(w+*)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out (the files it listed "
                   "in OUT/written.jsonl), never a file this tool did not write")
    p.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32", help="fp32 as the official "
                   "code (the optimisation follows small gradients), bf16 autocast, or auto: bf16 where the GPU has it")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if there is one)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if not args.inputs:
            raise data.DataError("no images: pass image files, folders or globs (python invert.py img.png)")
        return run(args, ["invert.py"] + list(argv))
    except (data.DataError, model.CheckpointError, losses.LPIPSUnavailable) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the masks written so far are complete", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
