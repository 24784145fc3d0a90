"""datasets.py's commands, run through `python prepare.py`: split writes seeded name lists that training honours,
keeps names that are not UTF-8 and never redraws a split; show draws a grid and never writes over a file or into
the data; demo never writes into a folder that holds a data set."""
import os

import pytest
from PIL import Image

import data
from test_data import make_labeled, parse, run_main


def test_split_file_keeps_listed_pairs_and_hides_the_others_from_training(tmp_path, capsys):
    make_labeled(tmp_path / "lab", count=10, size=8)
    code, out, _ = run_main(capsys, ["split", "--data", tmp_path / "lab", "--out", tmp_path / "split",
                                     "--val", 0.2, "--test", 0.3, "--seed", 4])
    assert code == 0 and "train.txt (5)" in out
    parts = {p: (tmp_path / "split" / f"{p}.txt").read_text().split() for p in ("train", "val", "test")}
    assert [len(parts[p]) for p in ("train", "val", "test")] == [5, 2, 3]
    assert sorted(sum(parts.values(), [])) == sorted(f"img{i}" for i in range(10))
    labeled, unlabeled, info = data.build_datasets(parse(["--data", tmp_path / "lab", "--split",
                                                          tmp_path / "split/train.txt"]))
    assert sorted(p.name for p in labeled.pairs) == sorted(parts["train"])
    assert len(unlabeled) == 5 and info["labeled_total"] == 5  # val and test images never reach training
    (tmp_path / "bad.txt").write_text("img1.png\nnope\n")
    with pytest.raises(data.DataError, match="nope, which is not a pair"):
        data.build_datasets(parse(["--data", tmp_path / "lab", "--split", tmp_path / "bad.txt"]))


def test_show_runs_on_the_demo(capsys, tmp_path):
    code, out, _ = run_main(capsys, ["show", "--data", "demo", "--resolution", 16, "--count", 3,
                                     "--out", tmp_path / "grid.png"])
    assert code == 0 and "grid.png" in out
    assert Image.open(tmp_path / "grid.png").size == (48, 48)  # image | overlay | mask, 3 rows


def test_split_keeps_names_that_are_not_utf8_and_never_redraws_a_split(tmp_path, capsys):
    make_labeled(tmp_path / "lab", count=4, size=8)
    odd = os.fsdecode(b"lung_\xe9")
    for part in ("images", "masks"):
        os.replace(tmp_path / "lab" / part / "img0.png", tmp_path / "lab" / part / f"{odd}.png")
    code, _, err = run_main(capsys, ["split", "--data", tmp_path / "lab", "--out", tmp_path / "split", "--val", 0,
                                     "--test", 0])
    assert code == 0, err
    assert data.read_split_file(tmp_path / "split" / "train.txt") == sorted([odd, "img1", "img2", "img3"])
    labeled, _, _ = data.build_datasets(parse(["--data", tmp_path / "lab", "--split", tmp_path / "split/train.txt"]))
    assert len(labeled) == 4
    kept = (tmp_path / "split" / "train.txt").read_bytes()
    code, _, err = run_main(capsys, ["split", "--data", tmp_path / "lab", "--out", tmp_path / "split", "--seed", 1])
    assert code == 2 and ".txt exists; pass another --out" in err and (tmp_path / "split" / "train.txt").read_bytes() == kept


def test_show_and_demo_never_write_over_a_file_nor_into_the_data(tmp_path, capsys):
    make_labeled(tmp_path / "lab", count=2, size=8)
    before = {p: p.read_bytes() for p in (tmp_path / "lab").rglob("*") if p.is_file()}
    for out in (tmp_path / "lab" / "images" / "img0.png", tmp_path / "lab" / "grid.png"):
        code, _, err = run_main(capsys, ["show", "--data", tmp_path / "lab", "--resolution", 8, "--out", out])
        assert code == 2 and err.startswith("error: --out"), err
    code, _, err = run_main(capsys, ["demo", tmp_path / "lab", "--count", 2, "--resolution", 8])
    assert code == 2 and "already holds a data set" in err
    assert {p: p.read_bytes() for p in (tmp_path / "lab").rglob("*") if p.is_file()} == before
