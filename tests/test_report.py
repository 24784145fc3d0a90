"""invert.py's trust signals per image (OUT/segmentations.csv), the flag calibrated on the held-out images that
train_encoder.py stores in model.pt, and the report (OUT/index.html), on a small model trained here on demo
scenes and a checkerboard, which a generator of smooth shapes cannot draw. Every number is recomputed here, from
the files written or from G and E directly; the report is parsed with the standard library's html.parser."""
import contextlib
import csv
import html.parser
import os
import urllib.parse

import numpy as np
import pytest
import torch
from PIL import Image

import data
import invert
import losses
import model
import prepare
import train_encoder
import train_gan
from report import SIGNALS

STAGE1 = ["--data", "demo", "--demo-length", "24", "--num-labels", "8", "--num-classes", "3", "--resolution", "32",
          "--max-channels", "16", "--style-dim", "32", "--n-mlp", "2", "--batch", "4", "--workers", "0",
          "--log-every", "1000", "--grid", "2", "--iter", "24"]
STAGE2 = ["--lpips", "random", "--batch", "4", "--encoder-units", "1,1,1,1", "--max-channels", "16", "--workers", "0",
          "--log-every", "1000", "--grid", "2", "--iter", "24", "--val-every", "24", "--own-samples", "0"]
SCENES = ["scene00000", "scene00001", "scene00002"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """model.pt of 24 steps of each stage (the two stages take about 25 s on 2 cores)."""
    root = tmp_path_factory.mktemp("trained")
    train_gan.main(STAGE1 + ["--out", str(root / "gan")])
    train_encoder.main(["--ckpt", str(root / "gan"), "--out", str(root / "encoder")] + STAGE2)
    return root


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    """Three demo scenes neither stage saw, and a black-and-white checkerboard of single pixels (its mask: all
    background)."""
    root = tmp_path_factory.mktemp("unseen")
    prepare.main(["demo", str(root), "--count", "3", "--resolution", "32", "--num-classes", "3", "--seed", "1"])
    board = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(np.stack([board] * 3, -1)).save(root / "images" / "checker.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "masks" / "checker.png")
    return root


def run(*argv):
    return invert.main([str(a) for a in argv])


def read_csv(path):
    return {row["name"]: row for row in csv.DictReader(open(path))}


def read_mask(path):
    return np.asarray(Image.open(path)).astype(np.int64)


def model_input(path, bundle):
    return invert.load_input(invert.Input(path, path.stem), bundle["preprocessing"]).image[None]


class Report(html.parser.HTMLParser):
    """The per-image rows of index.html ({name: {data-key: text}}, in page order), each row's classes and
    pictures, and every tag and link on the page."""

    def __init__(self, path):
        super().__init__()
        self.rows, self.order, self.classes, self.pictures, self.tags, self.links = {}, [], {}, {}, [], []
        self.row, self.key, self.text = None, None, ""
        self.feed(open(path, encoding="utf-8").read())

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.links += [attrs[a] for a in ("src", "href") if a in attrs]
        if tag == "tr" and "data-name" in attrs:
            self.row = attrs["data-name"]
            assert self.row not in self.rows, f"{self.row} appears twice"
            self.rows[self.row], self.classes[self.row], self.pictures[self.row] = {}, attrs.get("class", ""), []
            self.order.append(self.row)
        elif tag == "td" and self.row is not None and "data-key" in attrs:
            self.key, self.text = attrs["data-key"], ""
        elif tag == "img" and self.row is not None:
            self.pictures[self.row].append(attrs["src"])

    def handle_data(self, text):
        if self.key is not None:
            self.text += text

    def handle_endtag(self, tag):
        if tag == "td" and self.key is not None:
            self.rows[self.row][self.key] = self.text.strip()
            self.key = None
        elif tag == "tr":
            self.row = None


def by_hand_errors(reconstruction, image, percept):
    """(LPIPS, MSE) of one image, MSE as the mean of the squared differences over pixels and channels."""
    return percept(reconstruction, image).item(), ((reconstruction - image) ** 2).mean().item()


def by_hand_miou(a, b, labels):
    """The mIoU of two class maps over the classes either has."""
    either = [(a == c) | (b == c) for c in range(labels)]
    return float(np.mean([((a == c) & (b == c)).sum() / either[c].sum() for c in range(labels) if either[c].any()]))


# ----------------------------------------------------------------------------------------------------
# segmentations.csv and the flag


def test_the_signals_and_the_flag_recomputed_from_the_files_and_from_g_and_e(trained, unseen, tmp_path, capsys):
    model_pt = trained / "encoder" / "model.pt"
    run(unseen / "images", "--model", model_pt, "--steps", 3, "--eval", unseen, "--save-reconstruction",
        "--out", tmp_path / "three")
    printed = capsys.readouterr().out
    run(unseen / "images", "--model", model_pt, "--steps", 0, "--out", tmp_path / "zero")  # the encoder's masks
    rows = read_csv(tmp_path / "three" / "segmentations.csv")
    encoder_rows = read_csv(tmp_path / "zero" / "segmentations.csv")
    assert sorted(rows) == ["checker"] + SCENES
    assert list(rows["checker"])[:2] == ["name", "flagged"]

    G, E, bundle = model.load_bundle(str(model_pt))
    stored = bundle["labeled_errors"]
    assert stored["lpips_net"] == "random" and len(stored["lpips"]) == len(stored["mse"]) == 8  # --labels 8
    reference = max(stored["lpips"]), max(stored["mse"])
    percept = losses.Perceptual("random")
    for name, row in rows.items():
        image = model_input(unseen / "images" / f"{name}.png", bundle)
        # the encoder's errors: G_x(E(x)) with the image's own noise maps, as invert.py draws them
        noise = invert.make_noise(G, [invert.image_seed(0, name)], "cpu")
        with torch.no_grad():
            reconstruction = G(E(image), input_is_w=True, noise=noise)[0].clamp(-1, 1)  # the picture it shows
            encoder_lpips, encoder_mse = by_hand_errors(reconstruction, image, percept)
        assert float(row["encoder_mse"]) == pytest.approx(encoder_mse, rel=1e-4)
        assert float(row["encoder_lpips"]) == pytest.approx(encoder_lpips, rel=1e-4)
        # the final errors: from the reconstruction written (rounded to 8 bits)
        written = data.image_to_tensor(Image.open(tmp_path / "three" / f"{name}_recon.png"))[None]
        final_lpips, final_mse = by_hand_errors(written, image, percept)
        assert float(row["mse"]) == pytest.approx(final_mse, abs=2e-3)
        assert float(row["lpips"]) == pytest.approx(final_lpips, abs=5e-3)
        # --steps 0: the encoder's reconstruction is the final one, and the masks agree with themselves
        assert float(encoder_rows[name]["lpips"]) == pytest.approx(encoder_lpips, rel=1e-4)
        assert float(encoder_rows[name]["agreement_miou"]) == 1
        # error_ratio: the larger of the two ratios to the labeled images' largest
        ratio = max(encoder_lpips / reference[0], encoder_mse / reference[1])
        assert float(row["error_ratio"]) == pytest.approx(ratio, rel=1e-4)
        # agreement and areas: from the masks written (at the model's 32 px, as the agreement is taken)
        optimised, encoder = read_mask(tmp_path / "three" / f"{name}.png"), read_mask(tmp_path / "zero" / f"{name}.png")
        assert float(row["agreement_miou"]) == pytest.approx(by_hand_miou(optimised, encoder, 3), abs=1e-6)
        for c, part in ((1, "ellipse"), (2, "rectangle")):
            assert float(row[f"area_{part}"]) == pytest.approx((optimised == c).mean(), abs=1e-6)
    # out of the generator's reach, and in it
    assert float(rows["checker"]["error_ratio"]) > 2 and all(float(rows[s]["error_ratio"]) < 1.3 for s in SCENES)

    # the flag: agreement below the least agreement of the 8 held-out images (validation pairs) inverted as this
    # run inverts them, by hand from G and E
    held_out = bundle["flag_images"]
    assert held_out["source"] == "the validation pairs" and held_out["images"].shape == (8, 3, 32, 32)
    images = held_out["images"].float() / 127.5 - 1
    args = invert.build_parser().parse_args(["x", "--steps", "3"])
    limit = 1.0
    for i, image in enumerate(images):
        result = invert.invert(G, E, percept, image[None], [invert.image_seed(0, f"held-out image {i}")], args,
                               contextlib.nullcontext)
        final, first = (model.mask_classes(logits)[0].numpy() for logits in (result.mask_logits, result.encoder_logits))
        limit = min(limit, by_hand_miou(final, first, 3))
    assert f"agreement mIoU of {limit:.4f} at the most" in printed
    flagged = [name for name, row in rows.items() if float(row["agreement_miou"]) < limit]
    assert all(row["flagged"] == ("1" if name in flagged else "0") for name, row in rows.items())
    assert f"flagged: {len(flagged)} of 4 images" in printed and f"below {limit:.4f}" in printed


def test_the_labeled_images_are_measured_as_invert_measures_a_new_image(trained, tmp_path):
    """The labeled training images, written to files and run through invert.py: their error ratios are at most
    1 (up to the 8-bit rounding and the noise maps, which stage 2 takes from G and invert.py draws per image),
    and the largest is 1: both measure the same quantity."""
    args, _ = train_encoder.parse_args(["--ckpt", str(trained / "gan")] + STAGE2)
    labeled, _, _ = data.build_datasets(args, augment=False)
    os.makedirs(tmp_path / "labeled")
    for i in range(len(labeled)):
        Image.fromarray(data.image_to_uint8(labeled[i][0])).save(tmp_path / "labeled" / f"pair{i}.png")
    run(tmp_path / "labeled", "--model", trained / "encoder" / "model.pt", "--steps", 0, "--out", tmp_path / "out")
    ratios = [float(r["error_ratio"]) for r in read_csv(tmp_path / "out" / "segmentations.csv").values()]
    assert len(ratios) == 8 and max(ratios) == pytest.approx(1, abs=0.05), ratios


def test_without_held_out_images_or_with_steps_0_nothing_is_flagged_with_one_note(trained, unseen, tmp_path, capsys):
    bundle = torch.load(trained / "encoder" / "model.pt", weights_only=True)
    torch.save({k: v for k, v in bundle.items() if k != "flag_images"}, tmp_path / "old.pt")
    for name, steps, why in (("old", 2, "holds no held-out images to calibrate the flag on"),
                             ("zero", 0, "--steps 0 leaves the encoder's masks as they are")):
        model_pt = tmp_path / "old.pt" if name == "old" else trained / "encoder" / "model.pt"
        run(unseen / "images", "--model", model_pt, "--steps", steps, "--out", tmp_path / name)
        printed = capsys.readouterr().out
        notes = [line for line in printed.splitlines() if line.startswith("note:")]
        assert len(notes) == 1 and why in notes[0] and notes[0].endswith("no image is flagged"), notes
        assert "flagged:" not in printed and "flag: calibrated" not in printed
        rows, report = read_csv(tmp_path / name / "segmentations.csv"), Report(tmp_path / name / "index.html")
        assert all(r["flagged"] == "" and r["error_ratio"] != "" for r in rows.values())
        assert all(r["flagged"] == "" for r in report.rows.values())


def test_another_lpips_network_leaves_error_ratio_empty_and_without_eval_the_flagged_come_first(trained, unseen,
                                                                                                 tmp_path):
    bundle = torch.load(trained / "encoder" / "model.pt", weights_only=True)
    scenes = torch.stack([torch.from_numpy(np.array(Image.open(unseen / "images" / f"{s}.png"))).permute(2, 0, 1)
                          for s in SCENES])  # held-out images the checkerboard is not like
    other = dict(bundle, labeled_errors=dict(bundle["labeled_errors"], lpips_net="alex"),
                 flag_images={"images": scenes, "source": "three scenes"})
    torch.save(other, tmp_path / "other.pt")
    run(unseen / "images", "--model", tmp_path / "other.pt", "--steps", 2, "--out", tmp_path / "out")
    rows, report = read_csv(tmp_path / "out" / "segmentations.csv"), Report(tmp_path / "out" / "index.html")
    assert all(r["error_ratio"] == "" and r["flagged"] in ("0", "1") for r in rows.values())
    agreements = [float(rows[n]["agreement_miou"]) for n in report.order]
    assert agreements == sorted(agreements)  # the lowest agreement, the flag's signal, first
    assert [("flagged" in report.classes[n]) for n in report.order] == [rows[n]["flagged"] == "1" for n in report.order]


# ----------------------------------------------------------------------------------------------------
# The report


def test_the_report_shows_every_image_once_with_its_numbers_worst_first(trained, unseen, tmp_path):
    model_pt = trained / "encoder" / "model.pt"
    out = tmp_path / "with eval"  # a space: the links must be quoted
    run(unseen / "images", "--model", model_pt, "--steps", 2, "--eval", unseen, "--save-reconstruction", "--out", out)
    report, rows = Report(out / "index.html"), read_csv(out / "segmentations.csv")
    scores = read_csv(out / "metrics.csv")
    assert sorted(report.rows) == sorted(rows) == ["checker"] + SCENES
    for name, cells in report.rows.items():
        assert cells["name"] == name
        for key in SIGNALS + ("area_ellipse", "area_rectangle"):
            assert float(cells[key]) == pytest.approx(float(rows[name][key]), abs=6e-5), (name, key)
        for key in ("dice_ellipse", "dice_rectangle", "encoder_dice_ellipse", "encoder_dice_rectangle"):
            assert float(cells[key]) == pytest.approx(float(scores[name][key]), abs=6e-5), (name, key)
        assert cells["flagged"] == {"1": "yes", "0": "no"}[rows[name]["flagged"]]
        assert ("flagged" in report.classes[name]) == (rows[name]["flagged"] == "1")
        # input | overlay | reconstruction, linked relative to the page, each an existing file
        pictures = [os.path.normpath(out / urllib.parse.unquote(src)) for src in report.pictures[name]]
        want = (unseen / "images" / f"{name}.png", out / f"{name}_overlay.png", out / f"{name}_recon.png")
        assert pictures == [os.path.normpath(p) for p in want]
        assert all(os.path.isfile(p) for p in pictures)
    # worst first: the inverted masks' mean DICE, lowest first
    mean_dice = [np.mean([float(scores[n]["dice_ellipse"]), float(scores[n]["dice_rectangle"])]) for n in report.order]
    assert mean_dice == sorted(mean_dice)
    # self-contained: no script, nothing from the network
    assert "script" not in report.tags and not any(link.startswith(("http:", "https:", "//")) for link in report.links)
    page = open(out / "index.html", encoding="utf-8").read()
    flagged = sum(row["flagged"] == "1" for row in rows.values())
    assert f"flagged: {flagged} of 4 images" in page and "mIoU" in page and "--save-reconstruction" in page


def test_without_eval_the_report_puts_the_highest_error_ratio_first_and_escapes_names(trained, unseen, tmp_path):
    os.makedirs(tmp_path / "in")
    for name in SCENES + ["checker"]:
        Image.open(unseen / "images" / f"{name}.png").save(tmp_path / "in" / f"{name}.png")
    odd = "<b>&'x #1 %"  # markup in a name, and what a URL must quote
    Image.open(unseen / "images" / "scene00000.png").save(tmp_path / "in" / f"{odd}.png")
    run(tmp_path / "in", "--model", trained / "encoder" / "model.pt", "--steps", 0, "--out", tmp_path / "out")
    report, rows = Report(tmp_path / "out" / "index.html"), read_csv(tmp_path / "out" / "segmentations.csv")
    assert report.order[0] == "checker" and odd in report.rows
    for src in report.pictures[odd]:
        assert not set(" #<>'&") & set(src) and (tmp_path / "out" / urllib.parse.unquote(src)).is_file(), src
    ratios = [float(rows[n]["error_ratio"]) for n in report.order]
    assert ratios == sorted(ratios, reverse=True)
    assert "<b>" not in open(tmp_path / "out" / "index.html", encoding="utf-8").read()
    assert not (tmp_path / "out" / "metrics.csv").exists() and "dice_ellipse" not in report.rows["checker"]
