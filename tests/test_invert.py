"""invert.py with a tiny generator and encoder made here (untrained: the method's properties do not need a
good model): the loss falls, --steps 0 is the encoder alone, batches equal one image at a time, masks map
back to the input's geometry, the scores equal hand-computed ones, and bad input ends in one line."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import invert
import losses
import model
import train_encoder
import train_gan

R = 32


def tiny_bundle(path, fit="pad", num_classes=3, channels=3):
    torch.manual_seed(0)
    G = model.Generator(R, num_classes, channels, style_dim=32, n_mlp=2, max_channels=16)
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
    G, E, _ = train_encoder.load_bundle(bundle)
    with torch.no_grad():  # targets the generator can reach, away from where the encoder starts
        images, _ = G(G.mean_latent(64) + 0.8 * torch.randn(2, G.n_latent, 32), input_is_w=True)
    args = invert.build_parser().parse_args(["x", "--steps", "30"])
    autocast, _ = train_gan.make_autocast(args, torch.device("cpu"))
    trace = []
    invert.invert(G, E, losses.Perceptual("random"), images, [1, 2], args, autocast, trace)
    first, last = trace[0], torch.stack(trace[-3:]).mean(0)
    assert (last < 0.7 * first).all(), (first, last)


def test_steps_0_is_the_encoder_alone(bundle, tmp_path):
    write_images(tmp_path / "in", count=2)
    run(tmp_path / "in", "--model", bundle, "--out", tmp_path / "out", "--steps", 0, "--seed", 3)
    G, E, _ = train_encoder.load_bundle(bundle)
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
    scores = invert.Scores(3)
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
    assert sorted(p for p in os.listdir(tmp_path / "out") if "_" not in p) == ["scene0.png", "scene2.png"]
    (tmp_path / "bad.txt").write_text("scene9\n")
    line = one_error_line(capsys, tmp_path / "in", "--split", tmp_path / "bad.txt", "--model", bundle, "--steps", 0)
    assert "scene9" in line


def test_an_unreadable_file_among_many_is_skipped_unless_strict(bundle, tmp_path, capsys):
    write_images(tmp_path / "in", count=2)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG broken")
    run(tmp_path / "in", "--model", bundle, "--out", tmp_path / "out", "--steps", 0)
    captured = capsys.readouterr()
    assert "skipped 1 unreadable file" in captured.out and "broken.png" in captured.err
    assert sorted(p for p in os.listdir(tmp_path / "out") if not p.endswith(("_color.png", "_overlay.png"))) == \
        ["scene0.png", "scene1.png"]
    line = one_error_line(capsys, tmp_path / "in", "--model", bundle, "--out", tmp_path / "o2", "--steps", 0, "--strict")
    assert "broken.png" in line


def test_existing_outputs_are_not_overwritten_without_overwrite(bundle, tmp_path, capsys):
    write_images(tmp_path / "in", count=1)
    run(tmp_path / "in", "--model", bundle, "--out", tmp_path / "out", "--steps", 0)
    mask = tmp_path / "out" / "scene0.png"
    Image.fromarray(np.full((R, R), 7, np.uint8)).save(mask)  # a mask the user edited
    line = one_error_line(capsys, tmp_path / "in", "--model", bundle, "--out", tmp_path / "out", "--steps", 0)
    assert "scene0.png exists" in line and "--overwrite" in line
    assert (read_mask(mask) == 7).all()
    run(tmp_path / "in", "--model", bundle, "--out", tmp_path / "out", "--steps", 0, "--overwrite")
    assert not (read_mask(mask) == 7).all()


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
