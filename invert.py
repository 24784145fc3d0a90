"""Segment new images by inverting them into the generator (Li et al., CVPR 2021, Sec. 3.3), and score them.

    python invert.py img.png                                      # the newest model.pt under runs/
    python invert.py scans/ more/*.png --model runs/jsrt-enc/model.pt --out segmentations/
    python invert.py test/images --eval test/masks                # and score them: DICE, Jaccard, mIoU

An image x is explained by the generator: its latent code w+ starts at the encoder's guess E(x), the noise
maps n at random, and both are optimised for --steps steps (paper Eq. 6, with the official inference.py's
weights and schedule) on

    L(w+, n) = LPIPS(x, G_x(w+, n)) + lambda3 MSE(x, G_x(w+, n)) + lambda2 MSE(w+, E(G_x(w+, n)))
               + lambda_n NoiseReg(n)

per image, each MSE the mean over its entries: lambda3 = 0.1 (--mse-weight), lambda2 = 1e-3 (--encoder-weight;
E's output is a constant target), lambda_n = 100 (--noise-weight). NoiseReg is the squared mean of each noise
map times itself shifted by one pixel, in x and in y, over a pyramid of 2x average-pooled maps down to 8 px,
so the maps cannot carry the image's structure. Adam (0.9, 0.999), lr 0.1 ramped up over the first 5% of the
steps and down (cosine) over the last 25%; the noise maps renormalised after every step; 100 steps (the
official default); --steps 0 is the encoder alone ("Ours-NO" in the paper's tables). Not official, for
studying the objective: --lpips-weight and --no-optimize-noise.

The mask is the argmax of G_y(w+*, n*) (one class: logit > 0), its logits resized bilinearly back to the
input's own geometry first (undoing data.py's --fit). The images of a batch are optimised together but
independently (each its own w+, noise seeded by --seed and its name, and loss): a mask does not depend on its
batch-mates, the batch size or the order of the files.

Outputs, in --out and keeping the inputs' sub-folders: NAME.png (the class-index mask), NAME_color.png,
NAME_overlay.png, with --save-reconstruction NAME_recon.png; with --eval MASKS the scores (losses.Scores) of
the optimised masks and of the encoder alone; for every run the trust signals and a report (report.py).
--out may lie inside an input folder (it is not read as input), never be or hold an input; --overwrite
replaces an earlier run whole and nothing else (report.Written).

Needs: model.py (the networks, model.pt), losses.py (LPIPS, the metrics), report.py (what is written besides
the masks) and data.py; never the training scripts, so that this file can be copied with those and ops/.
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
    """One image to segment: its file, its name (the output path inside --out, without extension), its key
    (the name without the extension, by which --split and --eval find it; the same as the name unless two
    files differ only in their extension), the tensor the model sees and the geometry to map the mask back
    to."""

    __slots__ = ("path", "name", "key", "image", "size")

    def __init__(self, path, name):
        self.path, self.name, self.key, self.image, self.size = path, name, name, None, None


def collect_inputs(specs, out):
    """Files, folders (searched recursively; names keep the sub-folders) and globs, in that order, each file
    once. Nothing inside `out` is an input: a folder that holds --out is searched without it (a second run
    into IMAGES/seg does not segment the first run's masks), glob matches there are left out, and a file or
    folder named inside --out is a DataError. A path that does not exist or a folder without images is a
    DataError too."""
    found, others = [], []
    for spec in specs:
        path = Path(spec)
        if path.exists() and data.inside(path, out):
            raise data.DataError(f"{path}: an input inside --out {out}, where the masks are written; pass an --out "
                                 "that holds none of the inputs (a new folder, or one inside the input folder)")
        if path.is_dir():
            files = data.list_images(path, exclude=[out], others=others)
            if not files:
                raise data.DataError(f"{path}: no images in this folder (looked for {', '.join(data.IMAGE_EXTENSIONS)}, "
                                     "recursively)")
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
        print(f"note: {len(others)} file(s) in the input folders are not images of a known kind "
              f"({', '.join(data.IMAGE_EXTENSIONS)}) and are left out, the first {data.printable(others[0])}",
              flush=True)
    inputs, seen = [], set()
    for path, name in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            inputs.append(Input(path, name))
    return inputs


def load_input(item, preprocessing):
    """Read and fit the image as data.py fits training images; keep the original size for the mask."""
    file = data.open_image_file(item.path)
    item.size = file.size
    resolution = preprocessing["resolution"]
    if file.format == "JPEG":
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
    """A seed of the image's own: the run's --seed and a checksum of its name (its key: without the extension
    that a clash of output names adds, so that a mask does not depend on which other files a run has)."""
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
def normalize_noise_(noise):
    for n in noise:
        n.sub_(n.mean([1, 2, 3], keepdim=True)).div_(n.std([1, 2, 3], keepdim=True))


def learning_rate(t, lr, rampup=0.05, rampdown=0.25):
    """The official schedule at progress t in [0, 1): linear ramp-up, cosine ramp-down (0 at t = 0)."""
    ramp = min(1.0, (1 - t) / rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return lr * ramp * min(1.0, t / rampup)


def per_image_mse(a, b):
    return (a.float() - b.float()).square().flatten(1).mean(1)


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
            + args.mse_weight * per_image_mse(compared, target)
            + args.encoder_weight * (w_plus - w_target).square().flatten(1).mean(1)
            + args.noise_weight * noise_regularization(noise))


# What invert() returns, all detached: the mask logits and the reconstruction G_x at w+* and at the encoder's
# w+ = E(x) (the start, with the same noise maps), and the objective per image [B] at the last step.
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
    if args.optimize_noise:
        for n in noise:
            n.requires_grad_(True)
    optimizer = torch.optim.Adam([w_plus] + (noise if args.optimize_noise else []), lr=args.lr)
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
    for path in paths.values():
        written.add(path)
    paths["mask"].parent.mkdir(parents=True, exist_ok=True)
    data.save_png(Image.fromarray(classes, "L"), paths["mask"])
    coloured = data.colour_mask(classes)
    data.save_png(coloured, paths["color"])
    original = np.asarray(data.to_channels(data.decode(data.open_image_file(item.path), item.path), 3))
    blend = np.where(classes[..., None] > 0, (0.5 * original + 0.5 * coloured).astype(np.uint8), original)
    data.save_png(blend, paths["overlay"])
    if "recon" in paths:
        data.save_png(data.image_to_uint8(reconstruction), paths["recon"])


# ----------------------------------------------------------------------------------------------------
# Ground truth and scores


def find_masks(inputs, source, lut, num_labels, out):
    """{name: ground-truth class map} for every input, from a folder of masks or a labeled folder (--out,
    when it lies inside, left out)."""
    folder = Path(source)
    if (folder / "masks").is_dir():
        folder = folder / "masks"
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


def check_outputs_apart(args, model_path):
    """--out must hold none of the files the run reads: the model, the ground truth, the split file (the
    images are checked as they are collected)."""
    for option, path in (("--model", model_path), ("--eval", args.eval), ("--split", args.split)):
        if path and data.inside(path, args.out):
            raise data.DataError(f"--out {args.out} holds {option} {path}; pass an --out that holds none of the "
                                 "inputs")


def run(args, argv):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_path = args.model or newest_model()
    if not args.model:
        print(f"using {data.printable(model_path)} (the newest model.pt under runs/; pass --model to choose)",
              flush=True)
    check_outputs_apart(args, model_path)
    G, E, bundle = model.load_bundle(model_path, device)
    num_labels = losses.label_count(bundle["num_classes"])
    class_names = bundle.get("class_names") or []
    if len(class_names) != num_labels:
        class_names = ["background"] + [f"class{c}" for c in range(1, num_labels)]
    lpips_net = args.lpips or bundle["lpips"]
    percept = losses.Perceptual(lpips_net).to(device)  # also with --steps 0: the trust signals need it
    autocast, precision = model.make_autocast(args, device)

    inputs = collect_inputs(args.inputs, args.out)
    if args.split:  # the images a split file names (data.py split's test.txt), matched by name
        wanted = data.read_split_file(args.split)
        by_key = {}
        for item in inputs:
            by_key.setdefault(item.key, []).append(item)
        missing = [n for n in wanted if n not in by_key]
        if missing:
            raise data.DataError(f"{args.split}: names {missing[0]}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, "
                                 "which is not among the input images; pass the folder that holds them")
        inputs = [item for n in wanted for item in by_key[n]]
    lut = data.lookup_table(data.parse_class_map(args.class_map)[0]) if args.class_map else None
    truth = find_masks(inputs, args.eval, lut, num_labels, args.out) if args.eval else None
    written = report.start(inputs, args.out, args.save_reconstruction, args.overwrite)  # --out made here
    batch = args.batch or (16 if device.type == "cuda" else 4)
    note = " (an UNTRAINED backbone: the scores are not the paper's)" if lpips_net == "random" else ""
    print(f"semanticgan inversion: {len(inputs)} images, {args.steps} steps, batch {batch}, on {device.type} "
          f"({precision}); model {data.printable(model_path)} ({bundle['preprocessing']['resolution']} px, "
          f"{num_labels} classes); LPIPS {lpips_net}{note}", flush=True)
    reference, why_not = report.flag_reference(bundle, lpips_net, model_path)
    if why_not:
        print(f"note: {data.printable(why_not)}: no image is flagged", flush=True)

    scores = {"optimised": losses.Scores(num_labels)}
    if truth is not None and args.steps > 0:
        scores["encoder_only"] = losses.Scores(num_labels)
    done, skipped, start, rows, files, failed = 0, [], time.time(), [], {}, None
    for first in range(0, len(inputs), batch):
        chunk = load_chunk(inputs[first:first + batch], bundle["preprocessing"], args, skipped, len(inputs))
        if not chunk:
            continue
        try:
            segment_chunk(chunk, G, E, percept, args, autocast, bundle, reference, truth, scores, rows, files,
                          written, num_labels)
        except OSError as error:  # a full disk, a folder gone: keep what is done, and its report
            failed = f"cannot write into {args.out} ({model.short_error(error)})"
            break
        done += len(chunk)
        elapsed = time.time() - start
        rate = done / max(elapsed, 1e-9)
        left = len(inputs) - done - len(skipped)
        print(f"{done}/{len(inputs)} images  {rate:.2f} img/s  eta {left / max(rate, 1e-9):.0f} s", flush=True)
    try:
        summary = report.write_summaries(args, argv, model_path, bundle, lpips_net, precision, class_names, scores, rows,
                                  files, written, reference, why_not, skipped, start)
    except OSError as error:
        failed, summary = failed or f"cannot write into {args.out} ({model.short_error(error)})", None
    if failed:
        raise data.DataError(f"{failed}: the {len(rows)} images before it are complete in {args.out}, "
                             f"{'with' if summary else 'without'} their report; free space or fix the folder, then "
                             "run again with --overwrite")
    print(summary, flush=True)
    return scores


def load_chunk(items, preprocessing, args, skipped, total):
    """The images of a batch that can be read; an unreadable one is skipped and named on stderr (--strict,
    or a run of one image: a DataError)."""
    chunk = []
    for item in items:
        try:
            chunk.append(load_input(item, preprocessing))
        except data.DataError as error:
            if args.strict or total == 1:
                raise
            skipped.append(item.path)
            print(f"skipped: {error}", file=sys.stderr, flush=True)
    return chunk


def segment_chunk(chunk, G, E, percept, args, autocast, bundle, reference, truth, scores, rows, files, written,
                  num_labels):
    """Invert a batch, write each image's outputs, and add its trust signals and scores."""
    images = torch.stack([item.image for item in chunk]).to(G.constant.device)
    seeds = [image_seed(args.seed, item.key) for item in chunk]  # the key: whatever other files the run has
    result = invert(G, E, percept, images, seeds, args, autocast)
    errors = torch.stack([*losses.reconstruction_errors(percept, result.reconstruction, images),
                          *losses.reconstruction_errors(percept, result.encoder_reconstruction, images)], 1)
    fit = bundle["preprocessing"]["fit"]
    for k, item in enumerate(chunk):
        classes = to_input_geometry(result.mask_logits[k], item.size, fit)
        encoder_classes = classes if args.steps == 0 else to_input_geometry(result.encoder_logits[k], item.size, fit)
        paths = report.output_paths(args.out, item.name, args.save_reconstruction)
        save_outputs(item, classes, result.reconstruction[k], paths, written)
        rows.append(report.trust_signals(item.name, classes, encoder_classes, errors[k].tolist(), num_labels, reference,
                                  args.flag_factor))
        files[item.name] = (item.path, paths)
        if truth is not None:
            path, values = truth[item.key]
            if values.shape != classes.shape:
                raise data.DataError(f"{path}: mask is {values.shape[1]}x{values.shape[0]}, its image {item.path} "
                                     f"{classes.shape[1]}x{classes.shape[0]}; save the mask at the image's size")
            scores["optimised"].add(item.name, classes, values)
            if "encoder_only" in scores:
                scores["encoder_only"].add(item.name, encoder_classes, values)
        item.image = None  # the tensors are not needed any more


def build_parser():
    p = cli.ArgumentParser(description="Segment images by inverting them into a SemanticGAN generator "
                            "(and score the masks).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files, folders (searched recursively) or globs")
    p.add_argument("--model", default=None, help="model.pt of train_encoder.py (default: the newest under runs/)")
    p.add_argument("--out", default="segmentations", help="output folder; it may lie inside an input folder "
                   "(it is not read as input), never hold an input")
    p.add_argument("--steps", type=cli.COUNT, default=100, help="optimisation steps (0: the encoder alone)")
    p.add_argument("--lr", type=cli.POSITIVE, default=0.1)
    p.add_argument("--mse-weight", type=cli.NON_NEGATIVE, default=0.1, help="lambda3")
    p.add_argument("--encoder-weight", type=cli.NON_NEGATIVE, default=1e-3, help="lambda2")
    p.add_argument("--noise-weight", type=cli.NON_NEGATIVE, default=100.0, help="noise regularisation weight")
    p.add_argument("--lpips-weight", type=cli.NON_NEGATIVE, default=1.0, help="LPIPS weight (0: MSE only; the "
                   "official objective has 1)")
    p.add_argument("--optimize-noise", action=argparse.BooleanOptionalAction, default=True,
                   help="optimise the noise maps with w+ (official); --no-optimize-noise keeps each image's "
                        "seeded maps fixed and optimises w+ alone")
    p.add_argument("--lpips", choices=losses.Perceptual.NETS, default=None,
                   help="LPIPS network (default: the one the encoder was trained with)")
    p.add_argument("--batch", type=cli.POSITIVE_INT, default=None,
                   help="images optimised together (default: 16 on a GPU, 4 on the CPU)")
    p.add_argument("--seed", type=cli.COUNT, default=0, help="seed of the noise maps (with each image's name)")
    p.add_argument("--split", metavar="FILE", default=None,
                   help="segment only the input images named in FILE (one per line, e.g. prepare.py split's test.txt)")
    p.add_argument("--eval", metavar="MASKS", default=None,
                   help="a folder of ground-truth masks with the images' names, or a labeled folder: score")
    p.add_argument("--class-map", default=None, help="merge the ground-truth classes as in training")
    p.add_argument("--save-reconstruction", action="store_true", help="also write NAME_recon.png, G_x(w+*)")
    p.add_argument("--flag-factor", type=cli.POSITIVE, default=1.5,
                   help="flag an image whose encoder reconstruction error (LPIPS or MSE) is above this many times "
                        "the largest of the labeled training images' (stored in model.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out: the files it "
                   "wrote (listed in OUT/written.jsonl) are removed first; a file this tool did not write is never "
                   "replaced")
    p.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                   help="fp32 as the official code (the optimisation follows small gradients); bf16 autocast, "
                        "or auto = bf16 on GPUs that have it")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if there is one)")
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
