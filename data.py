"""data.py: from what is on disk to the tensors SemanticGAN trains on.

SemanticGAN (Li et al., CVPR 2021, Sec. 3-4) learns from a few labeled pairs (image + segmentation mask) and many
unlabeled images. This file turns folders in one format into those two streams and makes a procedural demo set
(`--data demo`, no download); prepare.py writes the paper's public data sets into that format and has the commands
that look at a folder (`python prepare.py check|show|split|demo`). Every problem with the input raises `DataError`,
whose message is one line naming the file and what to do.

A labeled folder:                          An unlabeled folder:

    LABELED/images/NAME.png (or .jpg ...)      ANY/.../*.png|jpg|jpeg|bmp|tif|tiff|webp   (searched recursively)
    LABELED/masks/NAME.png
    LABELED/classes.txt        (optional: one class name per line, line 1 = class 0)

A mask has the same name (sub-folders included) and size as its image; each pixel holds a class index, 0 =
background, whatever the PNG mode (8-bit, 16-bit, palette: the index, 1-bit); a colour mask is an error unless its
three channels are equal; JPEG masks are refused (lossy compression changes class values at edges). Images may be
grey, RGB, palette, 16-bit (stretched to 8 bits per image, min to max) or RGBA (alpha is ignored).

What `build_datasets` makes of them:

    labeled    (image, mask): image float32 [C, R, R] in [-1, 1], mask int64 [R, R] of class ids
    unlabeled  image float32 [C, R, R]: every image, the labeled ones included (the paper feeds all of them to the
               image discriminator D_r), minus those of pairs that --split leaves out (test images never train)
    info       dict: channels, num_classes, class_names, counts, ...

* Resizing: images bilinear (antialiased when shrinking; JPEGs are first decoded at a reduced scale when at least
  twice the target), masks nearest.
* Non-square images (`--fit`): `pad` (default) pads the short side symmetrically with black / background and keeps
  everything in view, which suits X-rays and dermoscopy whose edges matter; `crop` takes the centred square;
  `stretch` resizes straight to R x R, as the official code does.
* Flips (`--flip`, `--no-flip`): horizontal, with probability 0.5, of the unlabeled images (as the official code's
  RandomHorizontalFlip for D_r) and, when augmenting, of the labeled pairs. Default on for RGB data (faces, skin
  lesions: mirror-symmetric; the official code reads only RGB), off for grey data (chest X-ray, CT, MRI: the heart
  and the liver sit on one side, so a flipped image is anatomy that does not occur; JSRT's masks merge both lungs
  into one class, so a flip would not swap labels, but it would teach the generator mirrored chests).
* Augmentation of labeled pairs (`--augment`, default on; `--no-augment`): the official code's `--seg_aug` (Augment),
  off by default there (absent from its README's commands); on here because with 9 to 40 labeled pairs D_m
  otherwise sees the same few masks thousands of times and can memorise them, the overfitting that augmentation
  prevents in discriminators trained on little data (Karras et al. 2020, ADA). `--no-augment --flip` is the official
  pipeline for RGB data.
* Classes: `--num-classes K`, else the largest destination of `--class-map` + 1, else classes.txt, else the largest
  value in (up to 64) masks + 1. `--class-map`: a table name (`celebamask19to8`), a file of `SRC:DST` lines or
  inline `255:1,128:2`; unlisted values keep their value. K counts the background: a binary task has K = 2 (one
  mask channel in the generator: model.mask_channels).
* `--num-labels N` keeps the first N pairs of one permutation seeded by `--labels-seed` (default 0, independent of
  `--seed`), so 9 of them are inside the 35, which are inside the 175; the other pairs' masks are hidden, their
  images stay unlabeled. `--split FILE` keeps the pairs named in FILE (one per line, extension optional;
  `python prepare.py split` writes seeded train/val/test files).

`InfiniteLoader` streams seeded, reshuffled, resumable batches forever, the same whatever the number of workers.
"""

import argparse
import collections
import math
import os
import re
import signal
import sys
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate

import cli

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
LOSSY_EXTENSIONS = (".jpg", ".jpeg")
MAX_CLASSES = 256  # masks are resized and augmented as 8-bit images
FITS = ("pad", "crop", "stretch")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")

# The 19 CelebAMask-HQ classes, in the order of the index maps its authors' g_mask.py writes (and of
# ../shared/data/celebamask): the value of a pixel is the position in this list.
CELEBAMASK19_CLASSES = ("background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
                        "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")

# The paper's 8 face classes. Neither the paper nor the official code (nv-tlabs/semanticGAN_code, whose
# CelebAMaskDataset only lists 8 colours) states which of the 19 classes go where, so this grouping is
# ours: the face parts are kept, left and right merged, lips into mouth and neck into skin; accessories and
# clothing (eye_g, hat, ear_r, neck_l, cloth) become background.
FACE8_CLASSES = ("background", "skin", "hair", "eyes", "brows", "nose", "mouth", "ears")
CELEBAMASK19_TO_8 = {0: 0, 1: 1, 2: 5, 3: 0, 4: 3, 5: 3, 6: 4, 7: 4, 8: 7, 9: 7,
                     10: 6, 11: 6, 12: 6, 13: 2, 14: 0, 15: 0, 16: 0, 17: 1, 18: 0}
CLASS_MAPS = {"celebamask19to8": (CELEBAMASK19_TO_8, FACE8_CLASSES)}


# ----------------------------------------------------------------------------------------------------
# Errors, reading one image or one mask, class maps


class DataError(Exception):
    """Bad input data. The message is one line: the file, what is wrong, what to do."""


def one_line(error):
    """The message of a DataError, also when a DataLoader worker wrapped it in a traceback."""
    text = str(error).strip()
    return text.splitlines()[-1].split("DataError: ", 1)[-1] if "Traceback" in text else text


def open_image_file(path):
    """Pillow's lazy open (the header only); every failure becomes a DataError naming the file."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as error:  # UnidentifiedImageError, permissions, decompression bombs...
        raise DataError(f"{path}: not a readable image ({error}); re-export it as PNG or remove it") from None


def decode(image, path):
    try:
        image.load()
    except Exception as error:  # truncated or corrupt data (OSError, SyntaxError, zlib errors...)
        raise DataError(f"{path}: corrupt or truncated image ({error}); re-download or re-export it, "
                        "or remove it") from None
    return image


def to_channels(image, channels):
    """Any Pillow mode to 'L' (channels 1) or 'RGB' (channels 3); alpha is dropped, 16-bit or float pixels are
    stretched to 0..255 from the image's own minimum to its maximum."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        image = Image.fromarray(((array - low) * scale + 0.5).astype(np.uint8), "L")
    return image.convert("L" if channels == 1 else "RGB")


def load_image(path, channels, min_size=None):
    """The image at `path` as a Pillow image in mode 'L' (channels 1) or 'RGB' (channels 3). `min_size` lets a
    JPEG decode at a reduced scale (1/2, 1/4, 1/8) while both sides stay at least that large: a 1024 px photo
    for a 256 px model decodes four times faster."""
    image = open_image_file(path)
    if min_size and image.format == "JPEG":
        image.draft(image.mode, (min_size, min_size))
    return to_channels(decode(image, path), channels)


def looks_grayscale(path):
    """True when the image at `path` has one channel, or three equal ones (a grey image saved as RGB)."""
    image = open_image_file(path)
    if image.mode in GRAY_MODES:
        return True
    if image.format == "JPEG":
        image.draft("RGB", (64, 64))
    rgb = np.asarray(decode(image, path).convert("RGB"), dtype=np.int16)
    return int(np.abs(rgb - rgb[..., :1]).max()) <= 2  # JPEG chroma rounding leaves +-1 or 2


def mask_values(image, path):
    """The class indices of a decoded mask image, as an integer array [H, W]."""
    mode = image.mode
    if mode in ("1", "L", "P", "I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image)
        values = values.astype(np.uint8) if values.dtype == bool else values
    elif mode in ("LA", "PA"):
        values = np.asarray(image)[..., 0]
    elif mode == "F":
        values = np.asarray(image)
        if not np.all(values == np.round(values)):
            raise DataError(f"{path}: mask holds fractional values; save class indices as integers "
                            "(an 8-bit PNG, value = class)")
        values = values.astype(np.int64)
    elif mode in ("RGB", "RGBA"):
        rgb = np.asarray(image)[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise DataError(f"{path}: mask is a colour image; masks hold class indices: convert the colours "
                            "to indices and save a single-channel PNG (value = class, 0 = background)")
        values = rgb[..., 0]
    else:
        raise DataError(f"{path}: mask has Pillow mode {mode}; save it as a single-channel PNG of class indices")
    if values.size and int(values.min()) < 0:
        raise DataError(f"{path}: mask holds negative values; class indices start at 0 (background)")
    return values


def load_mask(path):
    """The mask at `path` as an integer array [H, W] of class indices (palette masks: the index)."""
    return mask_values(decode(open_image_file(path), path), path)


def binary_mask(path):
    """A released binary mask (0 / 255, 0 / 1, a two-colour GIF...) as bool [H, W]: not black. A palette
    is read through its colours here, since in a GIF black need not be index 0."""
    image = decode(open_image_file(path), path)
    if image.mode in ("P", "PA"):
        image = image.convert("L")
    return mask_values(image, path) > 0


def parse_class_map(spec):
    """`--class-map`: a table name, a file of `SRC:DST` lines, or inline `SRC:DST,SRC:DST`. Returns (table dict,
    class names or None)."""
    if spec in CLASS_MAPS:
        table, names = CLASS_MAPS[spec]
        return dict(table), list(names)
    if os.path.isfile(spec):
        where, entries = spec, [line.split("#")[0].strip() for line in Path(spec).read_text().splitlines()]
    elif ":" in spec:
        where, entries = "--class-map", [e.strip() for e in spec.split(",")]
    else:
        raise DataError(f"--class-map {spec}: neither a file nor a known table ({', '.join(CLASS_MAPS)}); "
                        "give a table name, a file of SRC:DST lines or SRC:DST,SRC:DST")
    table = {}
    for entry in filter(None, entries):
        match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", entry)
        if not match:
            raise DataError(f"{where}: cannot read class-map entry '{entry}'; write SRC:DST with integers, e.g. 255:1")
        table[int(match.group(1))] = int(match.group(2))
    if not table:
        raise DataError(f"{where}: the class map is empty; write one SRC:DST per line")
    return table, None


def lookup_table(table):
    """The class map as an array: lut[value] = class; unlisted values keep their value."""
    lut = np.arange(65536, dtype=np.int64)
    lut[list(table)] = list(table.values())
    return lut


def remap(values, lut, path):
    if lut is None:
        return values
    if values.size and int(values.max()) >= len(lut):
        raise DataError(f"{path}: mask value {int(values.max())} is beyond 16 bits; masks hold class indices")
    return lut[values]


def read_class_names(folder):
    path = Path(folder) / "classes.txt"
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return names or None


# ----------------------------------------------------------------------------------------------------
# Geometry (square fit, resize, augmentation) and tensors


def fit_square(image, size, fit, resample, fill=0):
    """`image` (Pillow) to `size` x `size`: pad, centre-crop or stretch a non-square image first."""
    width, height = image.size
    if width != height and fit == "crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    elif width != height and fit == "pad":
        side = max(width, height)
        canvas = Image.new(image.mode, (side, side), fill)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        image = canvas
    if image.size != (size, size):
        image = image.resize((size, size), resample)
    return image


class Augment:
    """The official code's --seg_aug pipeline: HorizontalFlip(p 0.5), ShiftScaleRotate(shift 0.1, scale 0.2,
    rotate 15 degrees about the centre, constant border 0, p 0.5), applied with the same parameters to an image
    (bilinear) and its mask (nearest)."""

    def __init__(self, flip=True, affine=True, shift=0.1, scale=0.2, rotate=15.0):
        self.flip, self.affine, self.shift, self.scale, self.rotate = flip, affine, shift, scale, rotate

    def __call__(self, image, mask, rng):
        # draw every number whatever the switches, so that turning one off leaves the others' draws alone
        flip, transform = rng.random() < 0.5, rng.random() < 0.5
        dx, dy = rng.uniform(-self.shift, self.shift, size=2)
        scale = rng.uniform(1 - self.scale, 1 + self.scale)
        angle = math.radians(rng.uniform(-self.rotate, self.rotate))
        if self.flip and flip:
            image, mask = (x.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for x in (image, mask))
        if self.affine and transform:
            size = image.size[0]
            coefficients = inverse_affine(size, dx * size, dy * size, scale, angle)
            image = image.transform(image.size, Image.Transform.AFFINE, coefficients,
                                    Image.Resampling.BILINEAR, fillcolor=0)
            mask = mask.transform(mask.size, Image.Transform.AFFINE, coefficients,
                                  Image.Resampling.NEAREST, fillcolor=0)
        return image, mask


def inverse_affine(size, shift_x, shift_y, scale, angle):
    """Where Pillow's AFFINE reads the input for each output pixel: the inverse of "scale and rotate about the centre,
    then shift"."""
    centre = size / 2
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    # input = R(-angle) / scale @ (output - centre - shift) + centre
    ox, oy = centre + shift_x, centre + shift_y
    return cos, sin, centre - cos * ox - sin * oy, -sin, cos, centre + sin * ox - cos * oy


def image_to_tensor(image):
    """A Pillow 'L' or 'RGB' image to float32 [C, H, W] in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    array = array[None] if array.ndim == 2 else array.permute(2, 0, 1)
    return array / 127.5 - 1.0


def one_hot(mask, num_classes):
    """Class ids [N, R, R] (long) to float one-hot [N, K, R, R] ([R, R] gives [K, R, R]), the form D_m sees a real
    mask in ({0, 1} here; the official {-1, +1} is the model's choice: model.real_mask_input)."""
    mask = torch.as_tensor(mask).long()
    if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) >= num_classes):
        raise ValueError(f"one_hot: mask values span {int(mask.min())}..{int(mask.max())}, "
                         f"outside 0..{num_classes - 1}")
    return torch.nn.functional.one_hot(mask, num_classes).movedim(-1, -3).float()


def sample_key(key):
    """Datasets take an index, or (index, entropy) from InfiniteLoader: the entropy seeds the sample's augmentation,
    so that a stream does not depend on which worker loads what. A bare index draws fresh randomness."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), np.random.default_rng([int(v) % 2 ** 63 for v in key[1]])
    return int(key), np.random.default_rng()


# ----------------------------------------------------------------------------------------------------
# Indexing folders (names only: no pixel is read at start-up except a few samples), and the datasets


def existing_folder(path, option):
    folder = Path(path)
    if not folder.exists():
        raise DataError(f"{folder}: no such folder; pass {option} a folder of images, a labeled folder "
                        "(images/ + masks/) or demo")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; pass {option} a folder (images are found recursively)")
    return folder


def is_labeled_folder(folder):
    return (Path(folder) / "images").is_dir() and (Path(folder) / "masks").is_dir()


def list_images(folder, exclude=(), others=None):
    """Image files under `folder` (recursive, sorted, hidden entries skipped), minus the `exclude` folders.
    `others`, a list, receives the files that were left out for their extension."""
    folder = Path(folder)
    excluded = {Path(e).resolve() for e in exclude}
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (Path(root) / d).resolve() not in excluded)
        for f in sorted(f for f in files if not f.startswith(".")):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(root) / f)
            elif others is not None:
                others.append(Path(root) / f)
    return found


def files_by_name(folder, exclude=()):
    """{NAME: path} of the images under `folder` (minus `exclude`); NAME is the path inside it without extension."""
    by_name = {}
    for path in list_images(folder, exclude):
        name = path.relative_to(folder).with_suffix("").as_posix()
        if name in by_name:
            raise DataError(f"{path}: two files named {name} ({by_name[name].name} and {path.name}); keep one of them")
        by_name[name] = path
    return by_name


Pair = collections.namedtuple("Pair", "name image mask")  # a labeled pair: its NAME, image path and mask path


def index_labeled_folder(folder, skip_unpaired=False):
    """Pairs images/NAME.* with masks/NAME.* by name. Unpaired files are an error, or with `skip_unpaired` are
    left out with one warning line that counts them."""
    folder = Path(folder)
    images, masks = files_by_name(folder / "images"), files_by_name(folder / "masks")
    for path in masks.values():
        if path.suffix.lower() in LOSSY_EXTENSIONS:
            raise DataError(f"{path}: masks must be lossless (JPEG changes class values at edges); save it as PNG")
    no_mask = [images[n] for n in images if n not in masks]
    no_image = [masks[n] for n in masks if n not in images]
    if not images and not masks:
        raise DataError(f"{folder}: images/ and masks/ hold no image files ({', '.join(IMAGE_EXTENSIONS)})")
    if (no_mask or no_image) and not skip_unpaired:
        if no_mask:
            more = f" (and {len(no_mask) - 1} more images without masks)" if len(no_mask) > 1 else ""
            raise DataError(f"{no_mask[0]}: image has no mask {folder / 'masks'}/"
                            f"{no_mask[0].relative_to(folder / 'images').with_suffix('.png').as_posix()}{more}; "
                            "add it, move the image to an unlabeled folder, or pass --skip-unpaired")
        more = f" (and {len(no_image) - 1} more masks without images)" if len(no_image) > 1 else ""
        raise DataError(f"{no_image[0]}: mask has no image in {folder / 'images'}{more}; add the image, "
                        "remove the mask, or pass --skip-unpaired")
    if no_mask or no_image:
        print(f"warning: {folder}: left out {len(no_mask)} images without masks and {len(no_image)} masks "
              f"without images (--skip-unpaired)", file=sys.stderr)
    pairs = [Pair(n, images[n], masks[n]) for n in sorted(images) if n in masks]
    if not pairs:
        raise DataError(f"{folder}: no image has a mask of the same name")
    return pairs


def read_split_file(path):
    """Names listed in a split file: one per line, extension optional, '#' starts a comment."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: split file not found; write one NAME per line, or make one with "
                        "`python prepare.py split`")
    # surrogateescape: the names are file names, whatever bytes they hold (prepare.py split writes them so)
    text = file.read_text(encoding="utf-8", errors="surrogateescape")
    names = [re.sub(r"\.(png|jpe?g|bmp|tiff?)$", "", n, flags=re.IGNORECASE)
             for n in (line.split("#")[0].strip() for line in text.splitlines()) if n]
    if not names:
        raise DataError(f"{file}: split file lists no names")
    return names


def choose_labeled_subset(pairs, count, seed=0):
    """`count` pairs in name order, the first `count` of a seeded permutation (a smaller subset is inside a larger)."""
    if count > len(pairs):
        raise DataError(f"--num-labels {count}: only {len(pairs)} labeled pairs are there; pass at most "
                        f"--num-labels {len(pairs)}")
    order = np.random.default_rng(seed).permutation(len(pairs))[:count]
    return [pairs[i] for i in sorted(order)]



class LabeledFolder(Dataset):
    """(image [C, R, R] in [-1, 1], mask [R, R] long) for a list of Pairs."""

    def __init__(self, pairs, resolution, channels, num_classes, class_map=None, fit="pad", augment=None):
        self.pairs, self.resolution, self.channels = list(pairs), resolution, channels
        self.num_classes, self.fit, self.augment, self.class_map = num_classes, fit, augment, class_map
        self.lut = None if class_map is None else lookup_table(class_map)

    def __len__(self):
        return len(self.pairs)

    def read_mask(self, pair, opened=None):
        """The mask of `pair` after the class map, at its own size, checked against num_classes."""
        mask_file = opened if opened is not None else open_image_file(pair.mask)
        values = remap(mask_values(decode(mask_file, pair.mask), pair.mask), self.lut, pair.mask)
        if values.size and int(values.max()) >= self.num_classes:
            bad = int(values.max())
            hint = " (a 0/255 binary mask: use --class-map 255:1)" if bad == 255 and self.num_classes <= 2 else ""
            raise DataError(f"{pair.mask}: mask value {bad} is not a class: there are {self.num_classes} "
                            f"classes (0..{self.num_classes - 1}){hint}; pass --num-classes or --class-map")
        return values

    def load(self, index, rng=None):
        pair = self.pairs[index]
        image_file, mask_file = open_image_file(pair.image), open_image_file(pair.mask)
        if image_file.size != mask_file.size:
            raise DataError(f"{pair.mask}: mask is {mask_file.size[0]}x{mask_file.size[1]} but its image {pair.image} "
                            f"is {image_file.size[0]}x{image_file.size[1]}; save the mask at the image's size")
        values = self.read_mask(pair, mask_file)
        if image_file.format == "JPEG":
            image_file.draft(image_file.mode, (self.resolution, self.resolution))
        image = to_channels(decode(image_file, pair.image), self.channels)
        mask = Image.fromarray(values.astype(np.uint8), "L")
        image = fit_square(image, self.resolution, self.fit, Image.Resampling.BILINEAR)
        mask = fit_square(mask, self.resolution, self.fit, Image.Resampling.NEAREST)
        if self.augment is not None and rng is not None:
            image, mask = self.augment(image, mask, rng)
        return image_to_tensor(image), torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())

    def __getitem__(self, key):
        return self.load(*sample_key(key))


class ImageFolder(Dataset):
    """Images [C, R, R] in [-1, 1] from a list of files; `flip`: flipped horizontally with probability 0.5.
    `replace_unreadable` (the unlabeled pool of a long run): a file that cannot be read (corrupt, or removed since
    the pool was listed) is replaced by another drawn from the pool with the sample's own seed, so the stream stays
    reproducible; an item is then (image, [(path, reason), ...] of the files replaced), which InfiniteLoader
    counts. A pool of 100k images should not lose a week of training to one bad file; labeled pairs, a precious
    few, still stop the run at once."""

    REPLACEMENT_TRIES = 10

    def __init__(self, paths, resolution, channels, fit="pad", flip=False, replace_unreadable=False):
        self.paths, self.resolution, self.channels, self.fit = list(paths), resolution, channels, fit
        self.flip, self.replace_unreadable = flip, replace_unreadable

    def __len__(self):
        return len(self.paths)

    def load(self, index):
        image = load_image(self.paths[index], self.channels, min_size=self.resolution)
        return fit_square(image, self.resolution, self.fit, Image.Resampling.BILINEAR)

    def __getitem__(self, key):
        index, rng = sample_key(key)
        unreadable = []
        for _ in range(self.REPLACEMENT_TRIES):
            try:
                image = image_to_tensor(self.load(index))
                break
            except DataError as error:
                if not self.replace_unreadable:
                    raise
                unreadable.append((str(self.paths[index]), one_line(error)))
                index = int(rng.integers(len(self.paths)))  # drawn only when needed: good samples unchanged
        else:
            raise DataError(f"{unreadable[0][1]} (and the {len(unreadable) - 1} images drawn to replace it "
                            "were unreadable too); check the pool with `python prepare.py check --data ...`")
        image = image.flip(-1) if self.flip and rng.random() < 0.5 else image  # the official RandomHorizontalFlip
        return (image, unreadable) if self.replace_unreadable else image


def collate_replaced(items):
    """Batches of ImageFolder(replace_unreadable=True) items: (images [B, C, R, R], files replaced)."""
    return default_collate([image for image, _ in items]), [bad for _, replaced in items for bad in replaced]


class ImagesOf(Dataset):
    """The images of a labeled dataset, without their masks; `flip` as ImageFolder's."""

    def __init__(self, labeled, flip=False):
        self.labeled, self.flip = labeled, flip

    def __len__(self):
        return len(self.labeled)

    def __getitem__(self, key):
        index, rng = sample_key(key)
        image = self.labeled.load(index, None)[0]
        return image.flip(-1) if self.flip and rng.random() < 0.5 else image


# The demo's classes: each has a shape and a colour (and a grey level for one channel).
DEMO_SHAPES = ("ellipse", "rectangle", "triangle", "ring", "diamond", "cross")
DEMO_COLOURS = np.array([(0.90, 0.25, 0.20), (0.20, 0.75, 0.30), (0.25, 0.45, 0.95), (0.95, 0.85, 0.20),
                         (0.80, 0.30, 0.85), (0.20, 0.85, 0.90), (0.95, 0.55, 0.15), (0.95, 0.95, 0.95)])


class DemoDataset(Dataset):
    """Procedural labeled images: a dark gradient background and 1 to 3 shapes, each of a class 1..K-1 (class c is
    a DEMO_SHAPES[(c-1) % 6] in its own colour or grey level), later shapes occluding earlier ones, plus a little
    shading and noise on the image only. The mask is exact: a pixel belongs to the last shape that covers its
    centre. Scenes live in the unit square, so every resolution shows the same scene; all follows from (seed, index)."""

    def __init__(self, resolution=256, channels=3, num_classes=4, length=1000, seed=0, augment=None):
        if not 2 <= num_classes <= MAX_CLASSES:
            raise DataError(f"demo: --num-classes {num_classes}: the demo makes 2 to {MAX_CLASSES} classes")
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        self.length, self.seed, self.augment = length, seed, augment
        self.class_names = ["background"] + [
            DEMO_SHAPES[(c - 1) % len(DEMO_SHAPES)] + ("" if c <= len(DEMO_SHAPES) else str(c))
            for c in range(1, num_classes)]

    def __len__(self):
        return self.length

    def class_colour(self, c):
        if self.channels == 1:  # grey levels spread over 0.45..0.95, well above the background
            return np.array([0.45 + 0.5 * (c - 1) / max(1, self.num_classes - 2)])
        colour = DEMO_COLOURS[(c - 1) % len(DEMO_COLOURS)]
        return colour if c <= len(DEMO_COLOURS) else colour * (0.6 + 0.4 * ((c * 0.37) % 1))

    def render(self, index):
        """(image float [R, R, C] in 0..1, mask uint8 [R, R]) of scene `index`."""
        rng, size = np.random.default_rng([self.seed, index]), self.resolution
        centres = (np.arange(size, dtype=np.float32) + 0.5) / size
        y, x = centres[:, None], centres[None, :]  # pixel centres in the unit square, broadcast
        direction = rng.uniform(0, 2 * np.pi)
        ramp = 0.5 + 0.7 * (np.cos(direction) * (x - 0.5) + np.sin(direction) * (y - 0.5))
        low, high = rng.uniform(0.02, 0.15, self.channels), rng.uniform(0.15, 0.35, self.channels)
        image = (low + (high - low) * ramp[..., None]).astype(np.float32)
        mask = np.zeros((size, size), np.uint8)
        for _ in range(rng.integers(1, 4)):
            c = int(rng.integers(1, self.num_classes))
            cx, cy = rng.uniform(0.25, 0.75, 2)
            a, b = rng.uniform(0.12, 0.26, 2)
            angle, brightness = rng.uniform(0, np.pi), rng.uniform(0.9, 1.05)
            reach = math.hypot(a, b)  # no shape extends further from its centre: work in that box only
            rows = slice(max(0, int((cy - reach) * size)), min(size, int((cy + reach) * size) + 1))
            cols = slice(max(0, int((cx - reach) * size)), min(size, int((cx + reach) * size) + 1))
            dx, dy = x[:, cols] - cx, y[rows, :] - cy
            u = np.cos(angle) * dx + np.sin(angle) * dy
            v = -np.sin(angle) * dx + np.cos(angle) * dy
            inside = self.shape(DEMO_SHAPES[(c - 1) % len(DEMO_SHAPES)], u, v, a, b)
            shade = 0.85 + 0.15 * (0.5 + u / (2 * a)).clip(0, 1)
            mask[rows, cols][inside] = c
            image[rows, cols][inside] = (self.class_colour(c) * brightness)[None] * shade[inside][:, None]
        image += 0.02 * rng.standard_normal(image.shape, dtype=np.float32)
        return image.clip(0, 1), mask

    @staticmethod
    def shape(kind, u, v, a, b):
        if kind == "ellipse":
            return (u / a) ** 2 + (v / b) ** 2 <= 1
        if kind == "rectangle":
            return (np.abs(u) <= a) & (np.abs(v) <= b)
        if kind == "triangle":  # apex up in the shape's frame, base of width 2a at v = b
            return (v <= b) & (v >= -b) & (np.abs(u) <= a * (v + b) / (2 * b))
        if kind == "ring":
            radius = np.sqrt(u ** 2 + v ** 2)
            return (radius <= max(a, b)) & (radius >= 0.55 * max(a, b))
        if kind == "diamond":
            return np.abs(u) / a + np.abs(v) / b <= 1
        return ((np.abs(u) <= a) & (np.abs(v) <= b / 3)) | ((np.abs(u) <= a / 3) & (np.abs(v) <= b))  # cross

    def load(self, index, rng=None):
        picture, values = self.render(index)
        pixels = (picture * 255 + 0.5).astype(np.uint8)
        image = Image.fromarray(pixels[..., 0] if self.channels == 1 else pixels, "L" if self.channels == 1 else "RGB")
        mask = Image.fromarray(values, "L")
        if self.augment is not None and rng is not None:
            image, mask = self.augment(image, mask, rng)
        return image_to_tensor(image), torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())

    def __getitem__(self, key):
        index, rng = sample_key(key)
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.load(index, rng)


# ----------------------------------------------------------------------------------------------------
# The data options every script shares, and build_datasets


def default_workers(world_size=1):
    """DataLoader workers per stream: the CPU cores this process may use, shared among the local ranks, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // max(1, world_size)))


def add_data_args(parser, resolutions=None):
    """The data options every script shares. `--seed` and `--workers` are added only when the parser has no option
    of that name yet. `resolutions`: the sizes the networks can take (the training scripts), else any size >= 4."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", metavar="PATH", help="a folder of images (searched recursively), a "
                       "labeled folder (images/ + masks/; then it is also --labeled-dir), or 'demo'")
    group.add_argument("--labeled-dir", metavar="DIR", help="a labeled folder (images/NAME.* + masks/NAME.png) "
                       "when --data is the unlabeled pool")
    size = dict(type=int, choices=resolutions) if resolutions else dict(type=cli.number(int, low=4))
    group.add_argument("--resolution", default=256, help="square size R (default 256)", **size)
    group.add_argument("--channels", type=int, choices=(1, 3), default=None,
                       help="1 (grey: X-ray, CT, MRI) or 3 (RGB); default: 1 if the sampled images are grey")
    group.add_argument("--num-classes", type=cli.number(int, low=2, high=MAX_CLASSES), default=None,
                       help="classes including background; default: from --class-map, classes.txt or the masks")
    group.add_argument("--class-map", default=None, metavar="MAP", help="merge classes: "
                       f"{', '.join(CLASS_MAPS)}, a file of SRC:DST lines, or SRC:DST,SRC:DST")
    group.add_argument("--num-labels", type=cli.COUNT, default=None, metavar="N",
                       help="keep N labeled pairs (a fixed seeded subset; smaller sets nest in larger ones)")
    group.add_argument("--labels-seed", type=cli.COUNT, default=0, help="seed of the --num-labels subset (default 0)")
    group.add_argument("--split", metavar="FILE", help="keep the labeled pairs named in FILE (one per line)")
    group.add_argument("--fit", choices=FITS, default="pad",
                       help="non-square images: pad (default), centre crop, or stretch")
    group.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                       help="flip + shift/scale/rotate the labeled pairs, the official code's --seg_aug "
                            "(default on here, off in the official code)")
    group.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                       help="horizontal flips of the unlabeled images (as the official code) and in the "
                            "labeled pairs' augmentation (default: on for RGB, off for grey)")
    group.add_argument("--skip-unpaired", action="store_true", help="leave out images without masks and masks "
                       "without images (counted) instead of stopping")
    group.add_argument("--max-unreadable", type=cli.FRACTION, default=0.01, metavar="FRACTION",
                       help="unreadable unlabeled images are replaced by others from the pool and counted; past "
                            "this fraction of the pool (at least one file) the run stops; 0: stop at the first "
                            "(default 0.01)")
    group.add_argument("--demo-length", type=cli.POSITIVE_INT, default=1000,
                       help="images in --data demo (default 1000)")
    options = parser._option_string_actions
    if "--workers" not in options:
        group.add_argument("--workers", type=cli.COUNT, default=None, help="DataLoader workers per stream "
                           "(default: the CPU cores, at most 8)")
    if "--seed" not in options:
        group.add_argument("--seed", type=cli.COUNT, default=0, help="random seed (default 0)")
    return parser


def option(args, name, default=None):
    return getattr(args, name, default)


def build_datasets(args, augment=None, replace_unreadable=False):
    """(labeled, unlabeled, info) from the options of add_data_args (see the module docstring). `augment=False` turns
    the augmentation and the flips off whatever the options say (for evaluation). `replace_unreadable` (training
    streams): unreadable unlabeled images are replaced, up to --max-unreadable (ImageFolder)."""
    source = option(args, "data")
    if not source:
        raise DataError("no data: pass --data FOLDER (or --data demo)")
    resolution = option(args, "resolution", 256)
    if resolution < 4:
        raise DataError(f"--resolution {resolution}: use at least 4 pixels")
    use_augment = option(args, "augment", True) if augment is None else augment
    if source == "demo":
        return build_demo(args, resolution, use_augment, evaluation=augment is False)

    data_folder = existing_folder(source, "--data")
    labeled_folder = existing_folder(args.labeled_dir, "--labeled-dir") if option(args, "labeled_dir") else None
    if labeled_folder is None and is_labeled_folder(data_folder):
        labeled_folder = data_folder
    if labeled_folder is not None and not is_labeled_folder(labeled_folder):
        raise DataError(f"{labeled_folder}: not a labeled folder: expected {labeled_folder}/images and "
                        f"{labeled_folder}/masks")

    # labeled pairs: the folder, then --split, then --num-labels
    pairs, left_out = [], []
    if labeled_folder is not None:
        pairs = index_labeled_folder(labeled_folder, option(args, "skip_unpaired", False))
        if option(args, "split"):
            wanted = read_split_file(args.split)
            known = {p.name for p in pairs}
            missing = [n for n in wanted if n not in known]
            if missing:
                raise DataError(f"{args.split}: lists {missing[0]}, which is not a pair in {labeled_folder}"
                                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                                "fix the names or the folder")
            wanted = set(wanted)
            left_out, pairs = [p for p in pairs if p.name not in wanted], [p for p in pairs if p.name in wanted]
    labeled_total, all_pairs = len(pairs), pairs
    labels = option(args, "num_labels")
    if labels is not None:
        if labels < 0:
            raise DataError(f"--num-labels {labels}: give a count of labeled pairs (0 or more)")
        pairs = choose_labeled_subset(pairs, labels, option(args, "labels_seed", 0))

    unique = unlabeled_pool(data_folder, labeled_folder, left_out)
    channels = option(args, "channels") or infer_channels(unique, labeled={p.image for p in all_pairs})
    class_map, class_names = parse_class_map(args.class_map) if option(args, "class_map") else (None, None)
    num_classes, classes_from = option(args, "num_classes"), "--num-classes"
    if num_classes is None and all_pairs:  # from all pairs, so that --num-labels 9 cannot miss a rare class
        num_classes, classes_from, class_names = infer_num_classes(all_pairs, labeled_folder, class_map, class_names)
    if class_names is None and labeled_folder is not None and class_map is None:
        class_names = read_class_names(labeled_folder)
    if num_classes is not None and not 2 <= num_classes <= MAX_CLASSES:
        raise DataError(f"--num-classes {num_classes}: use 2 to {MAX_CLASSES} (background included)")
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        class_names = None  # a names list that does not fit is worse than none

    flip = option(args, "flip")
    flip = (channels == 3) if flip is None else flip
    flip_unlabeled = flip and augment is not False
    augmentation = Augment(flip=flip) if use_augment else None
    fit = option(args, "fit", "pad")
    labeled = LabeledFolder(pairs, resolution, channels, num_classes, class_map, fit, augmentation) if pairs else None
    unlabeled = ImageFolder(unique, resolution, channels, fit, flip_unlabeled,
                            replace_unreadable=replace_unreadable and option(args, "max_unreadable", 0.01) > 0)
    info = dict(source=str(data_folder), labeled_source=str(labeled_folder) if labeled_folder else None,
                resolution=resolution, channels=channels, num_classes=num_classes, num_classes_from=classes_from,
                class_names=class_names, labeled_count=len(pairs), labeled_total=labeled_total,
                unlabeled_count=len(unique), fit=fit, augment=use_augment, flip=flip and use_augment,
                flip_unlabeled=flip_unlabeled)
    return labeled, unlabeled, info


def unlabeled_pool(data_folder, labeled_folder, left_out):
    """Every image, the labeled ones included, once each (paths resolved), minus those of the pairs `left_out`."""
    if is_labeled_folder(data_folder):
        pool = list_images(data_folder / "images")
    else:
        pool = list_images(data_folder, exclude=[labeled_folder / "masks"] if labeled_folder else ())
    if labeled_folder is not None and labeled_folder.resolve() != data_folder.resolve():
        pool += list_images(labeled_folder / "images")
    first, removed = {}, {p.image.resolve() for p in left_out}
    for path in pool:
        first.setdefault(path.resolve(), path)
    unique = [path for resolved, path in first.items() if resolved not in removed]
    if not unique:
        raise DataError(f"{data_folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                        "recursively); point --data at the folder that holds them")
    return unique


def build_demo(args, resolution, use_augment, evaluation=False):
    if option(args, "labeled_dir") or option(args, "class_map") or option(args, "split"):
        raise DataError("--data demo makes its own labels: leave out --labeled-dir, --class-map and --split")
    channels, num_classes = option(args, "channels") or 3, option(args, "num_classes") or 4
    length = option(args, "demo_length", 1000)
    labels = option(args, "num_labels")
    labels = length if labels is None else labels
    if not 0 <= labels <= length:
        raise DataError(f"--num-labels {labels}: the demo has {length} images (--demo-length)")
    flip = option(args, "flip")
    flip = (channels == 3) if flip is None else flip
    flip_unlabeled = flip and not evaluation
    augmentation = Augment(flip=flip) if use_augment else None
    # the scenes do not depend on --seed: the demo is one fixed data set; the labeled pairs are its first
    # `labels` scenes, which are as random a subset as any
    labeled = DemoDataset(resolution, channels, num_classes, labels, 0, augmentation) if labels else None
    unlabeled = ImagesOf(DemoDataset(resolution, channels, num_classes, length, 0), flip_unlabeled)
    info = dict(source="demo", labeled_source="demo", resolution=resolution, channels=channels,
                num_classes=num_classes, num_classes_from="demo", class_names=unlabeled.labeled.class_names,
                labeled_count=labels, labeled_total=length, unlabeled_count=length, fit="stretch",
                augment=use_augment, flip=flip and use_augment, flip_unlabeled=flip_unlabeled)
    return labeled, unlabeled, info


def build_validation(args, source=None):
    """(dataset of (image, mask) pairs, where they come from) to validate on, never augmented, or (None, why).
    `source`: a labeled folder, or a split file naming pairs of the labeled folder (`prepare.py split`'s val.txt).
    Without it: the labeled pairs that --num-labels left unused (their masks never reach training, their images
    are in the unlabeled pool, as in the paper). Pairs that --split leaves out are never taken on their own: they
    may be the test set."""
    evaluation = argparse.Namespace(**vars(args))
    evaluation.num_labels = None
    if source:
        if Path(source).is_file():
            evaluation.split = source
        else:
            evaluation.data, evaluation.labeled_dir, evaluation.split = source, None, None
            if not is_labeled_folder(existing_folder(source, "--val")):
                raise DataError(f"{source}: --val needs a labeled folder (images/ + masks/) or a split file")
        labeled = build_datasets(evaluation, augment=False)[0]
        return labeled, f"{source} ({len(labeled)} pairs)"
    if option(args, "num_labels") is None:
        return None, "every labeled pair trains; pass --num-labels N to hold the others back, or --val"
    every, chosen = build_datasets(evaluation, augment=False)[0], build_datasets(args, augment=False)[0]
    if isinstance(every, DemoDataset):
        held = list(range(0 if chosen is None else len(chosen), len(every)))
    else:
        names = set() if chosen is None else {p.name for p in chosen.pairs}
        held = [i for i, pair in enumerate(every.pairs) if pair.name not in names]
    if not held:
        return None, "--num-labels keeps every labeled pair; pass --val"
    return Subset(every, held), f"the {len(held)} labeled pairs that --num-labels {args.num_labels} leaves unused"


def evenly_spaced(items, count):
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def infer_channels(paths, samples=8, labeled=()):
    """1 if `samples` images spread over `paths` are all grey, else 3. An unreadable unlabeled one is
    skipped (the next file in the list is taken, and a warning names it), as the training stream would
    replace it; an unreadable image of a labeled pair (in `labeled`) stops here."""
    grey, checked, skipped = True, 0, []
    for start in evenly_spaced(range(len(paths)), samples):
        for path in paths[start:start + 4]:
            try:
                grey = grey and looks_grayscale(path)
                checked += 1
                break
            except DataError as error:
                if path in labeled:
                    raise
                skipped.append(one_line(error))
    if skipped:
        print(f"warning: {len(skipped)} unreadable image(s) skipped while guessing the channels, the first: "
              f"{skipped[0]}", file=sys.stderr, flush=True)
    if not checked:
        raise DataError(f"{skipped[0]} (no readable image among the {len(skipped)} sampled to guess the channels); "
                        "check the data with `python prepare.py check --data ...`, or pass --channels")
    return 1 if grey else 3


def infer_num_classes(pairs, folder, class_map, class_names, samples=64):
    """(num_classes, where it came from, class names) when --num-classes is not given."""
    if class_map is not None:
        return max(class_map.values()) + 1, "--class-map", class_names
    names = read_class_names(folder) if folder is not None else None
    if names:
        return len(names), f"{folder}/classes.txt", names
    largest = 0
    for pair in evenly_spaced(pairs, samples):
        values = load_mask(pair.mask)
        largest = max(largest, int(values.max()) if values.size else 0)
    if largest >= MAX_CLASSES - 1:
        raise DataError(f"{folder}: a mask holds the value {largest}: masks must hold class indices "
                        "(0 = background, 1, 2, ...); for 0/255 binary masks pass --class-map 255:1")
    return max(2, largest + 1), f"the largest value in {min(len(pairs), samples)} masks", None


def patient_id(name):
    """The patient of a slice named PATIENT_zSLICE (as prepare.py names volume slices: lits003_z0042, chaos1-in_z007),
    to average DICE per patient; None for any other name (ISIC_0000000 or MCUCXR_0001_0 are images, not slices)."""
    match = re.fullmatch(r"(.+)_z\d+(\.[A-Za-z]+)?", Path(name).name)  # with or without its file's extension
    return match.group(1) if match else None


# ----------------------------------------------------------------------------------------------------
# The infinite, seeded, resumable stream


RangeLength = range  # what DistributedSampler needs of a dataset: its length


class KeyBatches:
    """Batches of sample keys (index, (seed, epoch, position)) forever, from (epoch, batch) on. It holds plain
    numbers, not the loader: a reference cycle through the DataLoader iterator would leave its worker processes
    to the garbage collector, which cannot stop them cleanly."""

    def __init__(self, dataset_length, length, batch_size, seed, rank, world_size, epoch, batch):
        self.dataset_length, self.length, self.batch_size = dataset_length, length, batch_size
        self.seed, self.rank, self.world_size, self.epoch, self.batch = seed, rank, world_size, epoch, batch

    def __iter__(self):
        epoch, start, size = self.epoch, self.batch, self.batch_size
        while True:
            sampler = DistributedSampler(RangeLength(self.length), num_replicas=self.world_size, rank=self.rank,
                                         shuffle=True, seed=self.seed, drop_last=True)
            sampler.set_epoch(epoch)  # the permutation is seeded with seed + epoch
            order = list(sampler)
            for b in range(start, len(order) // size):
                yield [(i % self.dataset_length, (self.seed, epoch, i)) for i in order[b * size:(b + 1) * size]]
            epoch, start = epoch + 1, 0


def leave_signals_to_the_main_process(worker_id):
    """A DataLoader worker ignores SIGTERM and SIGINT. Schedulers (SLURM, Kubernetes) and Ctrl-C signal every process
    of a job; a worker killed by one would end the run with an error before the main process could write its
    checkpoint. Workers end when the main process does."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class InfiniteLoader:
    """Batches of `dataset` forever: each epoch a new permutation (seed + epoch) split over `world_size` ranks by
    DistributedSampler (disjoint shards), incomplete batches dropped, default-collated ((images [B, C, R, R], masks
    [B, R, R]) of labeled datasets). A dataset smaller than one global batch is repeated (as the official code
    does), so that --num-labels 9 with batch 16 works; `indices`, the dataset indices of the last batch, tell which
    samples are the same image. state_dict() is (epoch, batch within the epoch): a loader given it yields the very
    batches an uninterrupted one would have yielded next.

    Of a dataset that replaces unreadable files (ImageFolder(replace_unreadable=True)) it keeps count: `unreadable`
    maps each file replaced to its reason, `new_unreadable()` gives those met since the last call (to warn about),
    and past `max_unreadable` of the dataset (at least one file) it stops with a DataError naming stream `name`."""

    def __init__(self, dataset, batch_size, seed=0, rank=0, world_size=1, workers=None, pin_memory=None,
                 name="data", max_unreadable=0.01):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.name, self.dataset_length = rank, world_size, name, len(dataset)
        self.replaces = getattr(dataset, "replace_unreadable", False)
        self.unreadable, self.reported = {}, 0
        self.unreadable_limit = max(1, int(max_unreadable * self.dataset_length))
        if self.dataset_length == 0:
            raise DataError("the data set is empty: nothing to load")
        self.length = max(self.dataset_length, batch_size * world_size)
        self.batches_per_epoch = (self.length // world_size) // batch_size
        self.workers = default_workers(world_size) if workers is None else workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.epoch, self.batch, self.batches, self.keys, self.indices = 0, 0, None, None, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.batches is None:
            keys = KeyBatches(self.dataset_length, self.length, self.batch_size, self.seed, self.rank,
                              self.world_size, self.epoch, self.batch)
            # A private generator: a DataLoader iterator otherwise draws its base seed from the global RNG, and a
            # resumed run would draw different latents. Samples draw from their keys, not from the workers' seeds.
            self.batches = iter(DataLoader(self.dataset, batch_sampler=keys, num_workers=self.workers,
                                           pin_memory=self.pin_memory, generator=torch.Generator(),
                                           collate_fn=collate_replaced if self.replaces else None,
                                           worker_init_fn=leave_signals_to_the_main_process))
            self.keys = iter(keys)  # the same keys, in order
        try:
            batch, message = next(self.batches), None
        except DataError as error:  # from a worker it comes wrapped in a traceback: keep the one line
            message = one_line(error)
            error.__traceback__ = None  # its frames hold the DataLoader iterator in a reference cycle
        if message is None and self.replaces:
            batch, replaced = batch
            self.unreadable.update(replaced)
            if len(self.unreadable) > self.unreadable_limit:
                message = (f"{len(self.unreadable)} of the {self.dataset_length} images of the {self.name} are "
                           f"unreadable (more than --max-unreadable allows), the first: "
                           f"{next(iter(self.unreadable.values()))}; clean it (`python prepare.py check --data "
                           "...` lists every bad file) or raise --max-unreadable, then --resume auto")
        if message is not None:  # raised out here, so that no traceback keeps the workers alive
            self.close()
            raise DataError(message)
        self.indices = torch.tensor([index for index, _ in next(self.keys)])
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return batch

    def close(self):
        """Stop the worker processes (the next batch starts new ones where the stream stands)."""
        self.batches = self.keys = None

    def new_unreadable(self):
        """[(path, reason)] of the files replaced since the last call (called every step: cheap when none)."""
        found = list(self.unreadable.items())[self.reported:] if self.reported < len(self.unreadable) else []
        self.reported += len(found)
        return found

    def state_dict(self):
        return dict(epoch=self.epoch, batch=self.batch, seed=self.seed, batch_size=self.batch_size,
                    world_size=self.world_size, length=self.length, unreadable=dict(self.unreadable))

    def load_state_dict(self, state):
        for key in ("seed", "batch_size", "world_size", "length"):
            if state[key] != getattr(self, key):
                raise DataError(f"the {self.name} stream was saved with {key.replace('_', ' ')} {state[key]} and "
                                f"is resumed with {getattr(self, key)}: the data, --batch or the number of "
                                "processes changed; resume with the same, or add --new-data to keep the "
                                "networks, optimisers and step and start a fresh data stream")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.unreadable = dict(state.get("unreadable", {}))
        self.reported = len(self.unreadable)  # warned about before the checkpoint
        self.close()  # the next batch starts a stream at (epoch, batch)


# ----------------------------------------------------------------------------------------------------
# Writing: masks in colour, tensors as pixels, PNGs written atomically (for prepare.py, the training scripts' sample
# grids, invert.py and generate.py), and the checks that keep every command from writing over what it reads


PALETTE = np.array([(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128),
                    (230, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0),
                    (255, 215, 180), (0, 0, 128)], np.uint8)


def colour_mask(mask):
    """Class ids [H, W] to colours [H, W, 3] (uint8): class 0 is black, the others cycle through 19 colours."""
    mask = np.asarray(mask).astype(np.int64)
    return PALETTE[np.where(mask > 0, 1 + (mask - 1) % (len(PALETTE) - 1), 0)]


def image_to_uint8(image):
    """An image tensor [C, H, W] in [-1, 1] (any device and float type) as uint8 pixels [H, W, 3] (grey as RGB)."""
    x = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x


def overlay(pixels, classes):
    """The coloured mask laid half over the image [H, W, 3] uint8, where a class other than the background is."""
    return np.where(classes[..., None] > 0, (0.5 * pixels + 0.5 * colour_mask(classes)).astype(np.uint8), pixels)


def save_grid(rows, path):
    """Rows of tiles [h, w, 3] stacked into one PNG, small demo resolutions enlarged (nearest) to be seen."""
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    zoom = max(1, 128 // rows[0].shape[0])
    grid.resize((grid.width * zoom, grid.height * zoom), Image.NEAREST).save(path)


def save_png(pixels, path):
    """An image (uint8 array or Pillow image) as PNG, written to a temporary name and then renamed: a run killed
    mid-write never leaves a truncated file under the final name, which a resumed run would take for a finished
    one. The temporary name is short and hidden: it neither outgrows the name limit first nor is read as an image."""
    path = Path(path)
    partial = path.with_name(f".{uuid.uuid4().hex[:12]}.partial")
    try:
        (pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)).save(partial, format="PNG")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def inside(path, folder):
    """True when `path` is `folder` or lies under it, symlinks followed."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def printable(text):
    """A file name as text that prints and goes into UTF-8 files: bytes that are not UTF-8 (Python holds them as
    surrogates, PEP 383) are shown as \\xNN."""
    return os.fsencode(str(text)).decode("utf-8", "backslashreplace")
