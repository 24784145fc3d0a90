"""benchmark.py runs every part at tiny sizes on the CPU and prints a row for each figure README's Performance
section lists (the GPU fills in the numbers)."""
import re

import benchmark


def test_every_part_runs_and_gives_its_rows(capsys):
    rows = benchmark.main(["--tiny", "--device", "cpu"])
    printed = capsys.readouterr().out
    whats = [what for what, _ in rows]
    for expected in ("max relative error", "bias_act bandwidth", "upsample2d bandwidth",
                     "downsample2d bandwidth", "speed-up per shape", "gradfix vs PyTorch double backward, R1",
                     "gradfix vs PyTorch double backward, path length", "G / D_r / D_m forward+backward",
                     "stage-1 training", "loader throughput", "stage-2 training", "inversion"):
        assert sum(expected in what for what in whats) >= 1, expected
    for what, figure in rows:
        assert f"| {what} | {figure} |" in printed
        assert figure == "needs a GPU" or re.search(r"\d", figure), (what, figure)
    stage1 = dict(rows)[next(w for w in whats if w.startswith("stage-1"))]
    assert all(f"{p} {i}" in stage1 for p in ("fp32", "bf16") for i in ("cuda", "ref"))  # every combination
