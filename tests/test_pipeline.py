"""The README's main job at a tiny size: stage 1 on the demo with few labels, stage 2 on top, then unseen demo
scenes segmented and scored; every stage exits cleanly and the scores are written and in [0, 1]."""
import json

import data
import invert
import train_encoder
import train_gan


def test_the_demo_pipeline_trains_encodes_segments_and_scores(tmp_path):
    runs = tmp_path / "runs"
    train_gan.main(["--data", "demo", "--demo-length", "16", "--labels", "4", "--num-classes", "3", "--resolution",
                    "32", "--max-channels", "16", "--style-dim", "32", "--n-mlp", "2", "--batch", "2", "--iter", "2",
                    "--workers", "0", "--grid", "2", "--log-every", "0", "--out", str(runs / "gan")])
    train_encoder.main(["--ckpt", str(runs / "gan" / "checkpoint-00000002.pt"), "--lpips", "random", "--batch", "2",
                        "--iter", "2", "--encoder-units", "1,1,1,1", "--max-channels", "16", "--workers", "0",
                        "--grid", "2", "--log-every", "0", "--out", str(runs / "encoder")])
    data.main(["demo", str(tmp_path / "unseen"), "--count", "3", "--resolution", "32", "--num-classes", "3"])
    invert.main([str(tmp_path / "unseen" / "images"), "--model", str(runs / "encoder" / "model.pt"), "--steps", "2",
                 "--eval", str(tmp_path / "unseen"), "--out", str(runs / "segmentations")])
    metrics = json.load(open(runs / "segmentations" / "metrics.json"))
    assert metrics["images"] == 3 and metrics["classes"] == ["background", "ellipse", "rectangle"]
    for kind in ("optimised", "encoder_only"):
        values = [metrics[kind]["miou"], metrics[kind]["mean_dice"], *metrics[kind]["jaccard"].values()]
        assert all(0 <= v <= 1 for v in values), metrics[kind]
    assert (runs / "segmentations" / "scene00002_overlay.png").exists()
