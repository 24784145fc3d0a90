"""data.py: the folder format, build_datasets and its options, augmentation, the demo set, the infinite
loader (determinism, resume, DDP shards), and one clear line for every kind of bad input.

Every test writes its own tiny data in tmp_path; nothing is downloaded, no GPU is used."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------
# Helpers


def save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = array if isinstance(array, Image.Image) else Image.fromarray(np.asarray(array))
    if mode is not None:
        image = image.convert(mode)
    image.save(path)
    return path


def pattern_mask(size, classes, shift=0, width=None):
    """Class stripes and blocks: value = (x // 4 + y // 4 + shift) % classes."""
    y, x = np.mgrid[0:size, 0:size if width is None else width]
    return ((x // 4 + y // 4 + shift) % classes).astype(np.uint8)


def make_labeled(root, count=4, size=12, classes=3, colour=True, prefix="img"):
    """A labeled folder whose image colour encodes the class: grey level 40 + 60 * class."""
    masks = {}
    for i in range(count):
        mask = pattern_mask(size, classes, shift=i)
        grey = (40 + 60 * mask).astype(np.uint8)
        image = np.stack([grey, grey // 2, 255 - grey], -1) if colour else grey
        save(root / "images" / f"{prefix}{i}.png", image)
        save(root / "masks" / f"{prefix}{i}.png", mask)
        masks[f"{prefix}{i}"] = mask
    return masks


def parse(argv):
    parser = argparse.ArgumentParser()
    data.add_data_args(parser)
    return parser.parse_args([str(a) for a in argv])


def run_main(capsys, argv, main=None):
    """main(argv), prepare.py's (the data commands) by default: (exit status, stdout, stderr)."""
    try:
        (main or prepare.main)([str(a) for a in argv])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_error_line(code, err, *must_contain):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for text in must_contain:
        assert str(text) in lines[0], (text, lines[0])


class Indexed(torch.utils.data.Dataset):
    """Returns the index it is asked for (to look at the sampler)."""

    def __init__(self, length):
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        return data.sample_key(key)[0]


# ----------------------------------------------------------------------------------------------------
# The folder format and build_datasets


def test_labeled_folder_gives_normalised_images_and_exact_masks(tmp_path):
    masks = make_labeled(tmp_path / "lab", count=3, size=12)
    labeled, unlabeled, info = data.build_datasets(parse(["--data", tmp_path / "lab", "--resolution", 12,
                                                          "--no-augment"]))
    assert (info["channels"], info["num_classes"], info["labeled_count"], info["unlabeled_count"]) == (3, 3, 3, 3)
    image, mask = labeled[1]
    assert image.dtype == torch.float32 and image.shape == (3, 12, 12)
    assert mask.dtype == torch.int64 and mask.shape == (12, 12)
    assert torch.equal(mask, torch.from_numpy(masks["img1"]).long())
    grey = torch.from_numpy(40 + 60 * masks["img1"].astype(np.float32))
    assert torch.allclose(image[0], grey / 127.5 - 1)  # [0, 255] -> [-1, 1]
    assert float(image.min()) >= -1 and float(image.max()) <= 1
    assert unlabeled[0].shape == (3, 12, 12)


def test_resize_keeps_masks_as_class_ids(tmp_path):
    make_labeled(tmp_path / "lab", count=2, size=32, classes=5)
    labeled, _, _ = data.build_datasets(parse(["--data", tmp_path / "lab", "--resolution", 8, "--no-augment"]))
    image, mask = labeled[0]
    assert image.shape == (3, 8, 8) and mask.shape == (8, 8)
    assert set(mask.unique().tolist()) <= set(range(5))
    # nearest: every output class is the class of a source pixel near the same place
    source = torch.from_numpy(pattern_mask(32, 5)).long()
    assert torch.equal(mask, source[2::4, 2::4])


@pytest.mark.parametrize("fit", ["pad", "crop", "stretch"])
def test_non_square_images_and_masks_get_the_same_fit(tmp_path, fit):
    mask = np.zeros((8, 16), np.uint8)
    mask[:, :4], mask[:, 12:] = 1, 2  # class 1 on the left quarter, 2 on the right quarter
    save(tmp_path / "lab/images/a.png", (mask * 100 + 50).astype(np.uint8))
    save(tmp_path / "lab/masks/a.png", mask)
    labeled, _, _ = data.build_datasets(parse(["--data", tmp_path / "lab", "--resolution", 16, "--fit", fit,
                                               "--no-augment", "--num-classes", 3]))
    image, out = labeled[0]
    if fit == "pad":  # 4 rows of background above and below, columns untouched
        assert torch.equal(out[:4], torch.zeros(4, 16, dtype=torch.long))
        assert torch.equal(out[4:12], torch.from_numpy(mask).long())
        assert torch.allclose(image[0, :4], torch.full((4, 16), -1.0))
    elif fit == "crop":  # the centre 8 x 8: no left or right quarter left
        assert set(out.unique().tolist()) == {0}
    else:  # stretched to 16 x 16: every row is the original row
        assert torch.equal(out, torch.from_numpy(mask).long().repeat_interleave(2, 0))


def test_unlabeled_pool_holds_every_image_recursively_and_the_labeled_ones(tmp_path):
    make_labeled(tmp_path / "lab", count=3, size=8)
    for i, name in enumerate(["a.png", "sub/b.jpg", "sub/deeper/c.bmp", "d.tif", "e.JPEG"]):
        save(tmp_path / "pool" / name, np.full((8, 8, 3), 30 * i, np.uint8))
    (tmp_path / "pool/notes.txt").write_text("not an image")
    labeled, unlabeled, info = data.build_datasets(parse(["--data", tmp_path / "pool", "--labeled-dir", tmp_path / "lab",
                                                          "--resolution", 8]))
    assert len(labeled) == 3 and len(unlabeled) == 8 and info["unlabeled_count"] == 8
    # a labeled folder inside the pool: its masks are not images, its images count once
    nested = parse(["--data", tmp_path, "--labeled-dir", tmp_path / "lab", "--resolution", 8])
    _, unlabeled, _ = data.build_datasets(nested)
    assert len(unlabeled) == 8 and not any("masks" in str(p) for p in unlabeled.paths)


def test_channels_are_inferred_from_the_images(tmp_path):
    make_labeled(tmp_path / "grey", colour=False)
    grey_as_rgb = tmp_path / "grey_rgb"
    save(grey_as_rgb / "x.jpg", np.repeat(np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 3, 3, 2))
    make_labeled(tmp_path / "colour", colour=True)
    assert data.build_datasets(parse(["--data", tmp_path / "grey"]))[2]["channels"] == 1
    assert data.build_datasets(parse(["--data", grey_as_rgb]))[2]["channels"] == 1
    assert data.build_datasets(parse(["--data", tmp_path / "colour"]))[2]["channels"] == 3
    labeled, _, info = data.build_datasets(parse(["--data", tmp_path / "grey", "--channels", 3, "--resolution", 12]))
    assert info["channels"] == 3 and labeled[0][0].shape == (3, 12, 12)


def test_number_of_classes_comes_from_option_map_classes_txt_or_masks(tmp_path):
    make_labeled(tmp_path / "lab", classes=4)
    folder = tmp_path / "lab"
    assert data.build_datasets(parse(["--data", folder]))[2]["num_classes"] == 4
    assert data.build_datasets(parse(["--data", folder, "--num-classes", 6]))[2]["num_classes"] == 6
    (folder / "classes.txt").write_text("bg\nred\ngreen\nblue\nspare\n")
    info = data.build_datasets(parse(["--data", folder]))[2]
    assert info["num_classes"] == 5 and info["class_names"] == ["bg", "red", "green", "blue", "spare"]
    info = data.build_datasets(parse(["--data", folder, "--class-map", "2:1,3:1"]))[2]
    assert info["num_classes"] == 2 and info["class_names"] is None


def test_class_maps_named_file_and_inline(tmp_path):
    mask = np.arange(19, dtype=np.uint8).reshape(1, 19).repeat(2, 0)
    save(tmp_path / "faces/images/f.png", np.zeros((2, 19, 3), np.uint8))
    save(tmp_path / "faces/masks/f.png", mask)
    labeled, _, info = data.build_datasets(parse(["--data", tmp_path / "faces", "--class-map", "celebamask19to8",
                                                  "--fit", "stretch", "--resolution", 19, "--no-augment"]))
    assert info["num_classes"] == 8 and info["class_names"] == list(data.FACE8_CLASSES)
    merged = labeled[0][1][0].tolist()  # the stretch repeats rows; columns map one to one
    assert merged == [data.CELEBAMASK19_TO_8[v] for v in range(19)]
    assert merged[13] == data.FACE8_CLASSES.index("hair") and merged[17] == data.FACE8_CLASSES.index("skin")
    assert merged[11] == merged[12] == merged[10] == data.FACE8_CLASSES.index("mouth")
    table_file = tmp_path / "map.txt"
    table_file.write_text("# merge everything above 9 into 2\n" + "".join(f"{v}: 2\n" for v in range(10, 19)))
    table, names = data.parse_class_map(str(table_file))
    assert table == {v: 2 for v in range(10, 19)} and names is None
    assert data.parse_class_map("255:1, 128:2")[0] == {255: 1, 128: 2}
    with pytest.raises(data.DataError, match="cannot read class-map entry"):
        data.parse_class_map("1:a")


def test_labels_picks_a_fixed_nested_subset_and_keeps_the_rest_unlabeled(tmp_path):
    make_labeled(tmp_path / "lab", count=12, size=8)

    def names(argv):
        labeled, unlabeled, _ = data.build_datasets(parse(["--data", tmp_path / "lab"] + argv))
        return [p.name for p in labeled.pairs], len(unlabeled)

    three, pool = names(["--num-labels", 3])
    assert len(three) == 3 and pool == 12
    assert names(["--num-labels", 3, "--seed", 99])[0] == three  # the training seed does not move it
    five = names(["--num-labels", 5])[0]
    assert set(three) <= set(five)
    assert names(["--num-labels", 3, "--labels-seed", 1])[0] != three
    no_labels = data.build_datasets(parse(["--data", tmp_path / "lab", "--num-labels", 0]))
    assert no_labels[0] is None and no_labels[2]["num_classes"] == 3  # still known from all the masks
    with pytest.raises(data.DataError, match="only 12 labeled pairs"):
        data.build_datasets(parse(["--data", tmp_path / "lab", "--num-labels", 13]))


# ----------------------------------------------------------------------------------------------------
# Augmentation


def test_augmentation_moves_image_and_mask_together():
    size = 32
    mask = ((np.mgrid[0:size, 0:size][1] // 8 + np.mgrid[0:size, 0:size][0] // 8) % 3 + 1).astype(np.uint8)
    mask[:, :5] = 0  # an asymmetric left band, so a flip shows
    image = Image.fromarray((40 + 60 * mask).astype(np.uint8), "L")
    augment = data.Augment()
    changed = 0
    for seed in range(12):
        out_image, out_mask = augment(image, Image.fromarray(mask, "L"), np.random.default_rng(seed))
        pixels, classes = np.asarray(out_image).astype(int), np.asarray(out_mask).astype(int)
        changed += not np.array_equal(classes, mask)
        # where the mask is one class over a 3 x 3 neighbourhood, the image has that class's grey level
        # (bilinear sampling inside a region of constant grey); class 0 may also be the black border fill
        padded = np.pad(classes, 1, constant_values=-1)  # the border reads the fill: never uniform
        window = np.stack([padded[dy:dy + size, dx:dx + size] for dy in range(3) for dx in range(3)])
        uniform = (window == classes).all(0)
        assert uniform.sum() > size * size // 3
        expected = 40 + 60 * classes
        good = np.abs(pixels - expected) <= 2
        good |= (classes == 0) & (pixels <= 42)
        assert good[uniform].all(), seed
    assert changed >= 6  # p = 0.75 that a sample is flipped or moved


def test_augmentation_flip_defaults_off_for_grey_and_on_for_rgb(tmp_path):
    make_labeled(tmp_path / "grey", colour=False)
    make_labeled(tmp_path / "rgb", colour=True)
    assert data.build_datasets(parse(["--data", tmp_path / "grey"]))[2]["flip"] is False
    assert data.build_datasets(parse(["--data", tmp_path / "rgb"]))[2]["flip"] is True
    assert data.build_datasets(parse(["--data", tmp_path / "grey", "--flip"]))[2]["flip"] is True
    assert data.build_datasets(parse(["--data", tmp_path / "rgb", "--no-flip"]))[2]["flip"] is False
    labeled = data.build_datasets(parse(["--data", tmp_path / "rgb"]), augment=False)[0]
    assert labeled.augment is None


@pytest.mark.parametrize("source", ["folder", "demo"])
def test_unlabeled_images_are_flipped_for_d_r_when_flips_are_on(tmp_path, source):
    """As the official RandomHorizontalFlip of unlabeled images: each sample either as it is or mirrored,
    both seen, decided by the sample's key; never with --no-flip, nor for evaluation (augment=False)."""
    if source == "folder":
        make_labeled(tmp_path / "rgb", count=2, colour=True)
        argv = ["--data", tmp_path / "rgb", "--resolution", 12]
    else:
        argv = ["--data", "demo", "--demo-length", 2, "--resolution", 16]
    unlabeled = data.build_datasets(parse(argv + ["--no-augment"]))[1]  # flips stay on without --augment
    plain = data.build_datasets(parse(argv + ["--no-flip"]))[1]
    evaluation = data.build_datasets(parse(argv), augment=False)[1]
    for index in range(2):
        original = plain[(index, (0, 0, index))]
        assert not torch.equal(original, original.flip(-1))  # a flip would show
        seen = []
        for epoch in range(16):
            key = (index, (0, epoch, index))
            image = unlabeled[key]
            assert torch.equal(image, unlabeled[key])  # the key decides
            assert torch.equal(image, original) or torch.equal(image, original.flip(-1))
            seen.append(torch.equal(image, original))
            assert torch.equal(plain[key], original) and torch.equal(evaluation[key], original)
        assert any(seen) and not all(seen)


def test_one_hot():
    mask = torch.tensor([[[0, 1], [2, 1]]])
    encoded = data.one_hot(mask, 3)
    assert encoded.shape == (1, 3, 2, 2) and encoded.dtype == torch.float32
    assert torch.equal(encoded.sum(1), torch.ones(1, 2, 2))
    assert torch.equal(encoded.argmax(1), mask)
    assert data.one_hot(mask[0], 3).shape == (3, 2, 2)
    with pytest.raises(ValueError):
        data.one_hot(mask, 2)


# ----------------------------------------------------------------------------------------------------
# The demo set


@pytest.mark.parametrize("channels", [1, 3])
def test_demo_is_deterministic_with_exact_masks_at_any_resolution(channels):
    demo = data.DemoDataset(resolution=40, channels=channels, num_classes=5, length=6, seed=3)
    image, mask = demo[2]
    again_image, again_mask = data.DemoDataset(40, channels, 5, 6, seed=3)[2]
    assert torch.equal(image, again_image) and torch.equal(mask, again_mask)
    assert not torch.equal(mask, demo[3][1])
    assert not torch.equal(mask, data.DemoDataset(40, channels, 5, 6, seed=4)[2][1])
    assert image.shape == (channels, 40, 40) and -1 <= float(image.min()) and float(image.max()) <= 1
    assert mask.dtype == torch.int64 and set(mask.unique().tolist()) <= set(range(5))
    # exact masks: every pixel of class c has the class's colour (up to shading, jitter and noise)
    pixels, _ = demo.render(2)
    classes = mask.numpy()
    for c in np.unique(classes):
        if c == 0:
            assert pixels[classes == 0].mean() < 0.4  # the dark background
            continue
        colour = demo.class_colour(c)
        ratio = pixels[classes == c].mean(0) / colour
        assert np.all((ratio > 0.7) & (ratio < 1.1)), (c, ratio)
    # the same scene at another resolution: nearest-downsampled masks agree almost everywhere
    big = data.DemoDataset(80, channels, 5, 6, seed=3)[2][1]
    assert (big[1::2, 1::2] == mask).float().mean() > 0.97
    odd = data.DemoDataset(17, channels, 5, 6, seed=3)[2]
    assert odd[0].shape == (channels, 17, 17)


def test_data_demo_builds_labeled_and_unlabeled_streams():
    labeled, unlabeled, info = data.build_datasets(parse(["--data", "demo", "--resolution", 16, "--channels", 1,
                                                          "--num-classes", 3, "--num-labels", 5, "--demo-length", 20]))
    assert (len(labeled), len(unlabeled), info["channels"], info["num_classes"]) == (5, 20, 1, 3)
    assert info["class_names"] == ["background", "ellipse", "rectangle"]
    assert info["flip"] is False
    # the labeled scenes are the pool's first scenes
    assert torch.equal(data.build_datasets(parse(["--data", "demo", "--resolution", 16, "--channels", 1,
                                                  "--num-classes", 3, "--no-augment"]))[0][4][0], unlabeled[4])
    batch = next(data.InfiniteLoader(labeled, 4, seed=0, workers=0))
    assert batch[0].shape == (4, 1, 16, 16) and batch[1].shape == (4, 16, 16)


# ----------------------------------------------------------------------------------------------------
# The infinite loader


def epoch_indices(loader, batches):
    return [next(loader).tolist() for _ in range(batches)]


def test_loader_covers_each_epoch_reshuffles_and_is_seeded():
    loader = data.InfiniteLoader(Indexed(10), 4, seed=5, workers=0)
    assert loader.batches_per_epoch == 2  # 10 // 4: the incomplete batch is dropped
    first, second = epoch_indices(loader, 2), epoch_indices(loader, 2)
    assert len(set(sum(first, []))) == 8 and len(set(sum(second, []))) == 8
    assert first != second  # epoch 1 is a new permutation (seed + epoch)
    assert epoch_indices(data.InfiniteLoader(Indexed(10), 4, seed=5, workers=0), 4) == first + second
    assert epoch_indices(data.InfiniteLoader(Indexed(10), 4, seed=6, workers=0), 2) != first
    # the permutation is DistributedSampler's for seed + epoch
    sampler = torch.utils.data.DistributedSampler(data.RangeLength(10), num_replicas=1, rank=0, seed=5,
                                                  drop_last=True)
    sampler.set_epoch(1)
    assert sum(second, []) == list(sampler)[:8]


def test_loader_shards_are_disjoint_across_ranks():
    ranks = [data.InfiniteLoader(Indexed(20), 3, seed=1, rank=r, world_size=2, workers=0) for r in range(2)]
    assert ranks[0].batches_per_epoch == 3  # 20 / 2 ranks = 10 each, 3 full batches of 3
    for epoch in range(2):
        seen = [set(sum(epoch_indices(loader, 3), [])) for loader in ranks]
        assert len(seen[0]) == len(seen[1]) == 9 and not seen[0] & seen[1]


def test_loader_repeats_a_data_set_smaller_than_a_batch():
    loader = data.InfiniteLoader(Indexed(3), 8, seed=0, workers=0)
    batch = next(loader).tolist()
    assert len(batch) == 8 and set(batch) == {0, 1, 2}


def test_resumed_loader_yields_the_batches_an_uninterrupted_one_would():
    demo = data.DemoDataset(16, 1, 3, length=10, seed=0, augment=data.Augment(flip=True))
    straight = data.InfiniteLoader(demo, 4, seed=3, workers=0)
    expected = [next(straight) for _ in range(9)]  # 2 batches per epoch: crosses 4 epoch boundaries
    first = data.InfiniteLoader(demo, 4, seed=3, workers=0)
    for _ in range(5):
        next(first)
    state = first.state_dict()
    assert state["epoch"] == 2 and state["batch"] == 1
    resumed = data.InfiniteLoader(demo, 4, seed=3, workers=2)  # other workers: the same stream
    resumed.load_state_dict(dict(state))
    for want in expected[5:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(data.DataError, match="batch size 4 and is resumed with 2.*--new-data"):
        data.InfiniteLoader(demo, 2, seed=3, workers=0).load_state_dict(state)


def test_augmentation_differs_between_epochs_of_the_same_sample():
    demo = data.DemoDataset(16, 3, 3, length=4, seed=0, augment=data.Augment())
    loader = data.InfiniteLoader(demo, 4, seed=0, workers=0)
    by_index = {}
    for _ in range(6):  # one batch per epoch; look at scene 0 in each
        images, masks = next(loader)
        for image, mask in zip(images, masks):
            by_index.setdefault(len(by_index) % 4, []).append(mask)
    versions = {tuple(m.flatten().tolist()) for m in sum(by_index.values(), [])}
    assert len(versions) > 8


def test_worker_errors_arrive_as_one_line(tmp_path):
    save(tmp_path / "pool/good.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "pool/bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    dataset = data.ImageFolder(data.list_images(tmp_path / "pool"), 8, 1)
    loader = data.InfiniteLoader(dataset, 2, seed=0, workers=1)
    with pytest.raises(data.DataError) as caught:
        next(loader)
    message = str(caught.value)
    assert "\n" not in message and "bad.png" in message and "Traceback" not in message


# ----------------------------------------------------------------------------------------------------
# Bad input: one line naming the file and what to do, exit status 2 (or handled, where that is wanted)


def check(capsys, folder, *extra):
    return run_main(capsys, ["check", "--data", folder, "--workers", 0, "--resolution", 8, *extra])


def test_missing_folder(capsys, tmp_path):
    assert_one_error_line(*check(capsys, tmp_path / "nowhere")[::2], "nowhere", "no such folder")


def test_empty_folder(capsys, tmp_path):
    (tmp_path / "empty/sub").mkdir(parents=True)
    assert_one_error_line(*check(capsys, tmp_path / "empty")[::2], "empty", "no images found")
    (tmp_path / "lab/images").mkdir(parents=True)
    (tmp_path / "lab/masks").mkdir()
    assert_one_error_line(*check(capsys, tmp_path / "lab")[::2], "lab", "no image files")


def test_image_without_mask(capsys, tmp_path):
    make_labeled(tmp_path / "lab", count=2, size=8)
    save(tmp_path / "lab/images/lonely.png", np.zeros((8, 8, 3), np.uint8))
    save(tmp_path / "lab/images/lonely2.png", np.zeros((8, 8, 3), np.uint8))
    assert_one_error_line(*check(capsys, tmp_path / "lab")[::2], "lonely.png", "has no mask",
                          "and 1 more", "--skip-unpaired")
    code, out, err = check(capsys, tmp_path / "lab", "--skip-unpaired")
    assert code == 0 and "left out 2 images without masks and 0 masks without images" in err
    assert "2 labeled pairs, 4 images in all" in out  # the unpaired images stay in the unlabeled pool


def test_mask_without_image(capsys, tmp_path):
    make_labeled(tmp_path / "lab", count=2, size=8)
    save(tmp_path / "lab/masks/orphan.png", np.zeros((8, 8), np.uint8))
    assert_one_error_line(*check(capsys, tmp_path / "lab")[::2], "orphan.png", "mask has no image")


def test_corrupt_image(capsys, tmp_path):
    make_labeled(tmp_path / "lab", count=2, size=8)
    (tmp_path / "lab/images/img1.png").write_bytes(b"these bytes are no picture")
    assert_one_error_line(*check(capsys, tmp_path / "lab", "--channels", 3)[::2], "img1.png", "not a readable image")


def test_truncated_image(capsys, tmp_path):
    make_labeled(tmp_path / "lab", count=2, size=64)
    path = tmp_path / "lab/images/img0.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    (tmp_path / "lab/images/img0.png").unlink()
    path.write_bytes(path.read_bytes()[:800])
    assert_one_error_line(*check(capsys, tmp_path / "lab", "--channels", 3)[::2], "img0.jpg", "truncated")
    # the same file met while picking the number of channels: the same line, at start-up
    assert_one_error_line(*check(capsys, tmp_path / "lab")[::2], "img0.jpg", "truncated")


def test_mask_of_another_size(capsys, tmp_path):
    make_labeled(tmp_path / "lab", count=2, size=8)
    save(tmp_path / "lab/masks/img1.png", np.zeros((6, 8), np.uint8))
    assert_one_error_line(*check(capsys, tmp_path / "lab")[::2], "img1.png", "mask is 8x6", "image",
                          "is 8x8")


def test_mask_values_beyond_the_classes(capsys, tmp_path):
    make_labeled(tmp_path / "lab", count=2, size=8, classes=2)
    save(tmp_path / "lab/masks/img1.png", pattern_mask(8, 3))
    assert_one_error_line(*check(capsys, tmp_path / "lab", "--num-classes", 2)[::2], "masks/img1.png",
                          "mask value 2 is not a class", "--num-classes")
    binary = tmp_path / "binary"
    save(binary / "images/a.png", np.zeros((8, 8), np.uint8))
    save(binary / "masks/a.png", np.where(np.eye(8) > 0, 255, 0).astype(np.uint8))
    assert_one_error_line(*check(capsys, binary)[::2], "binary", "--class-map 255:1")
    assert check(capsys, binary, "--class-map", "255:1")[0] == 0


def test_sixteen_bit_and_palette_masks_are_read_as_indices(capsys, tmp_path):
    folder = tmp_path / "lab"
    mask = pattern_mask(8, 3)
    save(folder / "images/a.png", np.zeros((8, 8), np.uint8))
    save(folder / "masks/a.png", mask.astype(np.uint16))  # a 16-bit PNG
    assert Image.open(folder / "masks/a.png").mode == "I;16"
    palette = Image.fromarray(mask, "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)  # colours unlike the indices
    save(folder / "images/b.png", np.zeros((8, 8), np.uint8))
    save(folder / "masks/b.png", palette)
    code, out, err = check(capsys, folder)
    assert code == 0 and "3 classes: 0 problems" in out
    labeled = data.build_datasets(parse(["--data", folder, "--resolution", 8, "--no-augment"]))[0]
    assert torch.equal(labeled[0][1], torch.from_numpy(mask).long())
    assert torch.equal(labeled[1][1], torch.from_numpy(mask).long())


def test_rgba_image_is_read_without_its_alpha(capsys, tmp_path):
    folder = tmp_path / "lab"
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red
    save(folder / "images/a.png", rgba)
    save(folder / "masks/a.png", np.ones((8, 8), np.uint8))
    assert check(capsys, folder)[0] == 0
    image = data.build_datasets(parse(["--data", folder, "--resolution", 8, "--no-augment"]))[0][0][0]
    assert image.shape == (3, 8, 8) and torch.allclose(image[0], torch.full((8, 8), 200 / 127.5 - 1))


def test_colour_and_jpeg_masks_are_refused(capsys, tmp_path):
    folder = tmp_path / "lab"
    save(folder / "images/a.png", np.zeros((8, 8), np.uint8))
    colours = np.zeros((8, 8, 3), np.uint8)
    colours[:4, :, 0] = 255
    save(folder / "masks/a.png", colours)
    assert_one_error_line(*check(capsys, folder, "--num-classes", 2)[::2], "a.png", "colour image", "indices")
    (folder / "masks/a.png").unlink()
    save(folder / "masks/a.jpg", np.zeros((8, 8), np.uint8))
    assert_one_error_line(*check(capsys, folder)[::2], "a.jpg", "lossless")


def test_cli_prints_one_line_without_traceback(tmp_path):
    """The real entry point, in a subprocess: a start-up error, and an error inside a DataLoader worker."""
    def cli(*argv):
        return subprocess.run([sys.executable, "prepare.py", *map(str, argv)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    result = cli("check", "--data", tmp_path / "missing")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "missing: no such folder" in result.stderr and "Traceback" not in result.stderr
    make_labeled(tmp_path / "lab", count=4, size=8)
    (tmp_path / "lab/masks/img2.png").write_bytes(b"\x89PNG\r\n\x1a\ncut short")
    result = cli("check", "--data", tmp_path / "lab", "--channels", 3, "--num-classes", 3, "--workers", 2,
                 "--resolution", 8)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "img2.png" in result.stderr


# ----------------------------------------------------------------------------------------------------
# show runs end to end


def test_patient_id():
    assert data.patient_id("lits012_z0045") == "lits012"
    assert data.patient_id("masks/chaos3-in_z010.png") == "chaos3-in"


def test_colour_mask_background_black_classes_distinct_and_cycling():
    mask = np.arange(40).reshape(4, 10)
    colours = data.colour_mask(mask)
    assert colours.shape == (4, 10, 3) and colours.dtype == np.uint8
    flat = colours.reshape(-1, 3)
    assert (flat[0] == 0).all()                                   # background
    assert len({tuple(c) for c in flat[1:20]}) == 19               # 19 distinct colours for classes 1..19
    assert not (flat[1:] == 0).all(axis=1).any()                  # no foreground class is black
    assert (flat[20:39] == flat[1:20]).all()                      # then they repeat, 20 after 19


# ----------------------------------------------------------------------------------------------------
# The commands never write over what is there




def test_overlay_lays_the_mask_colour_half_over_the_image_and_leaves_the_background():
    pixels = np.full((2, 3, 3), 100, np.uint8)
    classes = np.array([[0, 1, 2], [0, 0, 1]])
    blended = data.overlay(pixels, classes)
    colours = data.colour_mask(classes).astype(float)
    for y, x in np.ndindex(classes.shape):
        want = pixels[y, x] if classes[y, x] == 0 else ((100 + colours[y, x]) / 2).astype(np.uint8)
        assert np.array_equal(blended[y, x], want), (y, x)
