"""A data set in data.py's folder format: writing one (DatasetWriter, for prepare.py's converters), and the
commands that look at one, split it, or write the demo set into one:

    python prepare.py check --data PATH [...]             open every file once, list every problem
    python prepare.py show  --data PATH --out grid.png    images with their masks, to look at
    python prepare.py split --data LABELED --out DIR      seeded train.txt / val.txt / test.txt
    python prepare.py demo OUT [--seed 1] [--count 100]   demo scenes as a labeled folder (seed 1: unseen)

prepare.py's command line runs them beside its converters. None writes over what is there: show refuses an
existing file or one inside the data, split an existing split (runs may name it), demo a folder that holds a
data set. Needs: data.py.
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import data


class DatasetWriter:
    """Writes images (and masks) into OUT in the folder format; counts what it wrote."""

    def __init__(self, out, size=None, fit="pad"):
        self.out, self.size, self.fit = Path(out), size, fit
        self.names, self.pairs, self.images = set(), 0, 0

    def claim(self, name):
        if name in self.names:
            raise data.DataError(f"{self.out}: two inputs would both be written as {name}.png; rename one")
        self.names.add(name)

    def save(self, folder, name, image, resample=Image.Resampling.LANCZOS):
        (self.out / folder / name).parent.mkdir(parents=True, exist_ok=True)
        image = image if self.size is None else data.fit_square(image, self.size, self.fit, resample)
        image.save(self.out / folder / f"{name}.png")

    def pair(self, name, image, mask):
        """`image` a Pillow image; `mask` class indices [H, W]. An image of another size than its mask is
        resized onto the mask's grid (area average when shrinking): the mask is the ground truth."""
        self.claim(name)
        mask = Image.fromarray(np.asarray(mask, dtype=np.uint8), "L")
        if image.size != mask.size:
            shrink = image.size[0] >= mask.size[0]
            image = image.resize(mask.size, Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC)
        self.save("images", name, image)
        self.save("masks", name, mask, Image.Resampling.NEAREST)
        self.pairs += 1

    def image(self, name, image):
        self.claim(name)
        self.save("images", name, image)
        self.images += 1

    def classes(self, names):
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "classes.txt").write_text("".join(f"{n}\n" for n in names))

    def summary(self, what, skipped=""):
        wrote = f"{self.pairs} labeled pairs" if self.pairs else f"{self.images} unlabeled images"
        return f"{what}: wrote {wrote} to {self.out}{skipped}"


def refuse_a_data_set(out):
    """A DataError when `out` already holds images or masks (a writer would replace files it did not create)."""
    for folder in (Path(out) / "images", Path(out) / "masks"):
        count = sum(1 for p in folder.rglob("*") if p.is_file())
        if count:
            raise data.DataError(f"{out}: OUT already holds a data set ({count} files in {folder}); pass a new or "
                                 "empty folder")


def command_check(args):
    """Open every file once (in DataLoader workers) and list every problem, one line each."""
    args.augment = False
    labeled, unlabeled, info = data.build_datasets(args)
    if isinstance(unlabeled, data.ImageFolder) and labeled is not None:  # each file once: pairs are checked whole
        paired = {p.image.resolve() for p in labeled.pairs}
        unlabeled = data.ImageFolder([p for p in unlabeled.paths if p.resolve() not in paired],
                                     unlabeled.resolution, unlabeled.channels, unlabeled.fit)
    problems, checked = [], 0
    workers = data.default_workers() if args.workers is None else args.workers
    for dataset in (labeled, unlabeled):
        if dataset is None or len(dataset) == 0:
            continue
        for problem in DataLoader(Checked(dataset), batch_size=None, num_workers=workers):
            checked += 1
            if problem:
                problems.append(problem)
                print(f"error: {problem}", file=sys.stderr)
    print(f"checked {checked} files or pairs ({info['labeled_count']} labeled pairs, {info['unlabeled_count']} "
          f"images in all), {info['channels']} channels, {info['num_classes']} classes: {len(problems)} problems")
    if problems:
        sys.exit(2)


class Checked(Dataset):
    """A dataset's samples replaced by '' or the one-line data.DataError each raises."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            self.dataset[index]
            return ""
        except data.DataError as error:
            return str(error)


def command_show(args):
    """A grid: per sample the image, the image with its mask laid over it, and the mask."""
    if Path(args.out).exists():
        raise data.DataError(f"--out {args.out} exists; pass another file name (or remove it)")
    if args.data != "demo" and data.inside(args.out, args.data):
        raise data.DataError(f"--out {args.out} lies inside --data, where the grid would be read as an image; "
                             "pass a file outside the data")
    labeled, unlabeled, info = data.build_datasets(args, augment=None if args.show_augmented else False)
    rows = []
    if labeled is not None:
        for index in data.evenly_spaced(list(range(len(labeled))), args.count):
            image, mask = labeled[(index, (args.seed, 0, index))]
            pixels = data.image_to_uint8(image)
            rows.append(np.concatenate([pixels, data.overlay(pixels, mask.numpy()), data.colour_mask(mask.numpy())],
                                       axis=1))
    else:
        for index in data.evenly_spaced(list(range(len(unlabeled))), args.count):
            rows.append(data.image_to_uint8(unlabeled[index]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out)
    names = info["class_names"] or list(range(info["num_classes"] or 0))
    legend = ", ".join(f"{c}={n}" for c, n in enumerate(names) if c)
    print(f"wrote {args.out}: {len(rows)} samples{f' (classes {legend})' if legend else ''}")


def command_split(args):
    """Seeded train/val/test name lists of a labeled folder: DIR/train.txt, val.txt, test.txt."""
    folder = data.existing_folder(args.data, "--data")
    if not data.is_labeled_folder(folder):
        raise data.DataError(f"{folder}: not a labeled folder (images/ + masks/); split needs labeled pairs")
    names = [p.name for p in data.index_labeled_folder(folder, args.skip_unpaired)]
    if args.val + args.test >= 1:
        raise data.DataError(f"--val {args.val} --test {args.test}: the fractions must sum below 1")
    order = [names[i] for i in np.random.default_rng(args.seed).permutation(len(names))]
    test_count, val_count = round(len(names) * args.test), round(len(names) * args.val)
    parts = {"test": order[:test_count], "val": order[test_count:test_count + val_count],
             "train": order[test_count + val_count:]}
    out = Path(args.out)
    existing = [out / f"{part}.txt" for part in parts if (out / f"{part}.txt").exists()]
    if existing:  # runs may name it: a split is never redrawn under their feet
        raise data.DataError(f"{existing[0]} exists; pass another --out (or remove the old split files first)")
    out.mkdir(parents=True, exist_ok=True)
    for part, chosen in parts.items():
        (out / f"{part}.txt").write_text("".join(f"{n}\n" for n in sorted(chosen)), encoding="utf-8",
                                         errors="surrogateescape")
    print(f"wrote {out}/train.txt ({len(parts['train'])}), val.txt ({len(parts['val'])}), "
          f"test.txt ({len(parts['test'])}) from {len(names)} pairs, seed {args.seed}")


def command_demo(args):
    """Write demo scenes as a labeled folder: with --seed other than 0 (the training scenes), scenes that
    training never saw, to segment and score."""
    demo = data.DemoDataset(args.resolution, args.channels, args.num_classes, args.count, args.seed)
    out = Path(args.out)
    refuse_a_data_set(out)
    writer = DatasetWriter(out)
    writer.classes(demo.class_names)
    for index in range(args.count):
        picture, mask = demo.render(index)
        pixels = (picture * 255 + 0.5).astype(np.uint8)
        writer.pair(f"scene{index:05d}", Image.fromarray(pixels[..., 0] if args.channels == 1 else pixels), mask)
    print(f"wrote {args.count} demo scenes (seed {args.seed}, {args.resolution} px, {args.num_classes} classes) "
          f"to {out}")
