"""invert.py with a tiny generator and encoder made here (untrained: the method's properties do not need a
good model): the loss falls, --steps 0 is the encoder alone, batches equal one image at a time, masks map
back to the input's geometry, the scores equal hand-computed ones, and bad input ends in one line."""
import csv
import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import invert
import losses
import model
import train_encoder

R = 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_bundle(path, fit="pad", num_classes=3, channels=3):
    torch.manual_seed(0)
    G = model.Generator(R, num_classes, channels, style_dim=32, n_mlp=2, max_channels=16)
    with torch.no_grad():  # noise that reaches the outputs (a new generator's strengths are 0), so that a
        for k, layer in enumerate(m for m in G.modules() if isinstance(m, model.NoiseInjection)):  # noise bug shows
            layer.strength.fill_(0.3 + 0.1 * k)
    E = model.Encoder(R, channels, 32, units=(1, 1, 1, 1), max_channels=16)
    E.latent_avg.copy_(G.mean_latent(256)[0])
    names = ["background"] + [f"part{c}" for c in range(1, losses.label_count(num_classes))]
    torch.save(train_encoder.make_bundle(G, E.eval(), fit, names, "random"), path)
    return str(path)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("model") / "model.pt")


def write_images(folder, count=3, size=(R, R), seed=0, masks=None):
    """Demo scenes as files (and their masks in `masks`), resized to `size`."""
    demo = data.DemoDataset(64, 3, 3, length=count, seed=seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        picture, mask = demo.render(i)
        Image.fromarray((picture * 255 + 0.5).astype(np.uint8)).resize(size).save(folder / f"scene{i}.png")
        if masks is not None:
            os.makedirs(masks, exist_ok=True)
            Image.fromarray(mask).resize(size, Image.NEAREST).save(masks / f"scene{i}.png")


def run(*argv):
    return invert.main([str(a) for a in argv])


def read_mask(path):
    return np.asarray(Image.open(path))


# ----------------------------------------------------------------------------------------------------
# The method


def test_the_reconstruction_loss_falls_over_the_steps(bundle, tmp_path):
    G, E, _ = model.load_bundle(bundle)
    with torch.no_grad():  # targets the generator can reach, away from where the encoder starts
        images, _ = G(G.mean_latent(64) + 0.8 * torch.randn(2, G.n_latent, 32), input_is_w=True)
    args = invert.build_parser().parse_args(["x", "--steps", "30"])
    autocast, _ = model.make_autocast(args, torch.device("cpu"))
    trace = []
    invert.invert(G, E, losses.Perceptual("random"), images, [1, 2], args, autocast, trace)
    first, last = trace[0], torch.stack(trace[-3:]).mean(0)
    assert (last < 0.7 * first).all(), (first, last)


def test_steps_0_is_the_encoder_alone(bundle, tmp_path):
    write_images(tmp_path / "in", count=2)
    run(tmp_path / "in", "--model", bundle, "--out", tmp_path / "out", "--steps", 0, "--seed", 3)
    G, E, _ = model.load_bundle(bundle)
    for i in range(2):
        item = invert.load_input(invert.Input(tmp_path / "in" / f"scene{i}.png", f"scene{i}"),
                                 {"resolution": R, "channels": 3, "fit": "pad"})
        noise = invert.make_noise(G, [invert.image_seed(3, f"scene{i}")], "cpu")
        with torch.no_grad():
            _, logits = G(E(item.image[None]), input_is_w=True, noise=noise)
        want = logits[0].argmax(0).to(torch.uint8).numpy()  # square input: no resampling
        np.testing.assert_array_equal(read_mask(tmp_path / "out" / f"scene{i}.png"), want)


def test_a_batch_gives_what_one_image_at_a_time_gives(bundle, tmp_path):
    write_images(tmp_path / "in", count=3)
    for batch in (1, 3):
        run(tmp_path / "in", "--model", bundle, "--out", tmp_path / f"b{batch}", "--steps", 6, "--batch", batch,
            "--save-reconstruction")
    for i in range(3):
        np.testing.assert_array_equal(read_mask(tmp_path / "b1" / f"scene{i}.png"),
                                      read_mask(tmp_path / "b3" / f"scene{i}.png"))
        a = read_mask(tmp_path / "b1" / f"scene{i}_recon.png").astype(int)
        b = read_mask(tmp_path / "b3" / f"scene{i}_recon.png").astype(int)
        assert np.abs(a - b).max() <= 1  # rounding of float differences in batched convolutions


@pytest.mark.parametrize("fit", ["pad", "crop", "stretch"])
def test_masks_map_back_to_the_input_geometry(fit):
    """A non-square class map fitted as data.py fits it and mapped back comes out where it was."""
    width, height = 48, 30
    truth = np.zeros((height, width), np.uint8)
    truth[4:20, 6:18] = 1     # a block on the left
    truth[10:28, 30:46] = 2   # one on the right
    square = data.fit_square(Image.fromarray(truth), R, fit, Image.Resampling.NEAREST)
    logits = torch.nn.functional.one_hot(torch.from_numpy(np.array(square)).long(), 3).permute(2, 0, 1) * 2.0 - 1
    back = invert.to_input_geometry(logits.float(), (width, height), fit)
    assert back.shape == (height, width)
    if fit == "crop":  # the centred 30 x 30 square; outside it: background
        left = (width - height) // 2
        inside = np.zeros_like(truth, bool)
        inside[:, left:left + height] = True
        assert (back[~inside] == 0).all()
        agree = (back == truth)[inside].mean()
    else:
        agree = (back == truth).mean()
    assert agree > 0.93, agree
    for c in (1, 2):  # the centre of each block is in place
        ys, xs = np.nonzero(truth == c)
        if fit != "crop" or c == 1:
            y, x = int(ys.mean()), int(xs.mean())
            assert back[y, x] == c or (fit == "crop" and not inside[y, x])


def test_a_non_square_input_gives_a_mask_of_its_own_size(bundle, tmp_path):
    write_images(tmp_path / "in", count=1, size=(50, 20))
    run(tmp_path / "in" / "scene0.png", "--model", bundle, "--out", tmp_path / "out", "--steps", 0)
    assert read_mask(tmp_path / "out" / "scene0.png").shape == (20, 50)
    assert np.asarray(Image.open(tmp_path / "out" / "scene0_overlay.png")).shape == (20, 50, 3)


# ----------------------------------------------------------------------------------------------------
# Scores


def test_scores_by_hand_with_empty_masks_absent_classes_and_patients():
    scores = losses.Scores(3)
    p = np.array([[1, 1], [0, 0]])
    t = np.array([[1, 0], [0, 0]])
    scores.add("A_z1", p, t)                            # class 1: 2*1/(2+1); class 2 absent in both: 1
    scores.add("A_z2", np.zeros((2, 2)), np.zeros((2, 2)))  # empty prediction of an empty truth: 1
    scores.add("B_z1", np.full((2, 2), 2), np.array([[2, 2], [1, 1]]))  # class 1: 0; class 2: 2*2/(4+2)
    row = scores.rows
    assert row["A_z1"][1][0] == pytest.approx(2 / 3) and row["A_z1"][1][1] == pytest.approx(1 / 2)
    assert row["A_z1"][2] == (1.0, 1.0) and row["A_z2"][1] == (1.0, 1.0)
    assert row["B_z1"][1] == (0.0, 0.0) and row["B_z1"][2][0] == pytest.approx(2 / 3)
    summary = scores.summary(["bg", "one", "two"])
    assert summary["dice"]["one"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert summary["dice"]["two"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    # per patient, volumetric: A class 1: 2*1/(2+1), class 2: nothing -> 1; B: class 1: 0, class 2: 2/3
    assert summary["patients"] == 2
    assert summary["dice_per_patient"] == pytest.approx(((2 / 3 + 1) / 2 + (0 + 2 / 3) / 2) / 2)
    # mIoU over the summed counts: class 0: I 2 (A_z1) + 4 (A_z2) = 6... computed independently here
    prediction = np.stack([p, np.zeros((2, 2)), np.full((2, 2), 2)]).astype(int)
    truth = np.stack([t, np.zeros((2, 2)), np.array([[2, 2], [1, 1]])]).astype(int)
    ious = [((prediction == c) & (truth == c)).sum() / ((prediction == c) | (truth == c)).sum() for c in range(3)]
    assert summary["miou"] == pytest.approx(np.mean(ious))


def test_eval_writes_the_table_csv_and_json(bundle, tmp_path, capsys):
    write_images(tmp_path / "in", count=2, masks=tmp_path / "truth" / "masks")
    run(tmp_path / "in", "--model", bundle, "--out", tmp_path / "out", "--steps", 2, "--eval", tmp_path / "truth")
    out = capsys.readouterr().out
    assert "mIoU" in out and "DICE 2 steps" in out and "DICE encoder" in out
    summary = json.load(open(tmp_path / "out" / "metrics.json"))
    assert summary["steps"] == 2 and summary["images"] == 2 and summary["model"] == bundle
    for kind in ("optimised", "encoder_only"):
        assert 0 <= summary[kind]["miou"] <= 1 and set(summary[kind]["dice"]) == {"part1", "part2"}
    rows = list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))
    assert [r["name"] for r in rows] == ["scene0", "scene1"]
    # the csv's numbers are those of the masks written
    truth = read_mask(tmp_path / "truth" / "masks" / "scene0.png")
    mine = read_mask(tmp_path / "out" / "scene0.png")
    dice, _ = losses.dice_jaccard(torch.tensor(mine)[None], torch.tensor(truth)[None], 1)
    assert float(rows[0]["dice_part1"]) == pytest.approx(dice.item(), abs=1e-6)


# ----------------------------------------------------------------------------------------------------
# Bad input, and what is already there


def one_error_line(capsys, *argv):
    with pytest.raises(SystemExit) as exit:
        run(*argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_bad_input_ends_in_one_line(bundle, tmp_path, capsys):
    write_images(tmp_path / "in", count=2)
    assert "nope.png" in one_error_line(capsys, tmp_path / "nope.png", "--model", bundle, "--steps", 0)
    os.makedirs(tmp_path / "empty")
    assert "no images" in one_error_line(capsys, tmp_path / "empty", "--model", bundle, "--steps", 0)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    line = one_error_line(capsys, tmp_path / "bad.png", "--model", bundle, "--out", tmp_path / "o1", "--steps", 0)
    assert "bad.png" in line and "not a readable image" in line
    torch.save({"G_ema": {}}, tmp_path / "stage1.pt")
    line = one_error_line(capsys, tmp_path / "in", "--model", tmp_path / "stage1.pt", "--steps", 0)
    assert "stage1.pt" in line and "not a model.pt" in line
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    assert "cannot be read" in one_error_line(capsys, tmp_path / "in", "--model", tmp_path / "garbage.pt")
    os.makedirs(tmp_path / "truth")
    line = one_error_line(capsys, tmp_path / "in", "--model", bundle, "--steps", 0, "--eval", tmp_path / "truth")
    assert "scene0" in line and "no ground-truth mask" in line


def test_split_keeps_the_named_images(bundle, tmp_path, capsys):
    write_images(tmp_path / "in", count=3)
    (tmp_path / "test.txt").write_text("scene2\nscene0.png\n")
    run(tmp_path / "in", "--split", tmp_path / "test.txt", "--model", bundle, "--out", tmp_path / "out", "--steps", 0)
    masks = sorted(p for p in os.listdir(tmp_path / "out") if p.endswith(".png") and "_" not in p)
    assert masks == ["scene0.png", "scene2.png"]
    (tmp_path / "bad.txt").write_text("scene9\n")
    line = one_error_line(capsys, tmp_path / "in", "--split", tmp_path / "bad.txt", "--model", bundle, "--steps", 0)
    assert "scene9" in line


def test_an_unreadable_file_among_many_is_skipped_unless_strict(bundle, tmp_path, capsys):
    write_images(tmp_path / "in", count=2)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG broken")
    run(tmp_path / "in", "--model", bundle, "--out", tmp_path / "out", "--steps", 0)
    captured = capsys.readouterr()
    assert "skipped 1 unreadable file" in captured.out and "broken.png" in captured.err
    assert sorted(p for p in os.listdir(tmp_path / "out") if p.endswith(".png") and "_" not in p) == \
        ["scene0.png", "scene1.png"]
    line = one_error_line(capsys, tmp_path / "in", "--model", bundle, "--out", tmp_path / "o2", "--steps", 0, "--strict")
    assert "broken.png" in line


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_an_earlier_run_is_replaced_whole_with_overwrite_and_never_a_file_it_did_not_write(bundle, tmp_path, capsys):
    write_images(tmp_path / "in" / "images", count=2, masks=tmp_path / "in" / "masks")
    out = tmp_path / "out"
    run(tmp_path / "in" / "images", "--model", bundle, "--out", out, "--steps", 0, "--eval", tmp_path / "in")
    first = listing(out)
    assert "metrics.json" in first and "written.jsonl" in first
    line = one_error_line(capsys, tmp_path / "in" / "images", "--model", bundle, "--out", out, "--steps", 0)
    assert "earlier run" in line and "--overwrite" in line
    assert listing(out) == first
    # with --overwrite the earlier run goes whole: no metrics.* of it beside the new report, no mask of an
    # image this run does not segment
    os.remove(tmp_path / "in" / "images" / "scene1.png")
    capsys.readouterr()
    run(tmp_path / "in" / "images", "--model", bundle, "--out", out, "--steps", 0, "--overwrite")
    assert "removed the earlier run's" in capsys.readouterr().out
    assert listing(out) == ["index.html", "scene0.png", "scene0_color.png", "scene0_overlay.png",
                            "segmentations.csv", "written.jsonl"]
    # a file this tool did not write is never replaced, --overwrite or not
    os.remove(out / "scene0_color.png")
    Image.fromarray(np.full((R, R), 7, np.uint8)).save(out / "scene0_color.png")  # the user's own file
    listed = (out / "written.jsonl").read_text().replace('"scene0_color.png"\n', "")
    (out / "written.jsonl").write_text(listed)
    line = one_error_line(capsys, tmp_path / "in" / "images", "--model", bundle, "--out", out, "--steps", 0,
                          "--overwrite")
    assert "scene0_color.png exists and was not written by invert.py" in line
    assert (read_mask(out / "scene0_color.png") == 7).all() and (out / "scene0.png").exists()


def test_an_out_that_is_or_holds_an_input_is_refused_whatever_the_flags(bundle, tmp_path, capsys):
    write_images(tmp_path / "in", count=2)
    before = {p: p.read_bytes() for p in (tmp_path / "in").iterdir()}
    for out in (tmp_path / "in", tmp_path):
        for flags in ([], ["--overwrite"]):
            line = one_error_line(capsys, tmp_path / "in", "--model", bundle, "--out", out, "--steps", 0, *flags)
            assert "inside --out" in line
    line = one_error_line(capsys, tmp_path / "in" / "scene0.png", "--model", bundle, "--out", tmp_path / "in",
                          "--steps", 0)
    assert "inside --out" in line
    write_images(tmp_path / "other", count=1)
    line = one_error_line(capsys, tmp_path / "other", "--model", bundle, "--eval", tmp_path / "in", "--out",
                          tmp_path / "in", "--steps", 0)
    assert "holds --eval" in line
    line = one_error_line(capsys, tmp_path / "other", "--model", bundle, "--out", Path(bundle).parent, "--steps", 0)
    assert "holds --model" in line
    (tmp_path / "a_file").write_text("x")
    assert "is a file" in one_error_line(capsys, tmp_path / "in", "--model", bundle, "--out", tmp_path / "a_file",
                                         "--steps", 0)
    assert {p: p.read_bytes() for p in (tmp_path / "in").iterdir()} == before


def test_an_out_inside_the_input_folder_is_not_read_as_input(bundle, tmp_path, capsys):
    write_images(tmp_path / "in" / "images", count=2, masks=tmp_path / "in" / "masks")
    for _ in range(2):
        run(tmp_path / "in" / "images", "--model", bundle, "--out", tmp_path / "in" / "images" / "seg", "--steps", 0,
            "--overwrite", "--eval", tmp_path / "in" / "masks")
        out = capsys.readouterr().out
        assert "semanticgan inversion: 2 images" in out
    assert len([p for p in listing(tmp_path / "in" / "images" / "seg") if p.endswith(".png")]) == 6
    run(str(tmp_path / "in" / "images" / "**" / "*.png"), "--model", bundle, "--out",
        tmp_path / "in" / "images" / "seg", "--steps", 0, "--overwrite")
    assert "semanticgan inversion: 2 images" in capsys.readouterr().out


def test_output_names_are_unique_per_input(bundle, tmp_path, capsys):
    folder = tmp_path / "in"
    write_images(folder, count=3)
    for k, name in enumerate(("scan", "scan_color", "scan_overlay")):
        os.replace(folder / f"scene{k}.png", folder / f"{name}.png")
    run(folder, "--model", bundle, "--out", tmp_path / "out", "--steps", 0, "--save-reconstruction")
    assert "keep the extension" in capsys.readouterr().out
    written = listing(tmp_path / "out")
    for name in ("scan", "scan_color", "scan_overlay"):  # every input: its own four files, none shared
        for suffix in ("", "_color", "_overlay", "_recon"):
            assert f"{name}.png{suffix}.png" in written
    # each mask is its own input's: the inputs differ, so their masks do
    masks = [read_mask(tmp_path / "out" / f"{name}.png.png") for name in ("scan", "scan_color", "scan_overlay")]
    direct = tmp_path / "single"
    run(folder / "scan_color.png", "--model", bundle, "--out", direct, "--steps", 0)
    assert np.array_equal(read_mask(direct / "scan_color.png"), masks[1])
    rows = list(csv.DictReader(open(tmp_path / "out" / "segmentations.csv")))
    assert sorted(r["name"] for r in rows) == ["scan.png", "scan_color.png", "scan_overlay.png"]


def test_without_model_the_newest_under_runs_is_used(bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "in", count=1)
    assert "no model.pt under runs/" in one_error_line(capsys, "in", "--steps", 0)
    for name, age in (("old", 100), ("new", 0)):
        os.makedirs(f"runs/{name}")
        target = f"runs/{name}/model.pt"
        with open(bundle, "rb") as src, open(target, "wb") as dst:
            dst.write(src.read())
        os.utime(target, (os.path.getmtime(bundle) - age,) * 2)
    run("in", "--steps", 0, "--out", "out")
    assert "using runs/new/model.pt" in capsys.readouterr().out
    run("in", "--model", "runs/old", "--steps", 0, "--out", "out_old")  # a run folder names its model.pt
    assert "model runs/old/model.pt" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# The objective and the optimisation, computed by hand


def parse(*argv):
    return invert.build_parser().parse_args(["x"] + [str(a) for a in argv])


def slow_noise_regularization(maps):
    """Per image: for each noise map and each level of its pyramid of 2x2 block means (down to 8 px), the
    squared mean of n(y, x) n(y, x - 1) plus that of n(y, x) n(y - 1, x), wrapping around, summed. Loops
    over pixels, in float64."""
    totals = []
    for b in range(maps[0].shape[0]):
        total = 0.0
        for n in maps:
            level = n[b, 0].detach().double().numpy()
            while True:
                size = level.shape[0]
                across = sum(level[y, x] * level[y, x - 1] for y in range(size) for x in range(size)) / size ** 2
                down = sum(level[y, x] * level[y - 1, x] for y in range(size) for x in range(size)) / size ** 2
                total += across ** 2 + down ** 2
                if size <= 8:
                    break
                level = level.reshape(size // 2, 2, size // 2, 2).mean((1, 3))
        totals.append(total)
    return torch.tensor(totals)


def test_noise_regularization_by_hand():
    torch.manual_seed(1)
    maps = [torch.randn(2, 1, r, r) for r in (4, 8, 16, 32)]
    maps[2][1] += torch.linspace(0, 3, 16)  # structure in one image's map: a large penalty, for that image only
    torch.testing.assert_close(invert.noise_regularization(maps).double(), slow_noise_regularization(maps),
                               rtol=1e-5, atol=1e-9)


def test_noise_maps_are_renormalised_per_image_and_map():
    torch.manual_seed(2)
    maps = [torch.randn(3, 1, 8, 8) * torch.tensor([0.5, 2.0, 4.0])[:, None, None, None] + 3 for _ in range(2)]
    invert.normalize_noise_(maps)
    for n in maps:
        for image in n.numpy():
            assert abs(image.mean()) < 1e-6 and image.std(ddof=1) == pytest.approx(1, abs=1e-5)


def test_learning_rate_ramps_up_and_down_as_the_official_schedule():
    lr = 0.1  # linear ramp-up over the first 5%, cosine ramp-down over the last 25%, 0 at the start
    expected = {0.0: 0.0, 0.025: 0.05, 0.05: 0.1, 0.5: 0.1, 0.75: 0.1, 0.875: 0.05, 1.0: 0.0,
                0.8125: 0.1 * (0.5 - 0.5 * math.cos(0.75 * math.pi))}
    for t, want in expected.items():
        assert invert.learning_rate(t, lr) == pytest.approx(want, abs=1e-12), t


def test_the_defaults_are_the_official_inference():
    args = parse()
    assert (args.steps, args.lr, args.mse_weight, args.encoder_weight, args.noise_weight) == (100, 0.1, 0.1, 1e-3, 100)


def hand_objective(G, E, percept, images, noise, w_plus, mse_weight, encoder_weight, noise_weight):
    """LPIPS + mse_weight MSE + encoder_weight mean((w+ - E(G_x))^2) + noise_weight NoiseReg, per image."""
    with torch.no_grad():
        reconstruction, _ = G(w_plus, input_is_w=True, noise=noise)
        lpips_value = percept(reconstruction, images)  # the lpips package's own forward
        mse = ((reconstruction - images) ** 2).mean((1, 2, 3))
        encoder_term = ((w_plus - E(reconstruction)) ** 2).mean((1, 2))
    terms = lpips_value, mse, encoder_term, slow_noise_regularization(noise).float()
    return lpips_value + mse_weight * mse + encoder_weight * encoder_term + noise_weight * terms[3], terms


def test_the_objective_by_hand_term_by_term_and_with_the_official_weights(bundle):
    G, E, _ = model.load_bundle(bundle)
    percept = losses.Perceptual("random")
    torch.manual_seed(3)
    images = torch.rand(2, 3, R, R) * 2 - 1  # far from anything G draws: every term is large
    seeds = [11, 12]
    autocast, _ = model.make_autocast(parse(), torch.device("cpu"))

    def first_step(mse_weight, encoder_weight, noise_weight):
        trace = []
        args = parse("--steps", 1, "--mse-weight", mse_weight, "--encoder-weight", encoder_weight,
                     "--noise-weight", noise_weight)
        invert.invert(G, E, percept, images, seeds, args, autocast, trace)
        return trace[0]

    with torch.no_grad():
        w_plus = E(images)
    noise = invert.make_noise(G, seeds, "cpu")
    total, (lpips_value, mse, encoder_term, noise_term) = hand_objective(G, E, percept, images, noise, w_plus,
                                                                         0.1, 1e-3, 100)
    assert (mse > 0.1).all() and (encoder_term > 1e-3).all() and (noise_term > 1e-5).all()  # none negligible
    torch.testing.assert_close(first_step(0, 0, 0), lpips_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first_step(1, 0, 0) - lpips_value, mse, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(first_step(0, 1, 0) - lpips_value, encoder_term, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(first_step(0, 0, 1) - lpips_value, noise_term, rtol=1e-3, atol=1e-7)
    defaults = parse()
    torch.testing.assert_close(first_step(defaults.mse_weight, defaults.encoder_weight, defaults.noise_weight), total,
                               rtol=1e-5, atol=1e-6)


def test_the_lpips_weight_scales_the_lpips_term_alone(bundle):
    G, E, _ = model.load_bundle(bundle)
    percept = losses.Perceptual("random")
    torch.manual_seed(3)
    images = torch.rand(2, 3, R, R) * 2 - 1
    autocast, _ = model.make_autocast(parse(), torch.device("cpu"))
    with torch.no_grad():
        w_plus = E(images)
    noise = invert.make_noise(G, [5, 6], "cpu")
    total, (lpips_value, mse, encoder_term, noise_term) = hand_objective(G, E, percept, images, noise, w_plus,
                                                                         0.1, 1e-3, 100)
    for lpips_weight in (0, 2.5):
        trace = []
        args = parse("--steps", 1, "--lpips-weight", lpips_weight)
        invert.invert(G, E, percept, images, [5, 6], args, autocast, trace)
        torch.testing.assert_close(trace[0], total + (lpips_weight - 1) * lpips_value, rtol=1e-5, atol=1e-6)


def reference_inversion(G, E, percept, image, seed, steps, optimize_noise=True):
    """The official inference loop for one image, written out: Adam (0.9, 0.999) on w+ and the noise maps,
    the learning rate set from the ramps before each step, the noise renormalised after it; w+ alone without
    optimize_noise."""
    w_plus = E(image).detach().clone().requires_grad_(True)
    noise = [n.clone().requires_grad_(optimize_noise) for n in invert.make_noise(G, [seed], "cpu")]
    optimizer = torch.optim.Adam([w_plus] + (noise if optimize_noise else []), lr=0.1, betas=(0.9, 0.999))
    for i in range(steps):
        t = i / steps
        down = 0.5 - 0.5 * math.cos(min(1.0, (1 - t) / 0.25) * math.pi)
        optimizer.param_groups[0]["lr"] = 0.1 * down * min(1.0, t / 0.05)
        reconstruction, _ = G(w_plus, input_is_w=True, noise=noise)
        loss = (percept(reconstruction, image).sum() + 0.1 * ((reconstruction - image) ** 2).mean()
                + 1e-3 * ((w_plus - E(reconstruction).detach()) ** 2).mean())
        for n in noise:  # NoiseReg, written with torch so that it has a gradient
            while True:
                loss = loss + (n * n.roll(1, 3)).mean() ** 2 * 100 + (n * n.roll(1, 2)).mean() ** 2 * 100
                if n.shape[2] <= 8:
                    break
                n = n.reshape(1, 1, n.shape[2] // 2, 2, n.shape[3] // 2, 2).mean((3, 5))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for n in noise if optimize_noise else []:
                n.sub_(n.mean()).div_(n.std())
    with torch.no_grad():
        return G(w_plus, input_is_w=True, noise=noise)[1]


def test_a_batch_inversion_follows_the_official_loop_for_each_image(bundle):
    G, E, _ = model.load_bundle(bundle)
    percept = losses.Perceptual("random")
    torch.manual_seed(4)
    with torch.no_grad():  # targets G can nearly reach, so that the optimisation has somewhere to go
        images, _ = G(G.mean_latent(64) + 0.8 * torch.randn(2, G.n_latent, 32), input_is_w=True)
    args = parse("--steps", 8)
    autocast, _ = model.make_autocast(args, torch.device("cpu"))
    result = invert.invert(G, E, percept, images, [21, 22], args, autocast)
    logits, encoder_logits = result.mask_logits, result.encoder_logits
    for k in range(2):
        want = reference_inversion(G, E, percept, images[k:k + 1], 21 + k, 8)[0]
        moved = (want - encoder_logits[k]).abs().max().item()
        # Adam normalises each coordinate's step, so float rounding in near-zero gradients grows over the steps
        # (the same image alone and in a batch differ by as much): a bound relative to how far the logits moved
        assert moved > 0.5 and (logits[k] - want).abs().max().item() < 0.02 * moved, k


def test_with_the_noise_fixed_only_w_plus_moves_as_in_the_loop_without_noise_in_the_optimiser(bundle):
    G, E, _ = model.load_bundle(bundle)
    percept = losses.Perceptual("random")
    torch.manual_seed(4)
    with torch.no_grad():
        images, _ = G(G.mean_latent(64) + 0.8 * torch.randn(2, G.n_latent, 32), input_is_w=True)
    args = parse("--steps", 8, "--no-optimize-noise")
    autocast, _ = model.make_autocast(args, torch.device("cpu"))
    result = invert.invert(G, E, percept, images, [21, 22], args, autocast)
    for k in range(2):
        want = reference_inversion(G, E, percept, images[k:k + 1], 21 + k, 8, optimize_noise=False)[0]
        optimised_noise = reference_inversion(G, E, percept, images[k:k + 1], 21 + k, 8)[0]
        moved = (want - result.encoder_logits[k]).abs().max().item()
        assert moved > 0.5 and (result.mask_logits[k] - want).abs().max().item() < 0.02 * moved, k
        assert (optimised_noise - want).abs().max().item() > 0.1 * moved, k  # fixing the noise matters


def test_a_mask_does_not_depend_on_its_batch_mates_nor_on_the_order_of_the_files(bundle, tmp_path):
    write_images(tmp_path / "in", count=3)
    files = [tmp_path / "in" / f"scene{i}.png" for i in range(3)]
    run(*files, "--model", bundle, "--out", tmp_path / "abc", "--steps", 4, "--batch", 3, "--save-reconstruction")
    run(files[2], files[1], files[0], "--model", bundle, "--out", tmp_path / "cba", "--steps", 4, "--batch", 2,
        "--save-reconstruction")  # batches [2, 1] and [0]: other batch-mates, another order
    for i in range(3):
        np.testing.assert_array_equal(read_mask(tmp_path / "abc" / f"scene{i}.png"),
                                      read_mask(tmp_path / "cba" / f"scene{i}.png"))
        a = read_mask(tmp_path / "abc" / f"scene{i}_recon.png").astype(int)
        b = read_mask(tmp_path / "cba" / f"scene{i}_recon.png").astype(int)
        assert np.abs(a - b).max() <= 1
    # and the noise does reach the outputs: another seed draws other noise, another reconstruction
    run(files[0], "--model", bundle, "--out", tmp_path / "seed1", "--steps", 4, "--seed", 1, "--save-reconstruction")
    a = read_mask(tmp_path / "abc" / "scene0_recon.png").astype(int)
    assert np.abs(a - read_mask(tmp_path / "seed1" / "scene0_recon.png").astype(int)).max() > 2


def test_the_encoder_only_scores_are_those_of_a_steps_0_run(bundle, tmp_path):
    write_images(tmp_path / "in", count=3, masks=tmp_path / "truth" / "masks")
    run(tmp_path / "in", "--model", bundle, "--out", tmp_path / "two", "--steps", 2, "--eval", tmp_path / "truth")
    run(tmp_path / "in", "--model", bundle, "--out", tmp_path / "zero", "--steps", 0, "--eval", tmp_path / "truth")
    both = json.load(open(tmp_path / "two" / "metrics.json"))
    alone = json.load(open(tmp_path / "zero" / "metrics.json"))
    assert "encoder_only" not in alone
    assert both["encoder_only"] == alone["optimised"]
    rows_two = list(csv.DictReader(open(tmp_path / "two" / "metrics.csv")))
    rows_zero = list(csv.DictReader(open(tmp_path / "zero" / "metrics.csv")))
    for a, b in zip(rows_two, rows_zero):
        assert a["encoder_dice_part1"] == b["dice_part1"] and a["encoder_jaccard_part2"] == b["jaccard_part2"]


# ----------------------------------------------------------------------------------------------------
# The geometry of the mask, pixel by pixel


def slow_to_input_geometry(logits, size, fit):
    """What to_input_geometry must compute, pixel by pixel in float64: where the pixel's centre falls in the
    fitted R x R square (data.fit_square pads and crops centred, (side - W) // 2 on the left), the logits
    there by bilinear interpolation between the four nearest sample centres (edges clamped), then the
    class: argmax, or logit > 0 for one channel. Outside a centre crop: background."""
    logits = logits.double().numpy()
    K, side_r = logits.shape[0], logits.shape[1]
    width, height = size
    out = np.zeros((height, width), np.uint8)

    def at(coordinate, extent):  # continuous sample coordinate of a pixel centre, clamped as bilinear does
        return max(0.0, (coordinate + 0.5) * side_r / extent - 0.5)

    for i in range(height):
        for j in range(width):
            if fit == "stretch" or width == height:
                x, y = at(j, width), at(i, height)
            elif fit == "pad":
                side = max(width, height)
                x, y = at(j + (side - width) // 2, side), at(i + (side - height) // 2, side)
            else:
                side = min(width, height)
                u, v = j - (width - side) // 2, i - (height - side) // 2
                if not (0 <= u < side and 0 <= v < side):
                    continue
                x, y = at(u, side), at(v, side)
            x0, y0 = min(int(x), side_r - 1), min(int(y), side_r - 1)
            x1, y1 = min(x0 + 1, side_r - 1), min(y0 + 1, side_r - 1)
            fx, fy = x - x0, y - y0
            value = ((1 - fy) * ((1 - fx) * logits[:, y0, x0] + fx * logits[:, y0, x1])
                     + fy * ((1 - fx) * logits[:, y1, x0] + fx * logits[:, y1, x1]))
            out[i, j] = (value[0] > 0) if K == 1 else value.argmax()
    return out


@pytest.mark.parametrize("fit", ["pad", "crop", "stretch"])
@pytest.mark.parametrize("size", [(30, 47), (47, 31), (33, 33), (7, 20)])
@pytest.mark.parametrize("classes", [3, 1])
def test_masks_map_back_pixel_by_pixel(fit, size, classes):
    """Portrait, landscape, odd and square sizes: the mapped-back mask equals the slow computation."""
    torch.manual_seed(sum(size) + classes)
    logits = torch.randn(classes, 16, 16) * 3
    fast = invert.to_input_geometry(logits, size, fit)
    slow = slow_to_input_geometry(logits, size, fit)
    assert fast.shape == slow.shape == (size[1], size[0])
    mismatched = fast != slow
    assert mismatched.mean() < 0.002, mismatched.mean()  # a float32 near-tie may flip a pixel, no more
    assert (fast == 0).any() and (fast > 0).any()


def test_masks_map_back_to_the_input_geometry_of_odd_and_portrait_images():
    """The round trip through data.fit_square for a portrait odd size: the blocks come back where they were."""
    for fit in ("pad", "crop", "stretch"):
        width, height = 31, 49
        truth = np.zeros((height, width), np.uint8)
        truth[5:25, 3:15] = 1
        truth[28:46, 16:29] = 2
        square = data.fit_square(Image.fromarray(truth), R, fit, Image.Resampling.NEAREST)
        logits = torch.nn.functional.one_hot(torch.from_numpy(np.array(square)).long(), 3).permute(2, 0, 1) * 2.0 - 1
        back = invert.to_input_geometry(logits.float(), (width, height), fit)
        if fit == "crop":  # the centred 31 x 31 square
            top = (height - width) // 2
            inside = np.zeros_like(truth, bool)
            inside[top:top + width] = True
            assert (back[~inside] == 0).all()
            assert (back == truth)[inside].mean() > 0.9
        else:
            assert (back == truth).mean() > 0.9


# ----------------------------------------------------------------------------------------------------
# Names: patients, files that differ only in their extension, other kinds of files


def test_patients_are_the_slices_named_patient_z_slice_only():
    assert data.patient_id("lits003_z0042") == "lits003" and data.patient_id("sub/chaos1-in_z007") == "chaos1-in"
    for name in ("ISIC_0000000", "MCUCXR_0001_0", "CHNCXR_0001_0", "scan", "a_zb"):
        assert data.patient_id(name) is None, name
    scores = losses.Scores(2)
    for name in ("ISIC_0000000", "ISIC_0000001", "MCUCXR_0001_0"):
        scores.add(name, np.array([[1, 0]]), np.array([[1, 1]]))
    summary = scores.summary(["bg", "lesion"])
    assert "dice_per_patient" not in summary and "patients" not in summary


def test_files_that_differ_only_in_their_extension_keep_it_and_webp_is_read(bundle, tmp_path, capsys):
    write_images(tmp_path / "in", count=2, masks=tmp_path / "truth" / "masks")
    Image.open(tmp_path / "in" / "scene0.png").save(tmp_path / "in" / "scene0.jpg", quality=95)
    Image.open(tmp_path / "in" / "scene1.png").save(tmp_path / "in" / "scene1.webp", lossless=True)
    os.remove(tmp_path / "in" / "scene1.png")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    run(tmp_path / "in", "--model", bundle, "--out", tmp_path / "out", "--steps", 0, "--eval", tmp_path / "truth")
    out = capsys.readouterr().out
    assert "scene0.jpg, scene0.png" in out and "notes.txt" in out
    written = sorted(p for p in os.listdir(tmp_path / "out") if p.endswith(".png") and "_" not in p)
    assert written == ["scene0.jpg.png", "scene0.png.png", "scene1.png"]
    rows = list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))
    assert sorted(r["name"] for r in rows) == ["scene0.jpg", "scene0.png", "scene1"]  # both scored on scene0's mask
    (tmp_path / "split.txt").write_text("scene0\n")
    run(tmp_path / "in", "--split", tmp_path / "split.txt", "--model", bundle, "--out", tmp_path / "o2", "--steps", 0)
    assert sorted(p for p in os.listdir(tmp_path / "o2") if p.endswith(".png") and "_" not in p) == \
        ["scene0.jpg.png", "scene0.png.png"]


# ----------------------------------------------------------------------------------------------------
# Names as they come: not UTF-8, long, spreadsheet formulas; a disk that fills up half way


def test_a_name_that_is_not_utf8_is_segmented_named_and_reported(bundle, tmp_path):
    """In a subprocess, with a UTF-8 locale: Python's stdout is then strict, as a user's terminal is."""
    write_images(tmp_path / "in", count=2)
    odd = os.fsdecode(b"lung_\xe9")
    os.replace(tmp_path / "in" / "scene1.png", tmp_path / "in" / f"{odd}.png")
    env = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": ""}
    env.pop("PYTHONUTF8", None)
    done = subprocess.run([sys.executable, "invert.py", str(tmp_path / "in"), "--model", bundle, "--out",
                           str(tmp_path / "out"), "--steps", "0", "--device", "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, errors="replace")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "done: 2 images" in done.stdout
    assert (tmp_path / "out" / f"{odd}.png").is_file()
    rows = list(csv.DictReader(open(tmp_path / "out" / "segmentations.csv", encoding="utf-8")))
    assert sorted(r["name"] for r in rows) == ["lung_\\xe9", "scene0"]
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert "lung_%E9.png" in page  # the link to the file, by its bytes


def test_an_output_name_longer_than_the_file_system_takes_is_refused_before_any_work(bundle, tmp_path, capsys):
    write_images(tmp_path / "in", count=2)
    long_stem = "x" * 248  # a legal name: 248 + ".png"; its overlay's name is not: 248 + "_overlay.png"
    os.replace(tmp_path / "in" / "scene1.png", tmp_path / "in" / f"{long_stem}.png")
    line = one_error_line(capsys, tmp_path / "in", "--model", bundle, "--out", tmp_path / "out", "--steps", 0)
    assert f"{long_stem}_overlay.png" in line and "shorter name" in line
    assert not (tmp_path / "out").exists() or listing(tmp_path / "out") in ([], ["written.jsonl"])


def test_a_write_that_fails_half_way_keeps_the_images_done_and_their_report(bundle, tmp_path, capsys, monkeypatch):
    write_images(tmp_path / "in", count=3)
    real_save = data.save_png

    def full_disk(pixels, path):
        if Path(path).name.startswith("scene2"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(pixels, path)

    monkeypatch.setattr(data, "save_png", full_disk)
    line = one_error_line(capsys, tmp_path / "in", "--model", bundle, "--out", tmp_path / "out", "--steps", 0,
                          "--batch", 1)
    assert "No space left on device" in line and "the 2 images before it are complete" in line
    rows = list(csv.DictReader(open(tmp_path / "out" / "segmentations.csv")))
    assert [r["name"] for r in rows] == ["scene0", "scene1"]
    assert (tmp_path / "out" / "scene1_overlay.png").is_file() and (tmp_path / "out" / "index.html").is_file()


def test_names_that_a_spreadsheet_would_run_as_formulas_are_written_as_text(bundle, tmp_path):
    images, masks = tmp_path / "in" / "images", tmp_path / "in" / "masks"
    write_images(images, count=4, masks=masks)
    names = ["=1+1", "+cmd", "-2", "@SUM(A1)"]
    for k, name in enumerate(names):
        for folder in (images, masks):
            os.replace(folder / f"scene{k}.png", folder / f"{name}.png")
    run(images, "--model", bundle, "--out", tmp_path / "out", "--steps", 0, "--eval", tmp_path / "in")
    for table in ("segmentations.csv", "metrics.csv"):
        cells = sorted(r["name"] for r in csv.DictReader(open(tmp_path / "out" / table)))
        assert cells == sorted("'" + n for n in names), table
