"""generate.py: the pairs it writes are read back by data.py and are G_ema's for the same seed, whatever the
batch; a stopped run continues with the missing pairs only."""
import argparse
import os

import numpy as np
import pytest
import torch

import data
import generate
import model


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A stage-1 checkpoint as train_gan.py wrote it before --binary (untrained tiny G_ema, one grey channel, 2
    classes in 2 mask channels: no "mask_channels" key)."""
    torch.manual_seed(0)
    G = model.Generator(32, 2, 1, style_dim=32, n_mlp=2, max_channels=16)
    with torch.no_grad():  # noise that reaches the pairs, so that each pair's own noise seed is tested too
        for k, layer in enumerate(m for m in G.modules() if isinstance(m, model.NoiseInjection)):
            layer.strength.fill_(0.3 + 0.1 * k)
    path = tmp_path_factory.mktemp("stage1") / "checkpoint-00000001.pt"
    torch.save({"G_ema": G.state_dict(), "num_classes": 2, "image_channels": 1,
                "args": {"resolution": 32, "style_dim": 32, "n_mlp": 2, "channel_multiplier": 2, "max_channels": 16}},
               path)
    return str(path)


def test_pairs_are_g_emas_read_back_by_data_py_and_resume_fills_the_gaps(stage1, tmp_path):
    generate.main(["--ckpt", stage1, "--n", "5", "--batch", "2", "--out", str(tmp_path / "a"), "--seed", "3"])
    generate.main(["--ckpt", stage1, "--n", "5", "--batch", "5", "--out", str(tmp_path / "b"), "--seed", "3"])
    args = argparse.Namespace(data=str(tmp_path / "a"), resolution=32, augment=False)
    labeled, _, info = data.build_datasets(args)
    assert len(labeled) == 5 and info["channels"] == 1

    G = generate.load_any_generator(stage1, torch.device("cpu"))
    mean = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        mean = G.mean_latent(4096)
    images, masks = generate.draw(G, [0, 4], 3, 0.7, mean)
    for k, i in enumerate([0, 4]):
        image, mask = labeled[i]
        want = torch.from_numpy(generate.image_pixels(images[k]).astype(np.float32)) / 127.5 - 1
        torch.testing.assert_close(image[0], want)
        assert torch.equal(mask, masks[k])
    for name in sorted(os.listdir(tmp_path / "a" / "images")):  # the batch does not matter
        for part in ("images", "masks"):
            assert (tmp_path / "a" / part / name).read_bytes() == (tmp_path / "b" / part / name).read_bytes()

    os.remove(tmp_path / "a" / "masks" / "000002.png")  # a run stopped before this pair was complete
    kept = os.path.getmtime(tmp_path / "a" / "images" / "000001.png")
    generate.main(["--ckpt", stage1, "--n", "5", "--out", str(tmp_path / "a"), "--seed", "3"])
    assert (tmp_path / "a" / "masks" / "000002.png").read_bytes() == (tmp_path / "b" / "masks" / "000002.png").read_bytes()
    assert os.path.getmtime(tmp_path / "a" / "images" / "000001.png") == kept


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        generate.main(["--ckpt", str(tmp_path / "none.pt"), "--out", str(tmp_path)])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.pt" in err[0]


def test_a_run_killed_mid_write_leaves_no_truncated_pair(stage1, tmp_path, monkeypatch, capsys):
    from PIL import Image
    real_save, saves = Image.Image.save, []

    def save_then_die(image, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 4:  # the mask of pair 1: half its bytes, then the process "dies"
            real_save(image, path, *args, **kwargs)
            with open(path, "r+b") as f:
                f.truncate(20)
            raise KeyboardInterrupt
        return real_save(image, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_die)
    with pytest.raises(SystemExit) as stop:
        generate.main(["--ckpt", stage1, "--n", "3", "--batch", "3", "--out", str(tmp_path)])
    assert stop.value.code == 130 and "run the same command again" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "masks")) == ["000000.png"]  # and no partial file left
    monkeypatch.undo()
    generate.main(["--ckpt", stage1, "--n", "3", "--batch", "3", "--out", str(tmp_path)])
    assert "generating 2 of 3 pairs" in capsys.readouterr().out  # pair 1 was not taken for finished
    for i in range(3):
        data.load_mask(tmp_path / f"masks/{i:06d}.png")  # every mask decodes


def test_a_run_folder_is_taken_as_every_other_script_takes_it(stage1, tmp_path):
    run_folder = os.path.dirname(stage1)
    generate.main(["--ckpt", run_folder, "--n", "2", "--out", str(tmp_path / "from_folder")])
    generate.main(["--ckpt", stage1, "--n", "2", "--out", str(tmp_path / "from_file")])
    for part in ("images", "masks"):
        for name in ("000000.png", "000001.png"):
            assert (tmp_path / "from_folder" / part / name).read_bytes() == \
                (tmp_path / "from_file" / part / name).read_bytes()


def one_line(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        generate.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_an_out_of_other_settings_or_other_files_is_refused_and_left_as_it_is(stage1, tmp_path, capsys):
    out = tmp_path / "synth"
    generate.main(["--ckpt", stage1, "--n", "2", "--out", str(out), "--truncation", "0.7"])
    before = {p: p.read_bytes() for p in out.rglob("*.png")}
    for other in (["--truncation", "1"], ["--seed", "5"]):
        line = one_line(capsys, ["--ckpt", stage1, "--n", "3", "--out", str(out)] + other)
        assert "other settings" in line and "generate.json" in line
    other_generator = tmp_path / "other" / "checkpoint-00000001.pt"
    other_generator.parent.mkdir()
    ckpt = torch.load(stage1, weights_only=True)
    ckpt["G_ema"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["G_ema"].items()}
    torch.save(ckpt, other_generator)
    assert "generator" in one_line(capsys, ["--ckpt", str(other_generator), "--n", "3", "--out", str(out)])
    assert {p: p.read_bytes() for p in out.rglob("*.png")} == before
    generate.main(["--ckpt", stage1, "--n", "3", "--out", str(out)])  # the same settings: it continues
    assert "generating 1 of 3 pairs" in capsys.readouterr().out
    # a labeled folder of the user's: not generate.py's
    labeled = tmp_path / "mine"
    (labeled / "images").mkdir(parents=True)
    (labeled / "images" / "000000.png").write_bytes(before[out / "images" / "000000.png"])
    assert "did not write" in one_line(capsys, ["--ckpt", stage1, "--n", "2", "--out", str(labeled)])
    assert "holds --ckpt" in one_line(capsys, ["--ckpt", stage1, "--n", "2", "--out", os.path.dirname(stage1)])
