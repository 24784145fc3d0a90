"""A synthetic labeled data set from the generator (Li et al., CVPR 2021, Table 6).

    python generate.py --ckpt runs/jsrt/checkpoint-00800000.pt --n 20000 --truncation 0.7 --out synth/

G_ema draws image/mask pairs in data.py's folder format (images/NAME.png, masks/NAME.png, pixel = class), for
any segmentation network to train on. Pair i comes from its own seed (--seed and i), so it does not depend on
its batch, and a stopped run continues where it stopped (pairs whose two files exist are skipped);
OUT/generate.json records the generator (a checksum of its weights), the seed and the truncation, and a run
with others, or into an OUT of other images, is refused. --truncation 0.7 pulls every w towards the mean
latent (typical, cleaner pairs), 1 keeps G's full diversity. The mask is the argmax (one class: logit > 0).

Needs: model.py, weights.py (an official checkpoint) and data.py; never the training scripts.
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

import cli
import data
import model
import weights


def load_any_generator(path, device):
    """G_ema of a stage-1 checkpoint, of a model.pt, or of an official SemanticGAN checkpoint; `path` may be a
    run folder: a train_encoder.py one (its model.pt) or a train_gan.py one (its latest checkpoint)."""
    if os.path.isdir(path):
        path = os.path.join(path, "model.pt") if os.path.isfile(os.path.join(path, "model.pt")) \
            else model.resolve_checkpoint(path)
    if not os.path.isfile(path):
        raise model.CheckpointError(f"{path}: no such file; pass --ckpt a train_gan.py checkpoint or a model.pt")
    ckpt = model.load_checkpoint(path, "pass --ckpt a complete train_gan.py checkpoint or a model.pt")
    if isinstance(ckpt, dict) and ckpt.get("format") == model.BUNDLE_FORMAT:
        G = model.Generator(**ckpt["generator"])
        G.load_state_dict(ckpt["G_ema"])
        return G.to(device).eval().requires_grad_(False)
    return model.load_generator(weights.as_stage1(ckpt, path), path, device)


def pair_seed(seed, index):
    return seed * 1000003 + index


@torch.no_grad()
def draw(G, indices, seed, truncation, mean_latent):
    """(images [B, C, R, R] in [-1, 1], class maps [B, R, R]) of pairs `indices`, each from its own seed."""
    generators = [torch.Generator().manual_seed(pair_seed(seed, i)) for i in indices]
    device = G.constant.device
    z = torch.stack([torch.randn(G.style_dim, generator=g) for g in generators]).to(device)
    noise = [torch.stack([torch.randn(1, r, r, generator=g) for g in generators]).to(device)
             for r in G.noise_resolutions]
    images, mask_logits = G(z, truncation=truncation, truncation_latent=mean_latent, noise=noise)
    return images, model.mask_classes(mask_logits.float())


def image_pixels(image):
    """[C, R, R] in [-1, 1] -> uint8 [R, R] (grey) or [R, R, 3]."""
    pixels = data.image_to_uint8(image)
    return pixels[..., 0] if image.shape[0] == 1 else pixels


def fingerprint(G):
    """A checksum of the generator's weights: the same generator whatever file it was read from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(G.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_settings(out, settings):
    """OUT holds the pairs of one setting (generator, seed, truncation): a run continues a folder that
    OUT/generate.json says was drawn with the same, and refuses one drawn with another, or one whose images
    or masks generate.py did not write (no generate.json): continuing it would mix two data sets."""
    record = out / "generate.json"
    if record.is_file():
        try:
            earlier = json.loads(record.read_text())
        except ValueError:
            raise data.DataError(f"{record} is not a settings file of generate.py; pass another --out") from None
        different = [f"{k} {earlier.get(k)}, not {v}" for k, v in settings.items()
                     if k != "ckpt" and earlier.get(k) != v]
        if different:
            raise data.DataError(f"--out {out} holds pairs drawn with other settings ({'; '.join(different)}; "
                                 f"{record}): pass the same to continue them, or another --out")
    elif any(any((out / part).iterdir()) for part in ("images", "masks") if (out / part).is_dir()):
        raise data.DataError(f"--out {out} holds images or masks that generate.py did not write (no {record.name}): "
                             "pass a new folder")
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=2) + "\n")


def generate(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    if data.inside(args.ckpt, out):
        raise data.DataError(f"--out {out} holds --ckpt {args.ckpt}; pass an --out that does not")
    G = load_any_generator(args.ckpt, device)
    check_settings(out, {"generator": fingerprint(G), "seed": args.seed, "truncation": args.truncation,
                         "mean_samples": args.mean_samples, "ckpt": data.printable(args.ckpt)})
    for part in ("images", "masks"):
        (out / part).mkdir(parents=True, exist_ok=True)
    name = lambda i: f"{i:06d}.png"  # noqa: E731
    missing = [i for i in range(args.n) if not all((out / part / name(i)).exists() for part in ("images", "masks"))]
    print(f"generating {len(missing)} of {args.n} pairs ({args.n - len(missing)} already there) with truncation "
          f"{args.truncation}, seed {args.seed}, into {out}", flush=True)
    mean_latent = None
    if args.truncation != 1:
        with torch.random.fork_rng(devices=[]):  # the mean latent from its own seed: the same on every run
            torch.manual_seed(args.seed)
            mean_latent = G.mean_latent(args.mean_samples, device)
    for start in range(0, len(missing), args.batch):
        chunk = missing[start:start + args.batch]
        images, masks = draw(G, chunk, args.seed, args.truncation, mean_latent)
        for i, image, mask in zip(chunk, images, masks.cpu().numpy().astype(np.uint8)):
            # the mask last: a pair counts as written once both files exist
            data.save_png(image_pixels(image), out / "images" / name(i))
            data.save_png(mask, out / "masks" / name(i))
        print(f"{start + len(chunk)}/{len(missing)}", flush=True)
    print(f"done: {args.n} pairs in {out}/images and {out}/masks", flush=True)


def build_parser():
    p = cli.ArgumentParser(description="Write image/mask pairs drawn from G_ema in the folder format.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a train_gan.py checkpoint or run folder (its latest checkpoint), a "
                   "model.pt or train_encoder.py run folder, or a checkpoint of the official train_seg_gan.py")
    p.add_argument("--n", type=cli.POSITIVE_INT, default=20000, help="pairs")
    p.add_argument("--truncation", type=cli.NON_NEGATIVE, default=0.7,
                   help="1 = no truncation (the most diverse pairs), 0 = the mean latent's pair")
    p.add_argument("--mean-samples", type=cli.POSITIVE_INT, default=4096,
                   help="latents averaged for the truncation centre")
    p.add_argument("--out", default="synth")
    p.add_argument("--batch", type=cli.POSITIVE_INT, default=32)
    p.add_argument("--seed", type=cli.COUNT, default=0)
    p.add_argument("--device", default=None)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        generate(args)
    except (model.CheckpointError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except OSError as e:  # disk full, --out not writable
        print(f"error: cannot write into {args.out} ({e}); the pairs written so far are complete: free space "
              "or fix the folder, then run the same command again to continue", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the pairs written so far are complete; run the same command again to continue",
              file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
