"""train_encoder.py on the demo data at 32 px with tiny networks, on top of a stage-1 checkpoint made here: a
short run and its outputs, the frozen generator, learning (against a detached encoder that cannot), an exact
resume, the learning-rate schedule, and bad input. LPIPS runs with --lpips random: nothing is downloaded."""
import json
import math
import os
import signal

import pytest
import torch

import losses
import model
import train_encoder
import train_gan

STAGE1 = ["--data", "demo", "--demo-length", "24", "--labels", "8", "--num-classes", "3", "--resolution", "32",
          "--max-channels", "16", "--style-dim", "32", "--n-mlp", "2", "--batch", "2", "--workers", "0",
          "--log-every", "0", "--grid", "2"]
STAGE2 = ["--lpips", "random", "--batch", "2", "--encoder-units", "1,1,1,1", "--max-channels", "16", "--workers", "0",
          "--log-every", "0", "--grid", "2"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    train_gan.main(STAGE1 + ["--out", str(out), "--iter", "4", "--snap-kimg", "0.008"])
    return out / "checkpoint-00000004.pt"


def run(stage1, out, *extra):
    train_encoder.main(["--ckpt", str(stage1), "--out", str(out)] + STAGE2 + list(extra))


@pytest.fixture(scope="module")
def eight_steps(stage1, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoder")
    run(stage1, out, "--iter", "8", "--snap-every", "4", "--val-every", "4")
    return out


def test_a_short_run_writes_its_outputs_and_leaves_the_generator_as_it_was(stage1, eight_steps):
    records = [json.loads(line) for line in open(eight_steps / "log.jsonl")]
    assert records[-1]["step"] == 8
    for record in records:
        for key in ("L_u", "L_s", "ce", "dice", "lpips_u", "mse_u", "val_miou"):
            if key in record:
                assert math.isfinite(record[key]), (key, record)
    assert any("val_miou" in r for r in records)  # 3 classes: the data set's mIoU
    assert {"checkpoint-00000004.pt", "checkpoint-00000008.pt", "samples-00000004.png", "samples-00000008.png",
            "model.pt", "best.pt", "log.jsonl"} <= set(os.listdir(eight_steps))

    stage1_G = load(stage1)["G_ema"]
    for name in ("checkpoint-00000008.pt", "model.pt"):
        saved = load(eight_steps / name)["G_ema"]
        assert saved.keys() == stage1_G.keys()
        assert all(torch.equal(saved[k], stage1_G[k]) for k in saved), name

    # the bundle is all invert.py needs, and loads with weights_only=True
    G, E, bundle = train_encoder.load_bundle(str(eight_steps / "model.pt"))
    assert bundle["lpips"] == "random" and bundle["num_classes"] == 3 and bundle["step"] == 8
    assert bundle["preprocessing"] == {"resolution": 32, "channels": 3, "fit": "stretch"}
    assert "opt" not in " ".join(bundle) and "optimizers" not in bundle
    w_plus = E(torch.zeros(1, 3, 32, 32))
    assert w_plus.shape == (1, G.n_latent, 32)
    torch.testing.assert_close(E.latent_avg, bundle["mean_latent"])


def test_stage1_data_options_are_inherited_and_can_be_overridden(stage1):
    args, _ = train_encoder.parse_args(["--ckpt", str(stage1.parent)] + STAGE2)  # a folder: its latest checkpoint
    assert args.ckpt == str(stage1)
    assert (args.data, args.labels, args.resolution, args.num_classes, args.demo_length) == ("demo", 8, 32, 3, 24)
    args, _ = train_encoder.parse_args(["--ckpt", str(stage1), "--labels", "5"] + STAGE2)
    assert args.labels == 5


def test_resume_continues_exactly(stage1, eight_steps, tmp_path, monkeypatch):
    # the run is stopped right after its step-4 checkpoint (the schedule depends on --iter, so the same
    # --iter 8 run is interrupted rather than a shorter one run)
    save = train_gan.save_checkpoint

    def save_then_stop(payload, path, keep):
        save(payload, path, keep)
        if path.endswith("checkpoint-00000004.pt"):
            raise KeyboardInterrupt

    monkeypatch.setattr(train_gan, "save_checkpoint", save_then_stop)
    with pytest.raises(SystemExit) as stopped:
        run(stage1, tmp_path, "--iter", "8", "--snap-every", "4", "--val-every", "4")
    assert stopped.value.code == 130 and not (tmp_path / "checkpoint-00000008.pt").exists()
    monkeypatch.setattr(train_gan, "save_checkpoint", save)
    run(stage1, tmp_path, "--iter", "8", "--snap-every", "4", "--val-every", "4", "--resume", "auto")
    resumed, straight = load(tmp_path / "checkpoint-00000008.pt"), load(eight_steps / "checkpoint-00000008.pt")
    for key in straight["E"]:
        assert torch.equal(resumed["E"][key], straight["E"][key]), key
    for a, b in zip(resumed["optimizers"], straight["optimizers"]):
        for index, state in b["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(a["state"][index][name]), torch.as_tensor(value)), (index, name)
    assert resumed["best"] == straight["best"]


def test_sigterm_ends_the_step_with_a_checkpoint_and_model_pt_and_the_resume_is_exact(stage1, eight_steps, tmp_path,
                                                                                     monkeypatch, capsys):
    real_step, steps_done = train_encoder.train_step, []

    def step_then_sigterm(*args, **kwargs):
        result = real_step(*args, **kwargs)
        steps_done.append(1)
        if len(steps_done) == 2:  # after step 2, as a scheduler would
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(train_encoder, "train_step", step_then_sigterm)
    with pytest.raises(SystemExit) as stopped:
        run(stage1, tmp_path, "--iter", "8", "--snap-every", "4", "--val-every", "4")
    assert stopped.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines() == [
        f"stopped by SIGTERM at step 2: checkpoint {tmp_path / 'checkpoint-00000002.pt'} written; continue with "
        "--resume auto"]
    assert train_encoder.load_bundle(str(tmp_path / "model.pt"))[2]["step"] == 2
    monkeypatch.undo()
    run(stage1, tmp_path, "--iter", "8", "--snap-every", "4", "--val-every", "4", "--resume", "auto")
    resumed, straight = load(tmp_path / "checkpoint-00000008.pt"), load(eight_steps / "checkpoint-00000008.pt")
    for key in straight["E"]:
        assert torch.equal(resumed["E"][key], straight["E"][key]), key
    assert resumed["best"] == straight["best"]


def test_new_data_keeps_the_encoder_and_starts_fresh_streams(stage1, eight_steps, tmp_path, capsys):
    import shutil
    for name in ("checkpoint-00000004.pt", "log.jsonl"):
        shutil.copy(eight_steps / name, tmp_path / name)
    # the demo pool grows from 24 to 30 images: an exact resume is refused, with what to do
    with pytest.raises(SystemExit) as refused:
        run(stage1, tmp_path, "--iter", "8", "--snap-every", "4", "--val-every", "4", "--resume", "auto",
            "--demo-length", "30")
    err = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code == 2 and len(err) == 1 and "--new-data" in err[0]
    run(stage1, tmp_path, "--iter", "8", "--snap-every", "4", "--val-every", "4", "--resume", "auto",
        "--demo-length", "30", "--new-data")
    after = load(tmp_path / "checkpoint-00000008.pt")
    assert after["step"] == 8 and after["unlabeled_stream"]["seed"] == 1 + 7919 * 4
    assert after["unlabeled_stream"]["length"] == 30
    assert not all(torch.equal(after["E"][k], load(eight_steps / "checkpoint-00000008.pt")["E"][k])
                   for k in after["E"])  # other data from step 4 on: another encoder than the exact resume's


def test_learning_rate_is_constant_then_a_cosine_to_the_minimum():
    args = train_encoder.build_parser().parse_args(["--ckpt", "x", "--iter", "100"])
    assert train_encoder.learning_rate(0, args) == train_encoder.learning_rate(29, args) == 1e-3
    assert train_encoder.learning_rate(65, args) == pytest.approx((1e-3 + 1e-5) / 2)  # half-way down
    assert train_encoder.learning_rate(100, args) == pytest.approx(1e-5)
    lrs = [train_encoder.learning_rate(s, args) for s in range(30, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_mask_temperatures_follow_what_d_m_saw():
    args = train_encoder.build_parser().parse_args(["--ckpt", "x"])
    assert train_encoder.mask_temperatures(args, {"dm_mask": "logits"}, 8) == (0.1, 0.3)
    assert train_encoder.mask_temperatures(args, {"dm_mask": "logits"}, 1) == (0.3, 0.3)
    assert train_encoder.mask_temperatures(args, {"dm_mask": "probabilities"}, 8) == (1.0, 1.0)
    args.ce_temperature = 0.5
    assert train_encoder.mask_temperatures(args, {"dm_mask": "logits"}, 8) == (0.5, 0.3)


# ----------------------------------------------------------------------------------------------------
# Learning, not just running


def fit_fixed_batch(steps, detach):
    """train_step on one fixed labeled and unlabeled batch; (first, last) of the mask loss and of the MSE."""
    torch.manual_seed(0)
    G = model.Generator(32, 3, 3, style_dim=32, n_mlp=2, max_channels=16).eval().requires_grad_(False)
    # a target the generator can make: its own images and masks at some W+
    with torch.no_grad():
        w = G.mean_latent(256) + 0.7 * torch.randn(4, G.n_latent, 32)
        images, mask_logits = G(w, input_is_w=True, randomize_noise=False)
        masks = train_gan.mask_classes(mask_logits)
    E = model.Encoder(32, 3, 32, units=(1, 1, 1, 1), max_channels=16)
    E.latent_avg.copy_(G.mean_latent(256)[0])
    if detach:
        E.register_forward_hook(lambda module, inputs, output: output.detach().requires_grad_(True))
    args = train_encoder.build_parser().parse_args(["--ckpt", "x", "--lpips", "random"])
    percept = losses.Perceptual("random")
    optimizers = (train_encoder.build_optimizer(args, E), train_encoder.build_optimizer(args, E))
    autocast, _ = train_gan.make_autocast(args, torch.device("cpu"))
    history = []
    for _ in range(steps):
        out = train_encoder.train_step(E, G, percept, optimizers, (images[2:], images[:2], masks[:2]), args,
                                       (0.1, 0.3), autocast)
        history.append(((out["ce"] + out["dice"]).item(), out["mse_s"].item(), out["mse_u"].item()))
    return history[0], history[-1]


@pytest.mark.parametrize("detach", [False, True])
def test_the_encoder_learns_masks_and_reconstructions_and_a_detached_one_cannot(detach):
    first, last = fit_fixed_batch(40, detach)
    learned = last[0] < 0.5 * first[0] and last[1] < 0.7 * first[1] and last[2] < 0.7 * first[2]
    assert learned != detach, (first, last)


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2


def one_error_line(capsys, argv):
    with pytest.raises(SystemExit) as exit:
        train_encoder.main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_missing_and_corrupt_checkpoints(capsys, tmp_path):
    line = one_error_line(capsys, ["--ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path)] + STAGE2)
    assert "nope.pt" in line and "no such file" in line
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    line = one_error_line(capsys, ["--ckpt", str(tmp_path / "bad.pt"), "--out", str(tmp_path)] + STAGE2)
    assert "bad.pt" in line and "cannot be read" in line
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    line = one_error_line(capsys, ["--ckpt", str(tmp_path / "other.pt"), "--out", str(tmp_path)] + STAGE2)
    assert "not a stage-1 checkpoint" in line


@pytest.mark.parametrize("extra,message", [
    (["--resolution", "64"], "generates 32 px images"),
    (["--channels", "1"], "1 image channels"),
    (["--num-classes", "4"], "4 classes"),
])
def test_data_that_does_not_fit_the_generator(capsys, stage1, tmp_path, extra, message):
    line = one_error_line(capsys, ["--ckpt", str(stage1), "--out", str(tmp_path)] + STAGE2 + extra)
    assert message in line


def test_lpips_weights_that_cannot_be_downloaded(capsys, stage1, tmp_path, monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # what torchvision's download ends in
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    argv = ["--ckpt", str(stage1), "--out", str(tmp_path)] + STAGE2 + ["--lpips", "vgg"]
    line = one_error_line(capsys, argv)
    assert "vgg16-397923af.pth" in line and "--lpips random" in line and "empty-cache" in line


# ----------------------------------------------------------------------------------------------------
# Two processes under torchrun (gloo), and the bf16 path

DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import train_encoder, train_gan
args, ckpt = train_encoder.parse_args({argv!r})
rank, world, device = train_gan.setup_distributed()
nets = train_encoder._train(args, ckpt, rank, world, device)
torch.save(nets["E"].state_dict(), f"{{args.out}}/rank{{rank}}.pt")
dist.destroy_process_group()
"""


def test_torchrun_two_processes_agree_on_the_encoder(stage1, tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = ["--ckpt", str(stage1), "--out", str(tmp_path)] + STAGE2 + ["--iter", "3", "--snap-every", "3",
                                                                       "--val-every", "3"]
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(root=root, argv=argv))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], cwd=root, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    rank0, rank1 = load(tmp_path / "rank0.pt"), load(tmp_path / "rank1.pt")
    for name, value in rank0.items():
        if "running" in name or "num_batches" in name:
            continue  # BN statistics are each rank's own (as in the official code: no SyncBN)
        torch.testing.assert_close(rank1[name], value, rtol=0, atol=0, msg=name)
    assert (tmp_path / "model.pt").exists() and len(load(tmp_path / "checkpoint-00000003.pt")["rng"]) == 2


def test_bf16_autocast_path_trains(stage1, tmp_path):
    run(stage1, tmp_path, "--iter", "2", "--snap-every", "2", "--val-every", "2", "--precision", "bf16")
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert records[-1]["step"] == 2
    assert all(math.isfinite(v) for r in records for k, v in r.items() if isinstance(v, float))
