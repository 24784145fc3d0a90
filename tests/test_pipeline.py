"""The README's main job at a tiny size: stage 1 on the demo with few labels, stage 2 on top, then unseen demo
scenes segmented and scored; every stage exits cleanly and the scores are written and in [0, 1]. Also a binary
task (one foreground class) through all three stages in the official one-channel form."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import invert
import model
import prepare
import train_encoder
import train_gan


def three_stages(tmp_path, classes, *stage1_extra):
    runs = tmp_path / "runs"
    train_gan.main(["--data", "demo", "--demo-length", "16", "--num-labels", "4", "--num-classes", str(classes),
                    "--resolution", "32", "--max-channels", "16", "--style-dim", "32", "--n-mlp", "2", "--batch", "2",
                    "--iter", "2", "--workers", "0", "--grid", "2", "--log-every", "0", "--out", str(runs / "gan"),
                    *stage1_extra])
    train_encoder.main(["--ckpt", str(runs / "gan" / "checkpoint-00000002.pt"), "--lpips", "random", "--batch", "2",
                        "--iter", "2", "--val-every", "2", "--encoder-units", "1,1,1,1", "--max-channels", "16",
                        "--workers", "0", "--grid", "2", "--log-every", "0", "--out", str(runs / "encoder")])
    prepare.main(["demo", str(tmp_path / "unseen"), "--count", "3", "--resolution", "32", "--num-classes", str(classes)])
    invert.main([str(tmp_path / "unseen" / "images"), "--model", str(runs / "encoder" / "model.pt"), "--steps", "2",
                 "--eval", str(tmp_path / "unseen"), "--out", str(runs / "segmentations")])
    return runs


def test_the_demo_pipeline_trains_encodes_segments_and_scores(tmp_path):
    runs = three_stages(tmp_path, 3)
    metrics = json.load(open(runs / "segmentations" / "metrics.json"))
    assert metrics["images"] == 3 and metrics["classes"] == ["background", "ellipse", "rectangle"]
    for kind in ("optimised", "encoder_only"):
        values = [metrics[kind]["miou"], metrics[kind]["mean_dice"], *metrics[kind]["jaccard"].values()]
        assert all(0 <= v <= 1 for v in values), metrics[kind]
    assert (runs / "segmentations" / "scene00002_overlay.png").exists()


@pytest.mark.parametrize("binary", ["sigmoid", "softmax"])
def test_a_binary_task_through_the_three_stages(tmp_path, capsys, binary):
    runs = three_stages(tmp_path, 2, "--binary", binary)
    out = capsys.readouterr().out
    channels = 1 if binary == "sigmoid" else 2
    # stage 2: the official binary losses for one channel (BCE and Dice at 0.3), the softmax ones for two
    assert f"mask temperatures CE {0.3 if channels == 1 else 0.1}, Dice 0.3" in out
    records = [json.loads(line) for line in open(runs / "encoder" / "log.jsonl")]
    assert any("val_dice" in r for r in records)  # one foreground class: DICE
    G, E, bundle = model.load_bundle(str(runs / "encoder" / "model.pt"))
    assert G.num_classes == channels and bundle["num_classes"] == 2
    # inversion: masks of classes 0 and 1, decided by logit > 0 (one channel) or the argmax (two)
    masks = [np.asarray(Image.open(p)) for p in sorted((runs / "segmentations").glob("scene*[0-9].png"))]
    assert len(masks) == 3 and set(np.unique(np.stack(masks)).tolist()) <= {0, 1}
    image = invert.load_input(invert.Input(tmp_path / "unseen" / "images" / "scene00000.png", "scene00000"),
                              bundle["preprocessing"]).image
    noise = invert.make_noise(G, [invert.image_seed(0, "scene00000")], "cpu")
    with torch.no_grad():
        logits = G(E(image[None]), input_is_w=True, noise=noise)[1][0]
    want = (logits[0] > 0) if channels == 1 else logits.argmax(0)
    encoder_alone = invert.to_input_geometry(logits, (32, 32), "stretch")
    np.testing.assert_array_equal(encoder_alone, want.numpy().astype(np.uint8))
    summary = json.load(open(runs / "segmentations" / "metrics.json"))
    assert set(summary["encoder_only"]["dice"]) == {"ellipse"} and "dice_per_patient" not in summary["optimised"]
