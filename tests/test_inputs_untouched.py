"""Every script's output-writing path, run with its input folder as the output folder and with an output folder
inside the input folder: no input file changes (md5 of every file before and after), whatever the flags.
Where the script refuses, it does so in one line; where it goes ahead, it writes only new files."""
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import generate
import invert
import model
import prepare
import train_encoder
import train_gan
import weights

R = 32
TINY_G = dict(style_dim=32, n_mlp=2, max_channels=16)


def md5s(folder):
    return {p: hashlib.md5(p.read_bytes()).hexdigest() for p in Path(folder).rglob("*") if p.is_file()}


def outcome(capsys, main, argv):
    """'done' or 'refused' (exit 2 with one error line); anything else fails the test."""
    try:
        main([str(a) for a in argv])
    except SystemExit as stop:
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.code == 2 and len(err) == 1 and err[0].startswith("error: "), (stop.code, err)
        return "refused"
    capsys.readouterr()
    return "done"


def labeled_folder(root, count=3):
    demo = data.DemoDataset(R, 3, 3, length=count, seed=0)
    for part in ("images", "masks"):
        (root / part).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        picture, mask = demo.render(i)
        Image.fromarray((picture * 255 + 0.5).astype(np.uint8)).save(root / "images" / f"scene{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"scene{i}.png")
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A stage-1 checkpoint (tiny, untrained) in its run folder, and a model.pt in its own."""
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    G = model.Generator(R, 3, 3, **TINY_G)
    args = {"resolution": R, "channel_multiplier": 2, "dm_mask": "logits", "data": "demo", "num_classes": 3,
            "demo_length": 8, "labels": 4, **{k: v for k, v in TINY_G.items()}}
    stage1 = root / "gan" / "checkpoint-00000002.pt"
    stage1.parent.mkdir()
    D_r = model.ImageDiscriminator(R, 3, max_channels=16)
    D_m = model.MaskDiscriminator(3, 3, base_channels=16, max_channels=16)
    torch.save({"G": G.state_dict(), "G_ema": G.state_dict(), "D_r": D_r.state_dict(), "D_m": D_m.state_dict(),
                "num_classes": 3, "image_channels": 3, "mask_channels": 3, "args": args}, stage1)
    E = model.Encoder(R, 3, 32, units=(1, 1, 1, 1), max_channels=16)
    bundle = root / "enc" / "model.pt"
    bundle.parent.mkdir()
    torch.save(train_encoder.make_bundle(G, E.eval(), "pad", None, "random"), bundle)
    return stage1, bundle


def inputs_and_outs(inputs):
    """The input folder as the output, and a folder inside it."""
    return [("as", inputs), ("inside", inputs / "out")]


def test_invert(tmp_path, capsys, checkpoints):
    images = labeled_folder(tmp_path / "data") / "images"
    before = md5s(tmp_path / "data")
    results = {}
    for relation, out in inputs_and_outs(images) + [("as the truth", tmp_path / "data" / "masks")]:
        for flags in ([], ["--overwrite"]):
            results[relation, tuple(flags)] = outcome(capsys, invert.main, [
                images, "--model", checkpoints[1], "--out", out, "--steps", 0, "--eval", tmp_path / "data",
                *flags])
            assert all(md5s(tmp_path / "data").get(p) == h for p, h in before.items()), (relation, flags)
    assert results[("as", ())] == results[("as", ("--overwrite",))] == "refused"
    assert results[("as the truth", ())] == results[("as the truth", ("--overwrite",))] == "refused"
    assert results[("inside", ())] == "done" and results[("inside", ("--overwrite",))] == "done"


def test_generate(tmp_path, capsys, checkpoints):
    stage1 = checkpoints[0]
    before = md5s(stage1.parent)
    for relation, out in inputs_and_outs(stage1.parent):
        result = outcome(capsys, generate.main, ["--ckpt", stage1, "--n", 2, "--out", out])
        assert result == ("refused" if relation == "as" else "done")
        assert all(md5s(stage1.parent).get(p) == h for p, h in before.items())
    # into a labeled folder of the user's, or inside its images: refused (they are not generate.py's pairs)
    labeled = labeled_folder(tmp_path / "mine")
    mine = md5s(labeled)
    assert outcome(capsys, generate.main, ["--ckpt", stage1, "--n", 2, "--out", labeled]) == "refused"
    assert md5s(labeled) == mine


def test_train_gan(tmp_path, capsys):
    labeled = labeled_folder(tmp_path / "data")
    before = md5s(labeled)
    tiny = ["--data", labeled, "--resolution", R, "--max-channels", 16, "--style-dim", 32, "--n-mlp", 2, "--batch",
            2, "--workers", 0, "--iter", 2, "--snap-every", 2, "--grid", 2]
    for relation, out in inputs_and_outs(labeled) + [("inside images", labeled / "images" / "run")]:
        assert outcome(capsys, train_gan.main, tiny + ["--out", out]) == "refused", relation
        assert md5s(labeled) == before


def test_train_encoder(tmp_path, capsys, checkpoints):
    stage1 = checkpoints[0]
    labeled = labeled_folder(tmp_path / "data")
    before, run_before = md5s(labeled), md5s(stage1.parent)
    stage2 = ["--ckpt", stage1, "--data", labeled, "--lpips", "random", "--batch", 2, "--encoder-units", "1,1,1,1",
              "--max-channels", 16, "--workers", 0, "--iter", 2, "--snap-every", 2, "--val-every", 2, "--grid", 2,
              "--num-labels", 2]
    for relation, out in inputs_and_outs(labeled):
        assert outcome(capsys, train_encoder.main, stage2 + ["--out", out]) == "refused", relation
        assert md5s(labeled) == before
    assert outcome(capsys, train_encoder.main, stage2 + ["--out", stage1.parent]) == "refused"
    assert outcome(capsys, train_encoder.main, stage2 + ["--out", stage1.parent / "enc"]) == "done"
    assert md5s(labeled) == before and all(md5s(stage1.parent).get(p) == h for p, h in run_before.items())


def test_prepare(tmp_path, capsys):
    src = tmp_path / "NIH"
    for part in ("images", "masks"):
        (src / part).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(src / "images" / f"x{i}.png")
        Image.fromarray(np.where(np.arange(64).reshape(8, 8) % 3 == 0, 255, 0).astype(np.uint8)).save(
            src / "masks" / f"x{i}.png")
    before = md5s(src)
    for relation, out in inputs_and_outs(src):
        assert outcome(capsys, prepare.main, ["nih", src, out, "--size", 4]) == "refused", relation
        assert md5s(src) == before


def test_export_official(tmp_path, capsys, checkpoints):
    run = checkpoints[0].parent
    before = md5s(run)
    for out in (checkpoints[0], run):
        for flags in ([], ["--overwrite"]):
            assert outcome(capsys, weights.export_main, [run, out, *flags]) == "refused", (out, flags)
            assert md5s(run) == before
    assert outcome(capsys, weights.export_main, [run, run / "exported" / "official.pt"]) == "refused"  # no folder
    (run / "exported").mkdir()
    assert outcome(capsys, weights.export_main, [run, run / "exported" / "official.pt"]) == "done"
    assert all(md5s(run).get(p) == h for p, h in before.items())
    os.remove(run / "exported" / "official.pt")
    os.rmdir(run / "exported")


def test_data_commands(tmp_path, capsys):
    labeled = labeled_folder(tmp_path / "data")
    before = md5s(labeled)
    for relation, out in inputs_and_outs(labeled):
        assert outcome(capsys, prepare.main, ["demo", out, "--count", 2, "--resolution", 8]) == \
            ("refused" if relation == "as" else "done")
        assert outcome(capsys, prepare.main, ["show", "--data", labeled, "--resolution", 8, "--out",
                                           out / "grid.png"]) == "refused"
        assert outcome(capsys, prepare.main, ["split", "--data", labeled, "--out", out]) == "done"
        assert outcome(capsys, prepare.main, ["split", "--data", labeled, "--out", out, "--seed", 1]) == "refused"
        assert all(md5s(labeled).get(p) == h for p, h in before.items()), relation
