"""prepare.py: the public releases of the paper's data sets, converted into data.py's folder format.

    python prepare.py jsrt SRC OUT                 SRC: the folder the release was extracted to
    python prepare.py celebamask SRC OUT --size 256
    python prepare.py --help                       this text, the releases and their layouts, the options
    python prepare.py check|show|split|demo ...    the commands on a folder of the format (datasets.py)

SemanticGAN (Li et al., CVPR 2021, Sec. 4) trains and tests on faces, chest X-rays, skin lesions and liver CT/MRI,
each downloaded from its authors in a layout of its own. Each converter reads one release as it is distributed and
writes the folder format that data.py reads:

    OUT/images/NAME.png     8-bit grey or RGB
    OUT/masks/NAME.png      same name and size, pixel = class index (0 = background); labeled sets only
    OUT/classes.txt         the class names, line 1 = class 0

Files are found anywhere under SRC (the folder names above SRC never count) and matched by name; images without a
mask and masks without an image are left out and counted. A release without masks is written as an unlabeled set.
An image keeps its size (or goes onto its mask's grid where they differ) unless --size N squares both (--fit, as in
data.py; masks with nearest neighbours). Volume sets become axial slices as a radiologist views them (anterior up,
the patient's right on the left) whatever a file's orientation, named PATIENT_zSLICE so that invert.py can average
DICE per patient; slices without liver are left out unless --all-slices.

What is read is checked to be the release named, so that another set in SRC is refused rather than converted into
nonsense: a binary mask (the chest X-ray and skin sets) holds 0 and one other value, with at most 1% of its pixels
in between (an anti-aliased edge); a chest X-ray is grey; ChestX-ray14 takes only files named like its own. OUT must
be a new or empty folder, outside SRC and not holding it. nibabel (lits) and pydicom (chaos) are optional, imported
only by those converters. Every problem with the input is a DataError: one line naming the file and what to do.

The releases (NAME) and the layout each expects under SRC (the first paragraph of its converter's docstring):
"""

import argparse
import importlib
import math
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

import cli
import data
import datasets

# ----------------------------------------------------------------------------------------------------
# Finding a release's files by name, and writing them (datasets.DatasetWriter), each checked


def find(src, predicate):
    """Files under `src` (recursive, sorted) whose path relative to `src` satisfies `predicate`, so that
    the folder names above SRC never count."""
    src = Path(src)
    return [p for p in sorted(src.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and predicate(p.relative_to(src))]


def in_folder_named(path, *names):
    lowered = {n.lower() for n in names}
    return any(part.lower() in lowered for part in path.parent.parts)


def is_image_file(path):
    return path.suffix.lower() in data.IMAGE_EXTENSIONS + (".gif",)


def match_pairs(images, masks, src, what, layout):
    """Pairs by name. With masks: (pairs, counts of unmatched images and masks); without any mask at all
    the set is unlabeled and every image is kept."""
    if not images:
        raise data.DataError(f"{src}: no {what} images found; expected {layout}")
    if not masks:
        return None, len(images), 0
    pairs = [(name, images[name], masks[name]) for name in sorted(images) if name in masks]
    if not pairs:
        raise data.DataError(f"{src}: found {len(images)} images and {len(masks)} masks but no name in common; "
                             f"expected {layout}")
    return pairs, len(images) - len(pairs), len(set(masks) - set(images))


def skipped_note(no_mask, no_image, extra=""):
    parts = [f"{no_mask} images without a mask"] if no_mask else []
    parts += [f"{no_image} masks without an image"] if no_image else []
    parts += [extra] if extra else []
    return f"; left out {', '.join(parts)}" if parts else ""


def release_image(path, channels, what):
    """An image of release `what` as data.load_image reads it. A grey release (channels 1: the chest X-ray
    sets) refuses a colour image rather than turn it grey: colour means SRC holds another set (faces, skin)."""
    if channels == 1 and not data.looks_grayscale(path):
        raise data.DataError(f"{path}: a colour image; chest X-rays are grey: is SRC the {what} release?")
    return data.load_image(path, channels)


def release_binary_mask(path, what, class_name):
    """A binary mask of release `what` as bool [H, W], any non-zero pixel = the class (as data.binary_mask).
    More in-between pixels than 1% (more than an anti-aliased edge) mean a class-index map of another set
    (a face's 19 parts), which would otherwise become one big foreground, so it is refused."""
    image = data.decode(data.open_image_file(path), path)
    if image.mode in ("P", "PA"):  # through the palette's colours: in a GIF black need not be index 0
        image = image.convert("L")
    values = data.mask_values(image, path)
    top = int(values.max()) if values.size else 0
    if np.count_nonzero((values > 0) & (values < top)) > 0.01 * values.size:
        found = np.unique(values)  # only on the way out: the check above is the cheap one
        raise data.DataError(f"{path}: holds {found.size} values {found[0]}..{found[-1]}; a {class_name} mask of "
                             f"the {what} release has two values (0 and 255 or 1); is SRC the {what} release?")
    return values > 0


def write_binary_set(src, out, options, images, masks, what, layout, channels, class_name, read_mask=None):
    """The common case: images and binary masks (any non-zero pixel = class 1) matched by name, each checked
    (release_image, release_binary_mask, or `read_mask(mask source)` -> bool [H, W])."""
    writer = datasets.DatasetWriter(out, options.size, options.fit)
    pairs, no_mask, no_image = match_pairs(images, masks, src, what, layout)
    if pairs is None:
        for name in sorted(images):
            writer.image(name, release_image(images[name], channels, what))
        return writer.summary(what, " (no masks found: an unlabeled set)")
    writer.classes(["background", class_name])
    for name, image_path, mask_source in pairs:
        mask = read_mask(mask_source) if read_mask else release_binary_mask(mask_source, what, class_name)
        writer.pair(name, release_image(image_path, channels, what), mask)
    return writer.summary(what, skipped_note(no_mask, no_image))


def write_face_set(src, out, options, images, masks, what, layout, read_mask):
    """RGB face images with masks of the 8 face classes, read_mask(mask source) -> class indices [H, W];
    `what`: (the release, the command, the masks it needs)."""
    release, command, kind = what
    pairs, no_mask, no_image = match_pairs(images, masks, src, release, layout)
    if pairs is None:
        raise data.DataError(f"{src}: no {kind} masks found; expected {layout}")
    writer = datasets.DatasetWriter(out, options.size, options.fit)
    writer.classes(data.FACE8_CLASSES)
    for name, image_path, mask_source in pairs:
        writer.pair(name, data.load_image(image_path, 3), read_mask(mask_source))
    return writer.summary(command, skipped_note(no_mask, no_image))


def folder_pairs(src, image_folders, mask_folders, mask_suffixes=("",)):
    """{name: image}, {name: mask} from folders with the given names anywhere under SRC; a mask file may
    carry one of `mask_suffixes` after the image's name (e.g. NAME_mask.png)."""
    images = {p.stem: p for p in find(src, lambda p: in_folder_named(p, *image_folders) and is_image_file(p)
                                      and not in_folder_named(p, *mask_folders))}
    masks = {}
    for path in find(src, lambda p: in_folder_named(p, *mask_folders) and is_image_file(p)):
        suffix = next((x for x in sorted(mask_suffixes, key=len, reverse=True) if x and path.stem.endswith(x)), "")
        masks[path.stem[:len(path.stem) - len(suffix)]] = path
    return images, masks


# ----------------------------------------------------------------------------------------------------
# Faces: CelebAMask-HQ, MetFaces-40


def convert_celebamask(src, out, options):
    """CelebAMask-HQ (Lee et al., CVPR 2020), original release: CelebA-HQ-img/N.jpg and
    CelebAMask-HQ-mask-anno/K/NNNNN_PART.png (one binary PNG per face part), painted and merged into the
    paper's 8 face classes (data.FACE8_CLASSES), written at the masks' 512 px

    Images are 1024 x 1024 (N = 0..29999), part masks 512 x 512 in K = N // 2000. Parts are painted in the
    order of data.CELEBAMASK19_CLASSES (as the authors' g_mask.py does: a later part wins where two
    overlap), then merged by data.CELEBAMASK19_TO_8."""
    images = {p.stem: p for p in find(src, lambda p: in_folder_named(p, "CelebA-HQ-img") and is_image_file(p))}
    parts = {}
    for path in find(src, lambda p: in_folder_named(p, "CelebAMask-HQ-mask-anno") and p.suffix == ".png"):
        match = re.fullmatch(r"(\d+)_(\w+)", path.stem)
        if match and match.group(2) in data.CELEBAMASK19_CLASSES:
            parts.setdefault(str(int(match.group(1))), {})[match.group(2)] = path

    def paint(files):
        mask = None
        for value, part in enumerate(data.CELEBAMASK19_CLASSES[1:], start=1):
            if part in files:
                region = data.binary_mask(files[part])
                mask = np.zeros(region.shape, np.uint8) if mask is None else mask
                if region.shape != mask.shape:
                    raise data.DataError(f"{files[part]}: {region.shape[1]}x{region.shape[0]}, unlike the "
                                         "other parts of this face; re-download the annotations")
                mask[region] = data.CELEBAMASK19_TO_8[value]
        return mask

    layout = "SRC/CelebA-HQ-img/N.jpg and SRC/CelebAMask-HQ-mask-anno/K/NNNNN_part.png"
    return write_face_set(src, out, options, images, parts, ("CelebAMask-HQ", "celebamask",
                                                             "CelebAMask-HQ-mask-anno part"), layout, paint)


def convert_celebamask19(src, out, options):
    """CelebAMask-HQ as 19-class index maps (the output of the authors' g_mask.py): CelebA-HQ-img/ (or
    images/) and CelebAMask-HQ-mask/ (or masks/), merged into the 8 face classes

    Any copy in this format works (../shared/data/celebamask): an image folder (CelebA-HQ-img, images or
    image) and a mask folder (CelebAMask-HQ-mask, mask, masks, label or labels) whose PNGs hold 0..18 in the
    order of data.CELEBAMASK19_CLASSES."""
    images, masks = folder_pairs(src, ("CelebA-HQ-img", "images", "image"),
                                 ("CelebAMask-HQ-mask", "mask", "masks", "label", "labels"))
    lut = data.lookup_table(data.CELEBAMASK19_TO_8)

    def merged(mask_path):
        values = data.load_mask(mask_path)
        if values.size and int(values.max()) >= len(data.CELEBAMASK19_CLASSES):
            raise data.DataError(f"{mask_path}: value {int(values.max())} is not one of the 19 CelebAMask-HQ "
                                 "classes (0..18); is this a 19-class index map?")
        return lut[values]

    layout = "SRC/CelebA-HQ-img/N.jpg (or images/) and SRC/CelebAMask-HQ-mask/N.png (or masks/)"
    return write_face_set(src, out, options, images, masks, ("CelebAMask-HQ", "celebamask19", "index-map"),
                          layout, merged)


# The official code's colours for the 8 face classes (CelebAMaskDataset.color_map), used to read colour
# annotations of MetFaces-40 if they come as colours.
FACE8_COLOURS = ((0, 0, 0), (0, 0, 205), (132, 112, 255), (25, 25, 112), (187, 255, 255), (102, 205, 170),
                 (227, 207, 87), (142, 142, 56))


def convert_metfaces40(src, out, options):
    """MetFaces-40 (the SemanticGAN authors' 40 annotated portraits; out-of-domain faces): image/ and
    label/ (or masks/) with the same names, 8-class index maps or the official code's colours

    The Google Drive release of nv-tlabs/semanticGAN_code, which we have not seen: we expect the official
    code's label_data layout, an image folder (image or images) and a label folder (label, labels, mask or
    masks), labels 0..7 or colours of FACE8_COLOURS, turned into indices."""
    images, masks = folder_pairs(src, ("image", "images"), ("label", "labels", "mask", "masks"))
    layout = "SRC/image/NAME.png and SRC/label/NAME.png (8 classes)"
    return write_face_set(src, out, options, images, masks, ("MetFaces-40", "metfaces40", "label"), layout,
                          face8_from_annotation)


def face8_from_annotation(path):
    image = data.decode(data.open_image_file(path), path)
    if image.mode in ("RGB", "RGBA"):
        rgb = np.asarray(image)[..., :3].astype(np.int32)
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
            values = np.full(rgb.shape[:2], -1, np.int64)
            for index, colour in enumerate(FACE8_COLOURS):
                values[(rgb == colour).all(axis=-1)] = index
            if (values < 0).any():
                raise data.DataError(f"{path}: colours that are not among the 8 face-class colours; save an index "
                                     "map (value = class 0..7)")
            return values
    values = data.mask_values(image, path)
    if values.size and int(values.max()) >= len(data.FACE8_CLASSES):
        raise data.DataError(f"{path}: value {int(values.max())} is not one of the 8 face classes (0..7)")
    return values


# ----------------------------------------------------------------------------------------------------
# Chest X-rays: JSRT, Montgomery, Shenzhen, NIH, ChestX-ray14


def read_jsrt(path):
    """A JSRT .IMG: headerless big-endian 16-bit words holding 12-bit values, 2048 x 2048 (other square
    sizes are taken from the file length). JSRT stores X-ray attenuation the other way round from a usual
    display (high values are dark), so it is inverted: pixel = 4095 - value. Returns float32 0..4095."""
    raw = Path(path).read_bytes()
    side = int(round(math.sqrt(len(raw) / 2)))
    if side < 2 or side * side * 2 != len(raw):
        raise data.DataError(f"{path}: {len(raw)} bytes is not a square of 16-bit pixels (JSRT .IMG is 2048 x "
                             "2048 x 2 bytes); re-download it")
    values = np.frombuffer(raw, dtype=">u2").reshape(side, side).astype(np.float32)
    return 4095.0 - np.clip(values, 0, 4095)


def convert_jsrt(src, out, options):
    """JSRT (Shiraishi et al. 2000) with the SCR lung masks (van Ginneken et al. 2006): **/NAME.IMG (raw 12-bit)
    and **/left lung/NAME.gif, **/right lung/NAME.gif; lungs = class 1

    The .IMG is 2048 x 2048 (read_jsrt), the SCR masks one 1024 x 1024 GIF per lung (the fold1/ fold2/
    copies of SCR are both found). The lungs are merged; the image is averaged 2 x 2 onto the masks' grid and
    mapped linearly from 12 to 8 bits after the inversion. Without SCR masks the images are an unlabeled set."""
    images = {p.stem: p for p in find(src, lambda p: p.suffix.lower() == ".img")}
    lungs = {}
    for side in ("left lung", "right lung"):
        for path in find(src, lambda p: p.parent.name.lower() == side and p.suffix.lower() == ".gif"):
            lungs.setdefault(path.stem, {})[side] = path
    writer = datasets.DatasetWriter(out, options.size, options.fit)
    layout = "SRC/**/JPCLN001.IMG and SRC/**/left lung/JPCLN001.gif, SRC/**/right lung/JPCLN001.gif"
    pairs, no_mask, no_image = match_pairs(images, lungs, src, "JSRT .IMG", layout)

    def to_8bit(image_f):
        return Image.fromarray((np.asarray(image_f) * (255 / 4095) + 0.5).clip(0, 255).astype(np.uint8), "L")

    if pairs is None:
        for name in sorted(images):
            writer.image(name, to_8bit(Image.fromarray(read_jsrt(images[name]), "F")))
        return writer.summary("jsrt", " (no SCR masks found: an unlabeled set)")
    writer.classes(["background", "lung"])
    for name, image_path, files in pairs:
        if len(files) < 2:
            missing = "right" if "left lung" in files else "left"
            raise data.DataError(f"{next(iter(files.values()))}: no {missing}-lung mask of the same name; "
                                 "re-download SCR")
        left, right = (release_binary_mask(files[s], "jsrt", "lung") for s in ("left lung", "right lung"))
        mask, image = left | right, Image.fromarray(read_jsrt(image_path), "F")
        if image.size != (mask.shape[1], mask.shape[0]):  # average in float, before the 8-bit rounding
            image = image.resize((mask.shape[1], mask.shape[0]), Image.Resampling.BOX)
        writer.pair(name, to_8bit(image), mask)
    return writer.summary("jsrt", skipped_note(no_mask, no_image))


def convert_montgomery(src, out, options):
    """Montgomery County set (Jaeger et al. 2014): **/CXR_png/NAME.png and
    **/ManualMask/leftMask|rightMask/NAME.png; lungs = class 1

    Images are 4020 x 4892 or 4892 x 4020, masks the same size (0 / 255). Images keep their size and aspect
    (the loader's --fit squares them; --size here squares them at conversion)."""
    images = {p.stem: p for p in find(src, lambda p: p.parent.name == "CXR_png" and is_image_file(p))}
    sides = {}
    for side in ("leftMask", "rightMask"):
        for path in find(src, lambda p: p.parent.name == side and is_image_file(p)):
            sides.setdefault(path.stem, {})[side] = path

    def union(files):
        return np.logical_or.reduce([release_binary_mask(p, "montgomery", "lung") for p in files.values()])

    layout = "SRC/**/CXR_png/NAME.png and SRC/**/ManualMask/leftMask|rightMask/NAME.png"
    return write_binary_set(src, out, options, images, sides, "montgomery", layout, 1, "lung", union)


def convert_cxr_folders(name, layout_note):
    """Shenzhen and NIH: images and lung masks in folders, matched by name (NAME.png or NAME_mask.png)."""
    def convert(src, out, options):
        images, masks = folder_pairs(src, ("CXR_png", "images", "image", "img"),
                                     ("mask", "masks", "label", "labels", "ManualMask"), ("_mask",))
        return write_binary_set(src, out, options, images, masks, name, layout_note, 1, "lung")
    return convert


convert_shenzhen = convert_cxr_folders(
    "shenzhen", "SRC/**/CXR_png/CHNCXR_0001_0.png and SRC/**/mask/CHNCXR_0001_0_mask.png")
convert_shenzhen.__doc__ = """Shenzhen set (Jaeger et al. 2014) with the Kaggle lung masks (Stirenko et al.
    2018): **/CXR_png/NAME.png and **/mask/NAME_mask.png; lungs = class 1

    The original release has no lung masks; names with or without _mask in a mask/ or masks/ folder are
    matched. 566 of the 662 images have masks: the others are left out and counted."""

convert_nih = convert_cxr_folders("nih", "SRC/**/images/NAME.png and SRC/**/masks/NAME.png (or NAME_mask.png)")
convert_nih.__doc__ = """NIH chest X-rays with lung masks (Tang et al., XLSor, 2019): **/images/NAME.png and
    **/masks/NAME.png (or NAME_mask.png); lungs = class 1

    The ChestX-ray8 images XLSor annotated, the paper's NIH test set. We are not sure of that release's
    layout: the image folder may also be named image, img or CXR_png, the mask folder mask, label or labels."""


# ChestX-ray14's file names: patient number, underscore, follow-up number (00000001_000.png).
CHESTXRAY14_NAME = re.compile(r"\d{8}_\d{3}")


def convert_chestxray14(src, out, options):
    """ChestX-ray14 (Wang et al. 2017), the unlabeled X-ray pool: the PNGs of images_0XX.tar.gz
    (NNNNNNNN_NNN.png) anywhere under SRC; other PNGs are left out and counted

    Only those names are taken, since the pool takes every file it finds and a labeled folder's masks (or
    another set) must not slip into it; a colour one is refused. 1024 x 1024, written as 8-bit grey (a few
    are RGBA: alpha is dropped). No masks."""
    pngs = find(src, lambda p: p.suffix.lower() == ".png")
    if not pngs:
        raise data.DataError(f"{src}: no PNG images found; extract images_0XX.tar.gz under it first")
    named = [p for p in pngs if CHESTXRAY14_NAME.fullmatch(p.stem)]
    if not named:
        raise data.DataError(f"{pngs[0]}: not named like ChestX-ray14's NNNNNNNN_NNN.png (e.g. 00000001_000.png), "
                             f"nor is any of the {len(pngs)} PNGs under SRC; is this the ChestX-ray14 release?")
    images = {}
    for path in named:
        if path.stem in images:
            raise data.DataError(f"{path}: a second file named {path.name} (also {images[path.stem]}); remove one")
        images[path.stem] = path
    writer = datasets.DatasetWriter(out, options.size, options.fit)
    for name in sorted(images):
        writer.image(name, release_image(images[name], 1, "chestxray14"))
    others = len(pngs) - len(named)
    note = f"{others} PNGs not named like ChestX-ray14's NNNNNNNN_NNN.png" if others else ""
    return writer.summary("chestxray14", skipped_note(0, 0, note))


# ----------------------------------------------------------------------------------------------------
# Skin lesions: ISIC 2018, PH2, DermQuest, DermIS


def convert_isic2018(src, out, options):
    """ISIC 2018 task 1, lesion segmentation (Codella et al. 2019): **/ISIC_N.jpg and **/ISIC_N_segmentation.png;
    lesion = class 1

    As in ISIC2018_Task1-2_Training_Input/ and ISIC2018_Task1_Training_GroundTruth/ (masks 0 / 255); the
    validation and test folders work the same. Images keep their size; the loader's --fit squares them."""
    images = {p.stem: p for p in find(src, lambda p: re.fullmatch(r"ISIC_\d+", p.stem) is not None
                                      and p.suffix.lower() in (".jpg", ".jpeg", ".png"))}
    masks = {p.stem[:-len("_segmentation")]: p for p in find(src, lambda p: p.stem.endswith("_segmentation")
                                                          and p.suffix.lower() == ".png")}
    layout = "SRC/**/ISIC_NNNNNNN.jpg and SRC/**/ISIC_NNNNNNN_segmentation.png"
    return write_binary_set(src, out, options, images, masks, "isic2018", layout, 3, "lesion")


def convert_ph2(src, out, options):
    """PH2 (Mendonca et al. 2013): **/IMDn/IMDn_Dermoscopic_Image/IMDn.bmp and
    **/IMDn/IMDn_lesion/IMDn_lesion.bmp; lesion = class 1

    Masks are 0 / 255; the IMDn_roi colour-region masks are not used."""
    images = {p.stem: p for p in find(src, lambda p: p.parent.name.endswith("_Dermoscopic_Image") and is_image_file(p))}
    masks = {p.stem[:-len("_lesion")]: p for p in find(src, lambda p: p.parent.name.endswith("_lesion")
                                                       and p.stem.endswith("_lesion") and is_image_file(p))}
    layout = "SRC/**/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp and IMDxxx/IMDxxx_lesion/IMDxxx_lesion.bmp"
    return write_binary_set(src, out, options, images, masks, "ph2", layout, 3, "lesion")


def convert_waterloo(folder, subset, paper):
    """A part of the University of Waterloo skin-cancer set (images from DermIS and DermQuest with lesion masks)."""
    def convert(src, out, options):
        src = Path(src)
        found = find(src, lambda p: p.parent.name.lower() == folder and is_image_file(p))

        def key(path, suffix):  # melanoma/dermis/3_orig.jpg -> melanoma_3 (the class keeps names unique)
            parent = path.parent.parent.name if path.parent.parent != src else ""
            return "_".join(part for part in (parent, path.stem[:-len(suffix)]) if part)

        images = {key(p, "_orig"): p for p in found if p.stem.endswith("_orig")}
        masks = {key(p, "_contour"): p for p in found if p.stem.endswith("_contour")}
        layout = f"SRC/**/{folder}/N_orig.jpg and SRC/**/{folder}/N_contour.png"
        return write_binary_set(src, out, options, images, masks, folder, layout, 3, "lesion")
    convert.__doc__ = f"""University of Waterloo skin-cancer set (Amelard et al.), its {subset} part ("{paper}" in the
    paper): **/{folder}/N_orig.jpg and N_contour.png; lesion = class 1

    As we know it: SRC/**/{{melanoma,notmelanoma}}/{folder}/N_orig.jpg with the mask N_contour.png (0 / 255 or
    0 / 1) beside it; not sure of every copy's folder names, we take any folder named {folder} (any case).
    Names are CLASSFOLDER_N."""
    return convert


convert_dermquest = convert_waterloo("dermquest", "DermQuest", "Quest")
convert_dermis = convert_waterloo("dermis", "DermIS", "IS")


# ----------------------------------------------------------------------------------------------------
# Liver: LiTS (CT, NIfTI) and CHAOS (MRI, DICOM)


# Volumes are read with nibabel (NIfTI) and pydicom (DICOM), which follow the orientation in the headers: hospitals
# and scanners do not store it alike.

def optional_module(name, converter, install):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise data.DataError(f"`prepare.py {converter}` reads its files with {name}, which is not installed: "
                             f"pip install {install}") from None


def read_ras_volume(nibabel, path):
    """A NIfTI volume (NIfTI-1 or -2; .nii, .nii.gz or .hdr/.img) as float32 [X, Y, Z], scaled, in RAS+: whatever
    axes its qform/sform affine says it stores, voxel axes 0, 1, 2 then run towards the patient's Right,
    Anterior and Superior. This is `nibabel.as_closest_canonical` applied to the scaled float32 array, so an
    int16 CT is never held as float64."""
    try:
        image = nibabel.load(str(path))
        voxels = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:  # nibabel raises many kinds on a damaged file
        raise data.DataError(f"{path}: nibabel cannot read it ({data.one_line(error)}); re-download it") from None
    while voxels.ndim > 3 and voxels.shape[-1] == 1:
        voxels = voxels[..., 0]
    if voxels.ndim != 3:
        raise data.DataError(f"{path}: a {voxels.ndim}-D NIfTI of shape {voxels.shape}; expected a 3-D volume")
    to_ras = nibabel.orientations.io_orientation(image.affine)
    return nibabel.orientations.apply_orientation(voxels, to_ras)


def axial_slice(ras_voxels, z):
    """Axial slice z of an RAS+ volume as a radiologist views it, float32 [rows, columns]: anterior at the top,
    the patient's right on the left (an axial DICOM's layout, so CT slices face as CHAOS's MRI slices do)."""
    return np.ascontiguousarray(ras_voxels[::-1, ::-1, z].T)


def read_dicom_slice(pydicom, path):
    """One single-frame DICOM image (compressed too, where pydicom's decoder plugins are installed): (pixels
    float32 [rows, columns], modality rescale applied and MONOCHROME1 inverted, its ImageOrientationPatient,
    its position along the slice normal, its InstanceNumber), each of the last three None when absent."""
    try:
        dataset = pydicom.dcmread(str(path))
        pixels = pydicom.pixels.apply_modality_lut(dataset.pixel_array, dataset).astype(np.float32)
    except Exception as error:  # pydicom raises many kinds: damaged file, no decoder for the syntax, ...
        raise data.DataError(f"{path}: pydicom cannot read it ({data.one_line(error)}); a compressed file needs "
                             "`pip install pylibjpeg pylibjpeg-libjpeg`, else re-export it") from None
    if pixels.ndim != 2:
        raise data.DataError(f"{path}: DICOM pixel data of shape {pixels.shape}; only single-frame grey images "
                             "are read")
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        pixels = pixels.max() - pixels  # MONOCHROME1: high values are dark
    orientation = [float(v) for v in dataset.ImageOrientationPatient] if "ImageOrientationPatient" in dataset else None
    position = None
    if orientation is not None and "ImagePositionPatient" in dataset:
        normal = np.cross(orientation[:3], orientation[3:])
        normal *= np.sign(normal[np.abs(normal).argmax()])  # towards +z (superior) for an axial slice
        position = float(np.dot([float(v) for v in dataset.ImagePositionPatient], normal))
    instance = int(dataset.InstanceNumber) if dataset.get("InstanceNumber") not in (None, "") else None
    return pixels, orientation, position, instance


def dicom_to_display(pixels, orientation):
    """Flip or transpose a DICOM slice into the standard axial view, whatever its ImageOrientationPatient (the
    directions of its rows and columns in DICOM's LPS axes: x to the patient's Left, y to Posterior, z to
    Superior): columns run towards the patient's left (x) and rows towards posterior (y) for an axial slice,
    rows from head to feet for a coronal or sagittal one. Masks in the slice's pixel order get the same."""
    if orientation is None:
        return pixels
    along_row, along_column = np.array(orientation[:3]), np.array(orientation[3:])
    if np.abs(along_row).argmax() > np.abs(along_column).argmax():  # rows run along the earlier axis
        pixels, along_row, along_column = pixels.T, along_column, along_row
    if along_row[np.abs(along_row).argmax()] < 0:
        pixels = pixels[:, ::-1]
    column_axis = np.abs(along_column).argmax()
    if along_column[column_axis] * (-1 if column_axis == 2 else 1) < 0:
        pixels = pixels[::-1, :]
    return np.ascontiguousarray(pixels)


def window_to_8bit(values, low, high):
    return ((np.clip(values, low, high) - low) * (255.0 / (high - low)) + 0.5).astype(np.uint8)


def convert_lits(src, out, options):
    """LiTS (Bilic et al. 2019) CT volumes: **/volume-N.nii and **/segmentation-N.nii (NIfTI, read
    with nibabel), axial slices in a CT window (--window); liver (and tumour) = class 1

    Also .nii.gz or .hdr; segmentations hold 0 background, 1 liver, 2 tumour; **/test-volume-N.nii (no
    segmentation) is an unlabeled pool. LiTS gathers volumes from several hospitals, which do not store their
    axes alike: each volume and segmentation is turned into RAS+ (read_ras_volume) and its axial slices are
    written as a radiologist views them (axial_slice), so all slices, and CHAOS's, face the same way. Names
    are lits{N:03d}_z{z:04d}, z counted from the feet (patient_id() reads the patient back). --window
    defaults to level 40 width 400 HU (-160..240), linear to 0..255. The test volumes (or all volumes, when
    none has a segmentation) give all their slices as unlabeled images; volumes without a segmentation next
    to labeled ones are left out and counted."""
    volumes, segmentations, tests = {}, {}, {}
    for path in find(src, lambda p: p.name.lower().endswith((".nii", ".nii.gz", ".hdr"))):
        match = re.fullmatch(r"(test-)?(volume|segmentation)-(\d+)\.(nii|nii\.gz|hdr)", path.name.lower())
        if match:
            table = tests if match.group(1) else volumes if match.group(2) == "volume" else segmentations
            table[int(match.group(3))] = path
    if not volumes and not tests:
        raise data.DataError(f"{src}: no LiTS volumes found; expected SRC/**/volume-N.nii and segmentation-N.nii")
    nibabel = optional_module("nibabel", "lits", "nibabel")
    low, high = options.window
    writer = datasets.DatasetWriter(out, options.size, options.fit)
    labeled, empty = {n: p for n, p in volumes.items() if n in segmentations}, 0
    if labeled:
        writer.classes(["background", "liver"])
    for prefix, table in (("lits", labeled),) if labeled else (("lits", volumes), ("litstest", tests)):
        for number, path in sorted(table.items()):
            voxels = read_ras_volume(nibabel, path)
            labels = read_ras_volume(nibabel, segmentations[number]) if labeled else None
            if labeled and labels.shape != voxels.shape:
                raise data.DataError(f"{segmentations[number]}: shape {labels.shape} differs from its volume's "
                                     f"{voxels.shape} (both in RAS+ orientation); re-download it")
            for z in range(voxels.shape[2]):
                liver = None if labels is None else axial_slice(labels, z) > 0.5
                if liver is not None and not liver.any() and not options.all_slices:
                    empty += 1
                    continue
                name, image = f"{prefix}{number:03d}_z{z:04d}", window_to_8bit(axial_slice(voxels, z), low, high)
                if liver is None:
                    writer.image(name, Image.fromarray(image, "L"))
                else:
                    writer.pair(name, Image.fromarray(image, "L"), liver)
    if not labeled:
        return writer.summary("lits", " (no segmentations: an unlabeled set)")
    note = skipped_note(0, 0, f"{empty} slices without liver" if empty else "")
    missing = len(volumes) - len(labeled) + len(tests)
    note += f"; left out {missing} volumes without a segmentation" if missing else ""
    return writer.summary("lits", note)


def natural_key(path):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", Path(path).name)]


def percentile_to_8bit(series):
    """MRI has no physical unit: each series is mapped from its 0.5th to its 99.5th percentile."""
    low, high = np.percentile(np.stack(series), [0.5, 99.5])
    return [window_to_8bit(s, low, high if high > low else low + 1) for s in series]


def read_dicom_series(pydicom, files):
    """The slices of one DICOM series, [(pixels, orientation, position, instance, path)], in acquisition order
    (InstanceNumber, then file name: the order the CHAOS ground truth PNGs follow)."""
    slices = [read_dicom_slice(pydicom, f) + (f,) for f in files]
    return sorted(slices, key=lambda s: (s[3] if s[3] is not None else 0, natural_key(s[4])))


def anatomical_order(slices):
    """Indices of `slices` from the feet to the head (by ImagePositionPatient along the slice normal);
    acquisition order where a slice has no position."""
    if any(s[2] is None for s in slices):
        return list(range(len(slices)))
    return sorted(range(len(slices)), key=lambda k: slices[k][2])


def convert_chaos(src, out, options):
    """CHAOS (Kavur et al. 2021) MRI T1-DUAL: **/MR/N/T1DUAL/DICOM_anon/InPhase|OutPhase/*.dcm and
    **/MR/N/T1DUAL/Ground/*.png (DICOM, read with pydicom; --phase); liver = class 1

    Ground holds one PNG per slice, shared by both phases; its intensities (chaos.grand-challenge.org, "Data"):
    liver 63 (55..70), right kidney 126 (110..135), left kidney 189 (175..200), spleen 252 (240..255), all but
    the liver background here. A phase's slices are paired with the Ground PNGs in acquisition order
    (InstanceNumber, else file name, against the PNGs' names), and their counts must agree; we are not sure
    every copy numbers them alike, so check a few with `prepare.py show`. Each pair is then turned into the
    standard axial view (dicom_to_display) and numbered by its position along the slice normal from the feet
    up: chaos{N}-{in|out}_z{k:03d} (the phase is in the patient id: the paper scores T1-in and T1-out
    separately). Patients without Ground (the test set) are written as unlabeled images."""
    phases = {"in": "InPhase", "out": "OutPhase"}
    wanted = list(phases) if options.phase == "both" else [options.phase]
    series = find(src, lambda p: p.suffix.lower() == ".dcm" and p.parent.name in phases.values()
                  and p.parent.parent.name == "DICOM_anon")
    t1dual_folders = sorted({p.parent.parent.parent for p in series}, key=lambda f: natural_key(f.parent))
    if not t1dual_folders:
        raise data.DataError(f"{src}: no CHAOS T1DUAL DICOMs found; expected "
                             "SRC/**/MR/N/T1DUAL/DICOM_anon/InPhase/*.dcm")
    pydicom = optional_module("pydicom", "chaos", "'pydicom>=3'")
    labeled = [f for f in t1dual_folders if (f / "Ground").is_dir()]
    writer = datasets.DatasetWriter(out, options.size, options.fit)
    if labeled:
        writer.classes(["background", "liver"])
    empty = 0
    for t1dual in labeled or t1dual_folders:
        ground = sorted(find(t1dual / "Ground", is_image_file), key=natural_key) if labeled else []
        for phase in wanted:
            slices = read_dicom_series(pydicom, find(t1dual / "DICOM_anon" / phases[phase],
                                                     lambda p: p.suffix.lower() == ".dcm"))
            images = percentile_to_8bit([pixels for pixels, *_ in slices])
            name = f"chaos{t1dual.parent.name}-{phase}"
            if labeled and len(ground) != len(images):
                raise data.DataError(f"{t1dual / 'Ground'}: {len(ground)} ground-truth PNGs for {len(images)} "
                                     f"{phases[phase]} slices; the counts must agree (re-download this patient)")
            for k, index in enumerate(anatomical_order(slices)):
                orientation = slices[index][1]
                image = dicom_to_display(images[index], orientation)
                if not labeled:
                    writer.image(f"{name}_z{k:03d}", Image.fromarray(image, "L"))
                    continue
                values = data.load_mask(ground[index])
                if values.shape != images[index].shape:
                    raise data.DataError(f"{ground[index]}: {values.shape[1]}x{values.shape[0]} but its "
                                         f"{phases[phase]} slice is {images[index].shape[1]}x{images[index].shape[0]}; "
                                         "re-download this patient")
                liver = dicom_to_display((values >= 55) & (values <= 70), orientation)
                if not liver.any() and not options.all_slices:
                    empty += 1
                    continue
                writer.pair(f"{name}_z{k:03d}", Image.fromarray(image, "L"), liver)
    if not labeled:
        return writer.summary("chaos", " (no Ground folders: an unlabeled set)")
    note = skipped_note(0, 0, f"{empty} slices without liver" if empty else "")
    unlabeled = len(t1dual_folders) - len(labeled)
    note += f"; left out {unlabeled} patients without Ground" if unlabeled else ""
    return writer.summary("chaos", note)


# The names `python prepare.py NAME` takes, two of them aliases (nlm = montgomery, sz = shenzhen).
CONVERTERS = {
    "celebamask": convert_celebamask, "celebamask19": convert_celebamask19, "metfaces40": convert_metfaces40,
    "jsrt": convert_jsrt, "montgomery": convert_montgomery, "nlm": convert_montgomery,
    "shenzhen": convert_shenzhen, "sz": convert_shenzhen, "nih": convert_nih,
    "chestxray14": convert_chestxray14, "isic2018": convert_isic2018, "ph2": convert_ph2,
    "dermquest": convert_dermquest, "dermis": convert_dermis, "lits": convert_lits, "chaos": convert_chaos,
}


def releases_help():
    """The list that ends --help: each release's names and the first paragraph of its converter's docstring."""
    lines = []
    for convert_release in dict.fromkeys(CONVERTERS.values()):
        name, *aliases = [n for n, f in CONVERTERS.items() if f is convert_release]
        text = " ".join(convert_release.__doc__.split("\n\n")[0].split())
        text = f"(also {', '.join(aliases)}) {text}" if aliases else text
        lines.append(textwrap.fill(text, 110, initial_indent=f"  {name:<14}", subsequent_indent=" " * 16,
                                   break_on_hyphens=False))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The command


def check_out(src, out):
    """Refuse, before anything is written, an OUT whose files the writer would replace: SRC or a folder inside it,
    an OUT/images or OUT/masks that SRC lies in, an OUT that already holds a data set (the writer replaces files
    of the same name it did not create). Paths are compared resolved: a symlink to SRC is SRC."""
    if data.inside(out, src):
        raise data.DataError(f"{out}: OUT is SRC ({src}) or inside it; converting would write into the release: "
                             "pass an OUT outside SRC")
    for folder in ("images", "masks"):
        if data.inside(src, out / folder):
            raise data.DataError(f"{src}: SRC lies in {out / folder}, where the converter writes; pass an OUT "
                                 "elsewhere")
    if out.exists() and not out.is_dir():
        raise data.DataError(f"{out}: OUT is a file; pass a new or empty folder")
    datasets.refuse_a_data_set(out)


def convert(args):
    """Run the converter of release `args.name` on the folder `args.src`, writing `args.out`; print its summary."""
    src, out = Path(args.src), Path(args.out)
    if not src.is_dir():
        raise data.DataError(f"{src}: no such folder; pass the folder the {args.name} release was extracted to")
    check_out(src, out)
    print(CONVERTERS[args.name](src, out, args))


def parse_window(text):
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': give LOW,HIGH in HU, e.g. -160,240") from None
    if high <= low:
        raise argparse.ArgumentTypeError(f"'{text}': HIGH must be above LOW")
    return low, high


def build_parser():
    """`prepare.py NAME SRC OUT` for each release, and the data commands; every one a sub-command."""
    parser = cli.ArgumentParser(description=f"{__doc__}\n{releases_help()}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="NAME or COMMAND")
    for name in sorted(CONVERTERS):
        sub = commands.add_parser(name, help=f"convert the {name} release")
        sub.add_argument("src", help="the folder the release was extracted to")
        sub.add_argument("out", help="the folder to write (images/, masks/, classes.txt)")
        sub.add_argument("--size", type=cli.number(int, low=4), default=None, help="also square and resize to SIZE px")
        sub.add_argument("--fit", choices=data.FITS, default="pad", help="how --size squares (default pad)")
        sub.add_argument("--window", type=parse_window, default=(-160.0, 240.0),
                         help="lits: CT window in HU, --window=LOW,HIGH (default -160,240: level 40, width 400)")
        sub.add_argument("--all-slices", action="store_true", help="lits, chaos: keep slices without liver")
        sub.add_argument("--phase", choices=("in", "out", "both"), default="both", help="chaos: T1 phase")
        sub.set_defaults(run=convert, name=name)
    check = data.add_data_args(commands.add_parser("check", help="open every file of a data set, list every problem"))
    check.set_defaults(run=datasets.command_check)
    show = data.add_data_args(commands.add_parser("show", help="write a grid of images with their masks"))
    show.add_argument("--out", default="grid.png")
    show.add_argument("--count", type=cli.POSITIVE_INT, default=8, help="samples (default 8)")
    show.add_argument("--show-augmented", action="store_true", help="show augmented pairs")
    show.set_defaults(run=datasets.command_show)
    split = commands.add_parser("split", help="seeded train/val/test name lists of a labeled folder")
    split.add_argument("--data", required=True, help="a labeled folder")
    split.add_argument("--out", required=True, help="folder for train.txt, val.txt, test.txt")
    split.add_argument("--val", type=cli.FRACTION, default=0.1, help="fraction for val.txt (default 0.1)")
    split.add_argument("--test", type=cli.FRACTION, default=0.2, help="fraction for test.txt (default 0.2)")
    split.add_argument("--seed", type=cli.COUNT, default=0)
    split.add_argument("--skip-unpaired", action="store_true")
    split.set_defaults(run=datasets.command_split)
    demo = commands.add_parser("demo", help="write demo scenes as a labeled folder")
    demo.add_argument("out", help="the folder to write (images/, masks/, classes.txt)")
    demo.add_argument("--count", type=cli.POSITIVE_INT, default=100)
    demo.add_argument("--seed", type=cli.COUNT, default=1, help="scene seed (training uses 0; default 1: unseen)")
    demo.add_argument("--resolution", type=cli.number(int, low=4), default=256)
    demo.add_argument("--channels", type=int, choices=(1, 3), default=3)
    demo.add_argument("--num-classes", type=cli.number(int, low=2, high=data.MAX_CLASSES), default=4)
    demo.set_defaults(run=datasets.command_demo)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except data.DataError as error:
        print(f"error: {data.one_line(error)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
