"""Segment new images by inverting them into the generator (Li et al., CVPR 2021, Sec. 3.3), and score them.

    python invert.py img.png                                      # the newest model.pt under runs/
    python invert.py scans/ more/*.png --model runs/jsrt-enc/model.pt --out segmentations/
    python invert.py test/images --eval test/masks                # and score them: DICE, Jaccard, mIoU

An image x is explained by the generator: its latent code w+ starts at the encoder's guess E(x), the noise
maps n at random, and both are optimised for --steps steps (paper Eq. 6, with the official inference.py's
weights and schedule) on

    L(w+, n) = LPIPS(x, G_x(w+, n)) + lambda3 MSE(x, G_x(w+, n)) + lambda2 MSE(w+, E(G_x(w+, n)))
               + lambda_n NoiseReg(n)

per image, each MSE the mean over its entries (the image's pixels; the n_latent x style_dim entries of W+):
 * lambda3 = 0.1 (--mse-weight), lambda2 = 1e-3 (--encoder-weight; E's output is a constant target, no
   gradient flows through E), lambda_n = 100 (--noise-weight; rosinality's projector uses 1e5): NoiseReg
   is the squared mean of each noise map times itself shifted by one pixel, in x and in y, summed over a
   pyramid of 2x average-pooled maps down to 8 px, so the maps cannot carry the image's structure;
 * Adam (0.9, 0.999) on w+ and the noise maps, lr 0.1 with a linear ramp-up over the first 5% of the steps
   and a cosine ramp-down over the last 25%; after every step each noise map is renormalised to mean 0 and
   standard deviation 1;
 * 100 steps (the official default; its README's example uses 200); --steps 0 is the encoder alone
   ("Ours-NO" in the paper's tables).
Not official, for studying the objective: --lpips-weight (1) scales the LPIPS term (0: MSE and the encoder
term only), and --no-optimize-noise keeps each image's seeded noise maps fixed and optimises w+ alone.

The mask is the argmax of the mask logits G_y(w+*, n*) (one class: logit > 0). The logits are resized
bilinearly to the input's own geometry before the argmax, undoing what data.py's --fit did: stretched back,
cropped out of the padding, or placed back in the centre crop (outside it the model saw nothing: background).

Batches: all images of a batch are optimised together but independently: each has its own w+, its own noise
maps drawn from its own seed (--seed and the image's name), and its own loss, and the losses are summed, so
Adam (element-wise) moves each image's parameters as if it were alone. An image's mask does not depend on its
batch-mates, the batch size or the order of the files.

Outputs, in --out and keeping the inputs' sub-folders: NAME.png, the class-index mask (pixel = class, the
folder format's mask), NAME_color.png, NAME_overlay.png, and with --save-reconstruction NAME_recon.png, G_x(w+*).
Inputs whose outputs would share a name (scan.png and scan.jpg; scan.png and scan_color.png) keep their
extension in it: scan.png.png, scan.jpg.png. The run never writes over what it reads or what it did not
write: --out may not be or hold an input (it may lie inside an input folder, which is then searched without
it), and every file written is listed in OUT/written.jsonl, so that --overwrite replaces an earlier run whole
and nothing else (class Written).
With --eval MASKS: per-image DICE and Jaccard of each foreground class (an empty prediction of an absent
class scores 1), the data set's mIoU (intersections and unions summed over the images, background
included, as the official validation), and DICE per patient (volumetric, for slices named PATIENT_zSLICE),
for the optimised masks and, from the same run, for the encoder alone; a table, OUT/metrics.csv (per image)
and OUT/metrics.json (the means, the command, the model, the steps).

For every run, OUT/segmentations.csv: per image the trust signals ("Trust signals" below: the reconstruction
errors, the agreement of the encoder's mask with the optimised one, the classes' areas, and the flag for an
image out of the generator's reach, judged against the labeled images' errors stored in model.pt), and
OUT/index.html, a report to look at: every image with its overlay, scores and signals, worst first.

Needs: model.py (the networks, model.pt), losses.py (LPIPS, the metrics), data.py (reading and fitting
images, writing PNGs); never the training scripts, so that this file can be copied with those three and ops/.
"""

import argparse
import collections
import csv
import glob
import html
import json
import math
import os
import sys
import time
import urllib.parse
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
import losses
import model

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


OUTPUT_SUFFIXES = {"mask": "", "color": "_color", "overlay": "_overlay", "recon": "_recon"}


def output_paths(out, name, reconstruction):
    """{kind: OUT/NAME{suffix}.png} of one input; the reconstruction only when it is saved."""
    base = Path(out) / name
    return {kind: base.with_name(base.name + suffix + ".png") for kind, suffix in OUTPUT_SUFFIXES.items()
            if kind != "recon" or reconstruction}


def name_outputs(inputs):
    """Give every input output names no other input's share. Where two would (scan.png and scan.jpg; or
    scan.png, whose colour image is scan_color.png, and an input scan_color.png), each input involved keeps
    its extension in its name (scan.png.png, scan.jpg.png; scan_color.png.png), and the run says so; a
    clash left after that (two files of one name in different places) is a DataError."""
    renamed = []
    for attempt in range(2):
        owners = collections.defaultdict(set)
        for k, item in enumerate(inputs):
            for suffix in OUTPUT_SUFFIXES.values():
                owners[item.name + suffix].add(k)
        clashing = sorted({k for ks in owners.values() if len(ks) > 1 for k in ks})
        if not clashing:
            break
        if attempt == 1:
            first, second = (inputs[k].path for k in clashing[:2])
            raise data.DataError(f"{first}: its outputs would have the names of those of {second}; segment them in "
                                 "separate runs (or pass their folder, whose sub-folders keep the names apart)")
        for k in clashing:
            inputs[k].name = inputs[k].key + inputs[k].path.suffix
        renamed = [inputs[k] for k in clashing]
    if renamed:
        example = ", ".join(data.printable(item.path.name) for item in renamed[:3])
        print(f"note: {len(renamed)} inputs would share output names ({example}{' ...' if len(renamed) > 3 else ''}): "
              f"their outputs keep the extension, as in {data.printable(renamed[0].name)}.png", flush=True)
    return inputs


def check_name_lengths(inputs, out):
    """Every output name must fit the file system's limit on a name (255 bytes on most): checked before the
    first image is segmented, not found out half way."""
    folder = Path(out)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # Windows has no pathconf: its limit
        limit = 255
    longest = max(OUTPUT_SUFFIXES.values(), key=len) + ".png"
    for item in inputs:
        name = os.fsencode(Path(item.name).name + longest)
        if len(name) > limit:
            raise data.DataError(f"{item.path}: its output {Path(item.name).name}{longest} would be a name of "
                                 f"{len(name)} bytes, more than the file system takes ({limit}); give the image a "
                                 "shorter name")


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


REPORT_FILES = ("index.html", "segmentations.csv", "metrics.csv", "metrics.json")


class Written:
    """The files invert.py writes into --out, each listed in OUT/written.jsonl (a JSON string per line, its
    path inside OUT) before it is written, so that a run stopped half way is listed too. A later run into
    the same OUT replaces exactly what an earlier one listed (with --overwrite, which removes those files
    first, so that no earlier mask or metrics.json stays beside the new report) and never a file that is
    not listed: this tool did not write it."""

    LIST = "written.jsonl"

    def __init__(self, out):
        self.out = Path(out)
        self.list = self.out / self.LIST
        self.earlier = set()
        if self.list.is_file():
            try:
                with open(self.list, encoding="utf-8") as f:
                    self.earlier = {json.loads(line) for line in f if line.strip()}
            except ValueError:  # not JSON, not UTF-8: not ours
                raise data.DataError(f"{self.list} is not the list of files invert.py keeps; pass another "
                                     "--out") from None

    def start(self, planned, overwrite):
        """Check the run's `planned` paths against what is there, remove the earlier run's files (with
        `overwrite`, else refuse) and start the list afresh. Returns a note, or ''."""
        if self.out.exists() and not self.out.is_dir():
            raise data.DataError(f"--out {self.out} is a file; pass a folder (it is created if need be)")
        foreign = [p for p in planned if p.exists() and self.inside(p) not in self.earlier]
        if foreign:
            raise data.DataError(f"{foreign[0]} exists and was not written by invert.py (not in {self.list}); "
                                 "it is never replaced: pass another --out")
        present = sorted(n for n in self.earlier if (self.out / n).is_file())
        if present and not overwrite:
            raise data.DataError(f"--out {self.out} holds an earlier run's {len(present)} files (listed in "
                                 f"{self.list}): pass --overwrite to replace that run (its files are removed "
                                 "first), or another --out")
        for name in present:
            os.remove(self.out / name)
        self.out.mkdir(parents=True, exist_ok=True)
        self.list.write_text("", encoding="utf-8")
        return f"removed the earlier run's {len(present)} files from {data.printable(self.out)} (--overwrite)" \
            if present else ""

    def inside(self, path):
        return Path(path).relative_to(self.out).as_posix()

    def add(self, path):
        """List `path`; call before writing it."""
        with open(self.list, "a", encoding="utf-8") as f:
            f.write(json.dumps(self.inside(path)) + "\n")
        return path


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


class Scores:
    """Per-image DICE and Jaccard of each foreground class, summed intersections and unions (mIoU) and
    per-patient sums (volumetric DICE), for one kind of mask (optimised, or the encoder alone)."""

    def __init__(self, num_labels):
        self.num_labels = num_labels
        self.rows = {}
        self.intersection = torch.zeros(num_labels, dtype=torch.long)
        self.union = torch.zeros(num_labels, dtype=torch.long)
        self.patients = {}

    def add(self, name, prediction, truth):
        prediction, truth = torch.from_numpy(prediction.astype(np.int64)), torch.from_numpy(truth.astype(np.int64))
        row, patient = {}, data.patient_id(name)
        for c in range(1, self.num_labels):
            dice, jaccard = losses.dice_jaccard(prediction[None], truth[None], c)
            row[c] = (dice.item(), jaccard.item())
            if patient is not None:  # a slice of a volume: its counts join its patient's
                p, t = prediction == c, truth == c
                sums = self.patients.setdefault(patient, np.zeros((self.num_labels, 2)))
                sums[c] += (int((p & t).sum()), int(p.sum()) + int(t.sum()))
        self.rows[name] = row
        i, u = losses.intersection_union(prediction, truth, self.num_labels)
        self.intersection += i
        self.union += u

    def summary(self, class_names):
        classes = range(1, self.num_labels)
        dice = {class_names[c]: float(np.mean([r[c][0] for r in self.rows.values()])) for c in classes}
        jaccard = {class_names[c]: float(np.mean([r[c][1] for r in self.rows.values()])) for c in classes}
        out = {"dice": dice, "jaccard": jaccard, "mean_dice": float(np.mean(list(dice.values()))),
               "mean_jaccard": float(np.mean(list(jaccard.values()))),
               "miou": losses.mean_iou(self.intersection, self.union)}
        if self.patients:  # slices named PATIENT_zSLICE: volumetric DICE per patient
            per_patient = [np.mean([2 * s[c, 0] / s[c, 1] if s[c, 1] else 1.0 for c in classes])
                           for s in self.patients.values()]
            out["dice_per_patient"] = float(np.mean(per_patient))
            out["patients"] = len(self.patients)
        return out


def summary_rows(results, class_names, steps):
    """The summary table as data, for print_table and the report: (column titles, rows of (label, values)),
    a DICE and a Jaccard column for the optimised masks and for the encoder alone; None where a row has
    no Jaccard (mIoU, DICE per patient)."""
    kinds = [k for k in ("optimised", "encoder_only") if k in results]
    titles = {"optimised": f"{steps} steps", "encoder_only": "encoder"}
    columns = [f"{metric} {titles[k]}" for k in kinds for metric in ("DICE", "Jaccard")]
    rows = []
    for name in class_names[1:] + ["mean"]:
        rows.append((name, [v for k in kinds for v in
                            ((results[k]["mean_dice"], results[k]["mean_jaccard"]) if name == "mean"
                             else (results[k]["dice"][name], results[k]["jaccard"][name]))]))
    rows.append(("mIoU", [v for k in kinds for v in (results[k]["miou"], None)]))
    if "dice_per_patient" in results[kinds[0]]:
        rows.append((f"DICE per patient ({results[kinds[0]]['patients']} patients)",
                     [v for k in kinds for v in (results[k]["dice_per_patient"], None)]))
    return columns, rows


def print_table(results, class_names, steps):
    """Per foreground class DICE and Jaccard, their mean, mIoU and DICE per patient; a column pair for the
    optimised masks and one for the encoder alone."""
    columns, rows = summary_rows(results, class_names, steps)
    width = max(14, max(len(n) for n in class_names))
    print(f"{'':<{width}}" + "".join(f"{c:>{18 if c.startswith('DICE') else 21}}" for c in columns))
    for name, values in rows:
        label, patients = name, ""
        if name.startswith("DICE per patient"):  # the patient count after the row, to keep the columns narrow
            label, patients = "DICE/patient", "  " + name[len("DICE per patient "):]
        cells = "".join(f"{'' if v is None else f'{v:.4f}':>{18 if i % 2 == 0 else 21}}" for i, v in enumerate(values))
        print(f"{label:<{width}}{cells}{patients}")


def spreadsheet_cell(text):
    """A name as a CSV cell that a spreadsheet shows as text: one that starts with =, +, -, @, a tab or a
    carriage return would be read as a formula, so it gets a leading ' (OWASP's advice on CSV injection)."""
    text = data.printable(text)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def write_metrics(out, scores, results, class_names, argv, model_path, steps, images, written):
    with open(written.add(Path(out) / "metrics.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        kinds = [(k, prefix) for k, prefix in (("optimised", ""), ("encoder_only", "encoder_")) if k in scores]
        header = ["name", "patient"] + [f"{prefix}{metric}_{class_names[c]}" for _, prefix in kinds
                                        for c in range(1, len(class_names)) for metric in ("dice", "jaccard")]
        writer.writerow(header)
        for name in scores["optimised"].rows:
            row = [spreadsheet_cell(name), spreadsheet_cell(data.patient_id(name) or "")]
            for kind, _ in kinds:
                for c in range(1, len(class_names)):
                    row += [f"{v:.6f}" for v in scores[kind].rows[name][c]]
            writer.writerow(row)
    summary = {"command": data.printable(" ".join(argv)), "model": data.printable(model_path), "steps": steps,
               "images": images, "classes": class_names, **results}
    with open(written.add(Path(out) / "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)


# ----------------------------------------------------------------------------------------------------
# Trust signals: how well the generator explains each image
#
# Per image, with or without --eval (OUT/segmentations.csv and the report): the reconstruction error, LPIPS
# and MSE (losses.reconstruction_errors), of the final G_x(w+*) and of the encoder's G_x(E(x)); how far the
# optimisation moved the mask (agreement_miou: the mIoU between the encoder's mask and the optimised one,
# background included, over the classes either has; 1 with --steps 0); each foreground class's share of the
# pixels of the written mask.
#
# The flag compares the encoder's error, not the final one, with the labeled training images' encoder
# errors, which train_encoder.py stores in model.pt ("labeled_errors"): it is what stage 2 measures on those
# images in one forward, it does not depend on this run's --steps, --lr or loss weights, and it is the error
# that tells an image the generator never learned: with W+ and the noise maps free, the optimisation fits
# much of any image, so the final error is reported but not flagged on. The rule: error_ratio is the larger
# of encoder LPIPS / the labeled images' largest LPIPS and encoder MSE / their largest MSE; an image is
# flagged when error_ratio > --flag-factor (1.5).


def flag_reference(bundle, lpips_net, model_path):
    """(reference, why not): the largest LPIPS and the largest MSE of the labeled training images' encoder
    reconstructions, from model.pt, and None; or None and the reason: a model.pt written before they were
    stored, or one that measured them with another LPIPS network than this run's (distances of different
    backbones do not compare)."""
    stored = bundle.get("labeled_errors")
    if not stored:
        return None, f"{model_path} holds no reconstruction errors of its labeled images (trained before " \
                     "train_encoder.py stored them)"
    if stored["lpips_net"] != lpips_net:
        return None, f"{model_path} measured its labeled images with LPIPS {stored['lpips_net']}, this run uses " \
                     f"{lpips_net} (leave --lpips out to flag)"
    return (max(stored["lpips"]), max(stored["mse"])), None


def error_ratio(encoder_lpips, encoder_mse, reference):
    """How many times the labeled images' largest error the image's encoder error is (LPIPS or MSE, the larger)."""
    return max(encoder_lpips / max(reference[0], 1e-12), encoder_mse / max(reference[1], 1e-12))


def trust_signals(name, classes, encoder_classes, errors, num_labels, reference, factor):
    """One row of segmentations.csv (a dict): the errors (final LPIPS, MSE, the encoder's LPIPS, MSE), the
    agreement of the two masks, the foreground classes' areas, error_ratio and the flag (None without a
    reference)."""
    lpips_value, mse, encoder_lpips, encoder_mse = (float(e) for e in errors)
    agreement = losses.mean_iou(*losses.intersection_union(torch.from_numpy(classes),
                                                           torch.from_numpy(encoder_classes), num_labels))
    areas = np.bincount(classes.ravel(), minlength=num_labels)[1:num_labels] / classes.size
    ratio = error_ratio(encoder_lpips, encoder_mse, reference) if reference else None
    return {"name": name, "flagged": None if ratio is None else ratio > factor, "error_ratio": ratio,
            "encoder_lpips": encoder_lpips, "encoder_mse": encoder_mse, "lpips": lpips_value, "mse": mse,
            "agreement_miou": agreement, "areas": areas.tolist()}


def flag_summary(rows, reference, why_not, factor):
    """The line that says how many images are flagged and by which rule (or why none can be)."""
    if reference is None:
        return f"no image is flagged: {why_not}"
    flagged = sum(bool(r["flagged"]) for r in rows)
    return (f"flagged: {flagged} of {len(rows)} images reconstruct far worse than the labeled training images "
            f"(error ratio above {factor}: the encoder's LPIPS above {factor * reference[0]:.4f} or its MSE above "
            f"{factor * reference[1]:.4f})")


SIGNALS = ("error_ratio", "encoder_lpips", "encoder_mse", "lpips", "mse", "agreement_miou")


def write_segmentations(out, rows, class_names, written):
    """OUT/segmentations.csv: a row per image in the order segmented; flagged 1 or 0 (empty, like
    error_ratio, when the model holds no reference)."""
    with open(written.add(Path(out) / "segmentations.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "flagged", *SIGNALS] + [f"area_{n}" for n in class_names[1:]])
        for row in rows:
            flagged = "" if row["flagged"] is None else int(row["flagged"])
            writer.writerow([spreadsheet_cell(row["name"]), flagged] + ["" if row[k] is None else f"{row[k]:.6f}" for k in SIGNALS]
                            + [f"{a:.6f}" for a in row["areas"]])


# ----------------------------------------------------------------------------------------------------
# The report: OUT/index.html, one page without scripts that opens from the file system; thumbnails are
# the files already there, linked by relative paths (the inputs' too: moved without them, those break)

REPORT_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; vertical-align: middle; }
th { background: #f2f2f2; position: sticky; top: 0; }
td.text, th.text { text-align: left; }
td.picture { padding: 2px; }
img { height: 96px; image-rendering: pixelated; display: block; }
tr.flagged td { background: #fde0dc; }
.flag { font-weight: bold; color: #b3261e; }
"""


REPORT_LEGEND = ("error ratio: the encoder's reconstruction error G_x(E(x)) against x, LPIPS or MSE (the larger "
                 "ratio), over the largest of the labeled training images'; an image is flagged above the factor the "
                 "flag line names. LPIPS, MSE: the final reconstruction's. agreement mIoU: the encoder's mask against "
                 "the optimised one (1: the optimisation changed nothing). area: each class's share of the pixels.")


def link(path, out):
    """A URL from OUT/index.html to `path`: relative, quoted; an absolute file URL where there is no
    relative path (another drive)."""
    try:
        relative = os.path.relpath(os.path.abspath(path), os.path.abspath(out))
    except ValueError:
        return Path(os.path.abspath(path)).as_uri()
    return urllib.parse.quote(os.fsencode(Path(relative).as_posix()))  # bytes: a name that is not UTF-8 too


def worst_first(rows, scores):
    """The rows sorted worst first, and by what: the optimised mask's mean DICE (lowest first) with --eval,
    else error_ratio (the encoder's LPIPS where there is no reference), highest first."""
    if scores is not None:
        per_image = scores["optimised"].rows
        mean_dice = {name: float(np.mean([dice for dice, _ in row.values()])) for name, row in per_image.items()}
        return sorted(rows, key=lambda r: (mean_dice[r["name"]], r["name"])), "mean DICE, lowest first"
    if rows and rows[0]["error_ratio"] is not None:
        return sorted(rows, key=lambda r: (-r["error_ratio"], r["name"])), "error ratio, highest first"
    return sorted(rows, key=lambda r: (-r["encoder_lpips"], r["name"])), "encoder LPIPS, highest first"


def summary_html(results, class_names, steps):
    """The table print_table prints, as HTML."""
    columns, rows = summary_rows(results, class_names, steps)
    lines = ["<tr><th></th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"]
    for name, values in rows:
        cells = "".join("<td></td>" if v is None else f"<td>{v:.4f}</td>" for v in values)
        lines.append(f"<tr><td class='text'>{html.escape(name)}</td>{cells}</tr>")
    return "<table>\n" + "\n".join(lines) + "\n</table>"


def report_settings(args, argv, model_path, bundle, lpips_net, precision, done, skipped, flags):
    """(label, text) pairs for the top of the report: what ran, on what, and the flag."""
    images = f"{done} segmented"
    if skipped:
        images += f"; {len(skipped)} unreadable file(s) skipped: {', '.join(str(p) for p in skipped[:5])}"
    return [("command", " ".join(argv)),
            ("model", f"{model_path} (step {bundle.get('step')}, {bundle['preprocessing']['resolution']} px, "
                      f"{bundle['num_classes']} classes)"),
            ("inversion", f"{args.steps} steps, lr {args.lr}, weights LPIPS {args.lpips_weight}, MSE "
                          f"{args.mse_weight}, encoder {args.encoder_weight}, noise {args.noise_weight}"
                          f"{'' if args.optimize_noise else ' (noise maps fixed)'}; LPIPS {lpips_net}; "
                          f"seed {args.seed}; {precision}"),
            ("images", images), ("flag", flags), ("written", time.strftime("%Y-%m-%d %H:%M:%S %z"))]


def number_cell(key, value):
    return f"<td data-key='{html.escape(key, quote=True)}'>{'' if value is None else f'{value:.4f}'}</td>"


def picture_cell(path, out, what, name):
    url, alt = html.escape(link(path, out), quote=True), html.escape(f"{what} of {data.printable(name)}", quote=True)
    return f"<td class='picture'><a href='{url}'><img src='{url}' alt='{alt}' loading='lazy'></a></td>"


def write_report(out, rows, files, scores, class_names, settings, summary, steps, written):
    """OUT/index.html: the settings and the summary table at the top, then a row per image, worst first:
    input | overlay | reconstruction (when saved), with --eval each class's DICE of the optimised mask and of
    the encoder's, then the trust signals; flagged rows marked. `files`: {name: (input path, output paths)}."""
    rows, order = worst_first(rows, scores)
    kinds = [(k, prefix, title) for k, prefix, title in (("optimised", "", f"{steps} steps"),
                                                          ("encoder_only", "encoder_", "encoder"))
             if scores is not None and k in scores]
    recon = any("recon" in files[r["name"]][1] for r in rows)
    foreground = class_names[1:]
    header = (["#", "name", "input", "overlay"] + (["reconstruction"] if recon else [])
              + [f"DICE {c} ({title})" for c in foreground for _, _, title in kinds]
              + ["flagged", "error ratio", "encoder LPIPS", "encoder MSE", "LPIPS", "MSE", "agreement mIoU"]
              + [f"area {c}" for c in foreground])
    lines = ["<tr>" + "".join(f"<th{' class=text' if h == 'name' else ''}>{html.escape(h)}</th>" for h in header)
             + "</tr>"]
    for position, row in enumerate(rows, start=1):
        name, (source, paths) = row["name"], files[row["name"]]
        cells = [f"<td>{position}</td>", f"<td class='text' data-key='name'>{html.escape(data.printable(name))}</td>",
                 picture_cell(source, out, "input", name), picture_cell(paths["overlay"], out, "overlay", name)]
        if recon:
            cells.append(picture_cell(paths["recon"], out, "reconstruction", name) if "recon" in paths else "<td></td>")
        for c in range(1, len(class_names)):
            cells += [number_cell(f"{prefix}dice_{class_names[c]}", scores[k].rows[name][c][0])
                      for k, prefix, _ in kinds]
        flag = {None: "", True: "<span class='flag'>yes</span>", False: "no"}[row["flagged"]]
        cells.append(f"<td data-key='flagged'>{flag}</td>")
        cells += [number_cell(key, row[key]) for key in SIGNALS]
        cells += [number_cell(f"area_{c}", a) for c, a in zip(foreground, row["areas"])]
        marked = " class='flagged'" if row["flagged"] else ""
        lines.append(f"<tr{marked} data-name='{html.escape(data.printable(name), quote=True)}'>" + "".join(cells)
                     + "</tr>")
    page = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
            f"<title>Segmentations in {html.escape(data.printable(out))}</title><style>{REPORT_STYLE}</style></head><body>",
            f"<h1>Segmentations: {len(rows)} images</h1>", "<table>"]
    page += [f"<tr><th class='text'>{html.escape(k)}</th><td class='text'>{html.escape(data.printable(v))}</td></tr>"
             for k, v in settings]
    page.append("</table>")
    if summary:
        page += ["<h2>Scores</h2>", summary]
    page += [f"<h2>Per image, worst first (by {order})</h2>", f"<p>{REPORT_LEGEND}</p>", "<table>"] + lines
    page += ["</table>", "</body></html>"]
    with open(written.add(Path(out) / "index.html"), "w", encoding="utf-8") as f:
        f.write("\n".join(page) + "\n")


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
    class_names = bundle.get("class_names") or ["background"] + [f"class{c}" for c in range(1, num_labels)]
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
    inputs = name_outputs(inputs)
    check_name_lengths(inputs, args.out)
    lut = data.lookup_table(data.parse_class_map(args.class_map)[0]) if args.class_map else None
    truth = find_masks(inputs, args.eval, lut, num_labels, args.out) if args.eval else None
    written = Written(args.out)
    planned = [p for item in inputs for p in output_paths(args.out, item.name, args.save_reconstruction).values()]
    removed = written.start(planned + [Path(args.out) / name for name in REPORT_FILES], args.overwrite)
    if removed:
        print(removed, flush=True)
    batch = args.batch or (16 if device.type == "cuda" else 4)
    note = " (an UNTRAINED backbone: the scores are not the paper's)" if lpips_net == "random" else ""
    print(f"semanticgan inversion: {len(inputs)} images, {args.steps} steps, batch {batch}, on {device.type} "
          f"({precision}); model {data.printable(model_path)} ({bundle['preprocessing']['resolution']} px, "
          f"{num_labels} classes); LPIPS {lpips_net}{note}", flush=True)
    reference, why_not = flag_reference(bundle, lpips_net, model_path)
    if why_not:
        print(f"note: {data.printable(why_not)}: no image is flagged", flush=True)

    scores = {"optimised": Scores(num_labels)}
    if truth is not None and args.steps > 0:
        scores["encoder_only"] = Scores(num_labels)
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
        summary = write_summaries(args, argv, model_path, bundle, lpips_net, precision, class_names, scores, rows,
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
        paths = output_paths(args.out, item.name, args.save_reconstruction)
        save_outputs(item, classes, result.reconstruction[k], paths, written)
        rows.append(trust_signals(item.name, classes, encoder_classes, errors[k].tolist(), num_labels, reference,
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


def write_summaries(args, argv, model_path, bundle, lpips_net, precision, class_names, scores, rows, files, written,
                    reference, why_not, skipped, start):
    """The table, metrics.*, segmentations.csv and the report for the images done; returns the last line."""
    done = len(rows)
    summary = f"done: {done} images segmented into {data.printable(args.out)} in {time.time() - start:.1f} s"
    results = None
    if scores["optimised"].rows:  # with --eval
        results = {k: s.summary(class_names) for k, s in scores.items()}
        print_table(results, class_names, args.steps)
        write_metrics(args.out, scores, results, class_names, argv, model_path, args.steps, done, written)
        summary += "; metrics.csv and metrics.json written"
    if done:
        flags = flag_summary(rows, reference, why_not, args.flag_factor)
        if reference:
            print(flags, flush=True)
        write_segmentations(args.out, rows, class_names, written)
        settings = report_settings(args, argv, model_path, bundle, lpips_net, precision, done, skipped, flags)
        write_report(args.out, rows, files, scores if results else None, class_names, settings,
                     summary_html(results, class_names, args.steps) if results else "", args.steps, written)
        summary += f"; segmentations.csv and the report {data.printable(Path(args.out) / 'index.html')} written"
    if skipped:
        summary += f"; skipped {len(skipped)} unreadable file(s), the first {data.printable(skipped[0])}"
    return summary


def build_parser():
    p = data.ArgumentParser(description="Segment images by inverting them into a SemanticGAN generator "
                            "(and score the masks).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files, folders (searched recursively) or globs")
    p.add_argument("--model", default=None, help="model.pt of train_encoder.py (default: the newest under runs/)")
    p.add_argument("--out", default="segmentations", help="output folder; it may lie inside an input folder "
                   "(it is not read as input), never hold an input")
    p.add_argument("--steps", type=data.COUNT, default=100, help="optimisation steps (0: the encoder alone)")
    p.add_argument("--lr", type=data.POSITIVE, default=0.1)
    p.add_argument("--mse-weight", type=data.NON_NEGATIVE, default=0.1, help="lambda3")
    p.add_argument("--encoder-weight", type=data.NON_NEGATIVE, default=1e-3, help="lambda2")
    p.add_argument("--noise-weight", type=data.NON_NEGATIVE, default=100.0, help="noise regularisation weight")
    p.add_argument("--lpips-weight", type=data.NON_NEGATIVE, default=1.0, help="LPIPS weight (0: MSE only; the "
                   "official objective has 1)")
    p.add_argument("--optimize-noise", action=argparse.BooleanOptionalAction, default=True,
                   help="optimise the noise maps with w+ (official); --no-optimize-noise keeps each image's "
                        "seeded maps fixed and optimises w+ alone")
    p.add_argument("--lpips", choices=losses.Perceptual.NETS, default=None,
                   help="LPIPS network (default: the one the encoder was trained with)")
    p.add_argument("--batch", type=data.POSITIVE_INT, default=None,
                   help="images optimised together (default: 16 on a GPU, 4 on the CPU)")
    p.add_argument("--seed", type=data.COUNT, default=0, help="seed of the noise maps (with each image's name)")
    p.add_argument("--split", metavar="FILE", default=None,
                   help="segment only the input images named in FILE (one per line, e.g. data.py split's test.txt)")
    p.add_argument("--eval", metavar="MASKS", default=None,
                   help="a folder of ground-truth masks with the images' names, or a labeled folder: score")
    p.add_argument("--class-map", default=None, help="merge the ground-truth classes as in training")
    p.add_argument("--save-reconstruction", action="store_true", help="also write NAME_recon.png, G_x(w+*)")
    p.add_argument("--flag-factor", type=data.POSITIVE, default=1.5,
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
    b = p.add_argument_group("benchmark (instead of segmenting; no model needed)")
    b.add_argument("--benchmark", action="store_true", help="images/s of --steps steps for each of --bench-batches, "
                   "random config-f G and E at --bench-resolution")
    b.add_argument("--bench-resolution", type=int, choices=model.RESOLUTIONS, default=256)
    b.add_argument("--bench-batches", type=data.number_list(int, low=1), default="1,4,16")
    b.add_argument("--bench-max-channels", type=data.POSITIVE_INT, default=512, help="narrow G and E (CPU runs)")
    return p


def benchmark(args):
    """images/s of the whole inversion (E, --steps steps, the final masks) at each batch size."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    R, width = args.bench_resolution, args.bench_max_channels
    torch.manual_seed(0)
    G = model.Generator(R, 8, 3, max_channels=width).to(device).eval().requires_grad_(False)
    E = model.Encoder(R, 3, G.style_dim, max_channels=width).to(device).eval().requires_grad_(False)
    percept = losses.Perceptual("random").to(device)
    autocast, precision = model.make_autocast(args, device)
    print(f"inversion throughput on {device}: {R} px, {args.steps} steps, precision {precision}, max channels {width}")
    print(f"{'batch':>6} {'img/s':>8} {'s/image':>9} {'peak GiB':>9}")
    for batch in args.bench_batches:
        images = torch.rand(batch, 3, R, R, device=device) * 2 - 1
        invert(G, E, percept, images, list(range(batch)), argparse.Namespace(**{**vars(args), "steps": 2}), autocast)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        invert(G, E, percept, images, list(range(batch)), args, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
        print(f"{batch:>6} {batch / seconds:>8.2f} {seconds / batch:>9.2f} {peak:>9.2f}", flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.benchmark:
            return benchmark(args)
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
