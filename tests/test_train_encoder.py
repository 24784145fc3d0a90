"""train_encoder.py on the demo data at 32 px with tiny networks, on top of a stage-1 checkpoint made here: a
short run and its outputs, the frozen generator, learning (against a detached encoder that cannot), an exact
resume, the learning-rate schedule, and bad input. LPIPS runs with --lpips random: nothing is downloaded."""
import contextlib
import json
import shutil
import math
import os
import signal
import sys

import pytest
import torch

import data
import losses
import model
import train_encoder
import train_gan
import training
from precision_check import Recorder  # records the gradients an optimiser is given, changes nothing

STAGE1 = ["--data", "demo", "--demo-length", "24", "--num-labels", "8", "--num-classes", "3", "--resolution", "32",
          "--max-channels", "16", "--style-dim", "32", "--n-mlp", "2", "--batch", "2", "--workers", "0",
          "--log-every", "0", "--grid", "2"]
STAGE2 = ["--lpips", "random", "--batch", "2", "--encoder-units", "1,1,1,1", "--max-channels", "16", "--workers", "0",
          "--log-every", "0", "--grid", "2"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    train_gan.main(STAGE1 + ["--out", str(out), "--iter", "4", "--snap-every", "4"])
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
    assert [r["step"] for r in records if "own_miou" in r] == [4, 8]  # the encoder's bound, at each validation
    assert {"checkpoint-00000004.pt", "checkpoint-00000008.pt", "samples-00000004.png", "samples-00000008.png",
            "model.pt", "best.pt", "log.jsonl"} <= set(os.listdir(eight_steps))

    stage1_G = load(stage1)["G_ema"]
    for name in ("checkpoint-00000008.pt", "model.pt"):
        saved = load(eight_steps / name)["G_ema"]
        assert saved.keys() == stage1_G.keys()
        assert all(torch.equal(saved[k], stage1_G[k]) for k in saved), name

    # the bundle is all invert.py needs, and loads with weights_only=True
    G, E, bundle = model.load_bundle(str(eight_steps / "model.pt"))
    assert bundle["lpips"] == "random" and bundle["num_classes"] == 3 and bundle["step"] == 8
    assert bundle["preprocessing"] == {"resolution": 32, "channels": 3, "fit": "stretch"}
    assert "opt" not in " ".join(bundle) and "optimizers" not in bundle
    w_plus = E(torch.zeros(1, 3, 32, 32))
    assert w_plus.shape == (1, G.n_latent, 32)
    torch.testing.assert_close(E.latent_avg, bundle["mean_latent"])


def test_model_pt_holds_the_encoders_reconstruction_errors_of_the_labeled_images(stage1, eight_steps):
    """What invert.py flags images against: per labeled training image (the --labels 8, unaugmented), LPIPS and
    MSE between x and G_x(E(x)) clamped to [-1, 1], E in eval mode as invert.py runs it, G's fixed noise."""
    args, _ = train_encoder.parse_args(["--ckpt", str(stage1)] + STAGE2)
    labeled, _, _ = data.build_datasets(args, augment=False)
    percept = losses.Perceptual("random")
    for name in ("model.pt", "best.pt"):
        G, E, bundle = model.load_bundle(str(eight_steps / name))
        stored = bundle["labeled_errors"]
        assert stored["lpips_net"] == "random" and len(stored["lpips"]) == len(stored["mse"]) == len(labeled) == 8
        for i in range(len(labeled)):
            image = labeled[i][0][None]
            with torch.no_grad():
                reconstruction = G(E(image), input_is_w=True, randomize_noise=False)[0].clamp(-1, 1)
            assert stored["mse"][i] == pytest.approx(((reconstruction - image) ** 2).mean().item(), rel=1e-4), i
            assert stored["lpips"][i] == pytest.approx(percept(reconstruction, image).item(), rel=1e-4), i


def test_tensorboard_gets_the_logged_numbers_the_validation_and_the_grids(stage1, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(stage1, tmp_path, "--iter", "4", "--snap-every", "2", "--val-every", "2", "--tensorboard")
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    for key in ("L_u", "L_s", "dice", "val_miou", "elapsed"):
        logged = {r["step"]: r[key] for r in records if key in r}
        assert logged and {e.step: e.value for e in events.Scalars(key)} == pytest.approx(logged, rel=1e-6), key
    assert [e.step for e in events.Images("samples")] == [2, 4]


def test_tensorboard_without_the_package_is_one_line(stage1, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # an import of either now fails, as when not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit) as exit:
        run(stage1, tmp_path, "--iter", "2", "--tensorboard")
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --tensorboard needs the tensorboard package: pip install tensorboard"]
    assert not list(tmp_path.glob("checkpoint-*")) and not list(tmp_path.glob("events.*"))


def test_stage1_data_options_are_inherited_and_can_be_overridden(stage1):
    args, _ = train_encoder.parse_args(["--ckpt", str(stage1.parent)] + STAGE2)  # a folder: its latest checkpoint
    assert args.ckpt == str(stage1)
    assert (args.data, args.num_labels, args.resolution, args.num_classes, args.demo_length) == ("demo", 8, 32, 3, 24)
    args, _ = train_encoder.parse_args(["--ckpt", str(stage1), "--num-labels", "5"] + STAGE2)
    assert args.num_labels == 5
    # a checkpoint of before the options' names changed (--labeled, --labels) passes its subset on all the same
    old = load(stage1)
    old["args"] = {{"labeled_dir": "labeled", "num_labels": "labels"}.get(k, k): v for k, v in old["args"].items()}
    torch.save(old, stage1.parent / "old.pt")
    args, _ = train_encoder.parse_args(["--ckpt", str(stage1.parent / "old.pt")] + STAGE2)
    assert (args.num_labels, args.labeled_dir) == (8, None)
    os.remove(stage1.parent / "old.pt")


def test_resume_continues_exactly(stage1, eight_steps, tmp_path, monkeypatch, capsys):
    # the run is stopped right after its step-4 checkpoint (the schedule depends on --iter, so the same
    # --iter 8 run is interrupted rather than a shorter one run)
    save = training.save_checkpoint

    def save_then_stop(payload, path, keep):
        save(payload, path, keep)
        if path.endswith("checkpoint-00000004.pt"):
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", save_then_stop)
    with pytest.raises(SystemExit) as stopped:
        run(stage1, tmp_path, "--iter", "8", "--snap-every", "4", "--val-every", "4")
    assert stopped.value.code == 130 and not (tmp_path / "checkpoint-00000008.pt").exists()
    monkeypatch.setattr(training, "save_checkpoint", save)
    capsys.readouterr()
    stopped = load(tmp_path / "checkpoint-00000004.pt")
    stopped["elapsed"] = 1000.0  # as if the first four steps had taken 1000 s: the resumed run counts on from there
    torch.save(stopped, tmp_path / "checkpoint-00000004.pt")
    run(stage1, tmp_path, "--iter", "8", "--snap-every", "4", "--val-every", "4", "--resume", "auto")
    # a resume, not a restart that would reach the same weights: it starts at the saved step and runs 5-8 only
    assert f"resumed from {tmp_path / 'checkpoint-00000004.pt'} at step 4" in capsys.readouterr().out
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(r["elapsed"] < 1000 for r in records[:4]) and all(1000 < r["elapsed"] < 1300 for r in records[4:])
    resumed, straight = load(tmp_path / "checkpoint-00000008.pt"), load(eight_steps / "checkpoint-00000008.pt")
    for key in straight["E"]:
        assert torch.equal(resumed["E"][key], straight["E"][key]), key
    for a, b in zip(resumed["optimizers"], straight["optimizers"]):
        for index, state in b["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(a["state"][index][name]), torch.as_tensor(value)), (index, name)
    assert resumed["best"] == straight["best"]
    # and equality means something: a run over another data order (--seed 1) ends elsewhere
    run(stage1, tmp_path / "other", "--iter", "8", "--snap-every", "8", "--val-every", "8", "--seed", "1")
    other = load(tmp_path / "other" / "checkpoint-00000008.pt")
    assert not all(torch.equal(other["E"][k], straight["E"][k]) for k in straight["E"])


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
    assert model.load_bundle(str(tmp_path / "model.pt"))[2]["step"] == 2
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
        masks = model.mask_classes(mask_logits)
    E = model.Encoder(32, 3, 32, units=(1, 1, 1, 1), max_channels=16)
    E.latent_avg.copy_(G.mean_latent(256)[0])
    if detach:
        E.register_forward_hook(lambda module, inputs, output: output.detach().requires_grad_(True))
    args = train_encoder.build_parser().parse_args(["--ckpt", "x", "--lpips", "random"])
    percept = losses.Perceptual("random")
    optimizers = (train_encoder.build_optimizer(args, E), train_encoder.build_optimizer(args, E))
    autocast, _ = model.make_autocast(args, torch.device("cpu"))
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
import train_encoder, training
args, ckpt = train_encoder.parse_args({argv!r})
rank, world, device = training.setup_distributed()
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


# ----------------------------------------------------------------------------------------------------
# One iteration computed by hand: the two losses, their weights and temperatures, the clips, two optimisers


def hand_cross_entropy(logits, mask, temperature):
    """-log softmax(logits / T)[true class], averaged over the pixels; for one channel the binary form on
    (mask > 0)."""
    z = logits.double() / temperature
    if z.shape[1] == 1:
        t = (mask > 0).double()
        return -(t * torch.log(torch.sigmoid(z[:, 0])) + (1 - t) * torch.log(1 - torch.sigmoid(z[:, 0]))).mean()
    log_p = z - torch.logsumexp(z, dim=1, keepdim=True)
    return -log_p.gather(1, mask[:, None].long()).mean()


def hand_dice(logits, mask, temperature):
    """1 - the mean over the foreground channels (the one channel for a binary generator) of
    2 sum(p t) / (sum(p^2) + sum(t^2)), p = sigmoid(logits / T), t one-hot, pooled over batch and pixels."""
    p = torch.sigmoid(logits.double() / temperature)
    K = p.shape[1]
    channels = [0] if K == 1 else range(1, K)
    scores = []
    for k in channels:
        t = (mask > 0).double() if K == 1 else (mask == k).double()
        scores.append(2 * (p[:, k] * t).sum() / ((p[:, k] ** 2).sum() + (t ** 2).sum()))
    return 1 - sum(scores) / len(scores)


@pytest.mark.parametrize("classes", [3, 1])
def test_one_iteration_by_hand(classes):
    torch.manual_seed(0)
    G = model.Generator(32, classes, 3, style_dim=32, n_mlp=2, max_channels=16).eval().requires_grad_(False)
    with torch.no_grad():
        for k, layer in enumerate(m for m in G.modules() if isinstance(m, model.NoiseInjection)):
            layer.strength.fill_(0.2 + 0.05 * k)  # random noise reaches the outputs: it must be drawn alike
    E = model.Encoder(32, 3, 32, units=(1, 1, 1, 1), max_channels=16)
    E.latent_avg.copy_(G.mean_latent(64)[0])
    percept = losses.Perceptual("random")
    args = train_encoder.build_parser().parse_args(["--ckpt", "x"])
    assert (args.lpips_weight, args.mse_weight, args.ce_weight, args.dice_weight) == (10, 1, 1, 1)
    assert (args.clip_unlabeled, args.clip_labeled) == (2.0, 5.0)
    unlabeled = torch.rand(2, 3, 32, 32) * 2 - 1
    labeled = torch.rand(2, 3, 32, 32) * 2 - 1
    masks = torch.randint(0, 3, (2, 32, 32)) if classes == 3 else torch.randint(0, 2, (2, 32, 32))
    temperatures = (0.1, 0.3) if classes == 3 else (0.3, 0.3)
    autocast, _ = model.make_autocast(args, torch.device("cpu"))

    # first with clips that cannot bind, to compare the losses and gradients; then with clips that do
    for clips in ((1e9, 1e9), (1e-3, 2e-3)):
        args.clip_unlabeled, args.clip_labeled = clips
        optimizers = (Recorder(E.parameters()), Recorder(E.parameters()))
        torch.manual_seed(1)
        out = train_encoder.train_step(E, G, percept, optimizers, (unlabeled, labeled, masks), args, temperatures,
                                       autocast)
        torch.manual_seed(1)  # the same noise maps, drawn in the same order: unlabeled forward, then labeled
        params = list(E.parameters())
        x_u, _ = G(E(unlabeled), input_is_w=True)
        want_u = 10 * percept(x_u, unlabeled).mean() + ((x_u - unlabeled) ** 2).mean()
        grads_u = torch.autograd.grad(want_u, params)
        x_l, y_l = G(E(labeled), input_is_w=True)
        want_s = (10 * percept(x_l, labeled).mean() + ((x_l - labeled) ** 2).mean()
                  + hand_cross_entropy(y_l, masks, temperatures[0]) + hand_dice(y_l, masks, temperatures[1]))
        grads_s = torch.autograd.grad(want_s, params)
        assert out["L_u"].item() == pytest.approx(want_u.item(), rel=1e-5)
        assert out["L_s"].item() == pytest.approx(want_s.item(), rel=1e-5)
        for recorder, grads, clip in ((optimizers[0], grads_u, clips[0]), (optimizers[1], grads_s, clips[1])):
            assert len(recorder.seen) == 1  # each optimiser steps once, on its own batch's gradient
            norm = torch.sqrt(sum(g.double().square().sum() for g in grads)).item()
            scale = min(1.0, clip / (norm + 1e-6))  # clip_grad_norm_'s rule
            for seen, g in zip(recorder.seen[0], grads):  # float32 against the float64 mask losses
                want = (g * scale).float()
                torch.testing.assert_close(seen, want, rtol=1e-3, atol=1e-4 * want.abs().max().item() + 1e-12)
        if clips[0] < 1:
            assert norm > clips[1]  # the small clips did bind


def test_each_step_has_its_own_optimiser_state():
    """Two optimisers, each with its own moment estimates: after one iteration each has taken one step, and
    the unlabeled one's first moment is (1 - beta1) times the unlabeled gradient alone (RAdam's betas 0.95)."""
    torch.manual_seed(0)
    G = model.Generator(32, 3, 3, style_dim=32, n_mlp=2, max_channels=16).eval().requires_grad_(False)
    E = model.Encoder(32, 3, 32, units=(1, 1, 1, 1), max_channels=16)
    percept = losses.Perceptual("random")
    args = train_encoder.build_parser().parse_args(["--ckpt", "x", "--clip-unlabeled", "1e9", "--clip-labeled", "1e9"])
    optimizers = (train_encoder.build_optimizer(args, E), train_encoder.build_optimizer(args, E))
    unlabeled, labeled = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    masks = torch.randint(0, 3, (2, 32, 32))
    params = list(E.parameters())
    torch.manual_seed(1)
    x_u, _ = G(E(unlabeled), input_is_w=True)
    grads_u = torch.autograd.grad(10 * percept(x_u, unlabeled).mean() + ((x_u - unlabeled) ** 2).mean(), params)
    autocast, _ = model.make_autocast(args, torch.device("cpu"))
    torch.manual_seed(1)
    train_encoder.train_step(E, G, percept, optimizers, (unlabeled, labeled, masks), args, (0.1, 0.3), autocast)
    for optimizer in optimizers:
        assert all(float(optimizer.state[p]["step"]) == 1 for p in params)
    for p, g in zip(params, grads_u):
        torch.testing.assert_close(optimizers[0].state[p]["exp_avg"], 0.05 * g, rtol=1e-4, atol=1e-10)


# ----------------------------------------------------------------------------------------------------
# The encoder's upper bound: G_y(w) against G_y(E(G_x(w))) on G's own samples


class ReturnsTheseCodes(torch.nn.Module):
    """A stand-in encoder that answers each call with the next chunk of given W+ codes."""

    def __init__(self, codes):
        super().__init__()
        self.chunks = iter(codes)

    def forward(self, images):
        return next(self.chunks)


@pytest.mark.parametrize("num_classes", [1, 3])
def test_own_sample_score_is_one_for_a_perfect_encoder_and_the_hand_score_for_a_constant_one(num_classes):
    torch.manual_seed(0)
    G = model.Generator(resolution=32, num_classes=num_classes, image_channels=1, style_dim=16, n_mlp=2,
                        max_channels=16).eval()
    with torch.no_grad():
        for t_seg in G.t_seg:  # masks with several classes in every sample
            t_seg.conv.weight.mul_(20)
        for name, parameter in G.named_parameters():
            if name.endswith("noise.strength"):  # noise that matters: the bound uses G's fixed noise maps
                parameter.fill_(1.0)
    count, batch = 10, 4
    z = torch.randn(count, G.style_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        w_plus = G.make_w_plus(z)
        _, drawn = G(w_plus, input_is_w=True, randomize_noise=False)
    drawn = model.mask_classes(drawn)

    perfect = ReturnsTheseCodes(w_plus.split(batch))
    score = train_encoder.own_sample_score(perfect, G, count, batch, "cpu", contextlib.nullcontext)
    assert score == {"own_dice" if num_classes == 1 else "own_miou": 1.0}

    # always the first sample's code: by hand, every sample's mask against the first one's
    constant = ReturnsTheseCodes([w_plus[:1].expand(len(c), -1, -1) for c in w_plus.split(batch)])
    score = train_encoder.own_sample_score(constant, G, count, batch, "cpu", contextlib.nullcontext)
    guess = drawn[:1].expand_as(drawn)
    if num_classes == 1:
        hand = []
        for p, t in zip(guess, drawn):
            p, t = p == 1, t == 1
            total = p.sum() + t.sum()
            hand.append(1.0 if total == 0 else 2 * (p & t).sum().item() / total.item())
        expected = sum(hand) / count
        assert set(score) == {"own_dice"}
    else:
        ious = [((guess == c) & (drawn == c)).sum().item() / ((guess == c) | (drawn == c)).sum().item()
                for c in range(3) if ((guess == c) | (drawn == c)).any()]
        expected = sum(ious) / len(ious)
        assert set(score) == {"own_miou"}
    assert 0 < expected < 1
    assert abs(next(iter(score.values())) - expected) < 1e-9


def test_a_rolled_back_run_moves_the_later_checkpoints_and_model_pt_aside(stage1, eight_steps, tmp_path, capsys):
    shutil.copytree(eight_steps, tmp_path / "run")
    out = tmp_path / "run"
    later = {name: (out / name).read_bytes() for name in ("checkpoint-00000008.pt", "model.pt")}
    best_step = load(out / "best.pt")["step"]
    run(stage1, out, "--iter", "6", "--snap-every", "4", "--val-every", "4", "--resume",
        str(out / "checkpoint-00000004.pt"))
    aside = out / "abandoned-after-00000004"
    assert f"moved to {aside}" in capsys.readouterr().out
    assert {name: (aside / name).read_bytes() for name in later} == later
    assert (aside / "best.pt").exists() == (best_step > 4)
    assert model.list_checkpoints(str(out)) == [str(out / "checkpoint-00000004.pt"),
                                                    str(out / "checkpoint-00000006.pt")]
    assert load(out / "model.pt")["step"] == 6


def test_resume_with_a_file_of_another_kind_and_an_out_of_another_run_are_one_line(stage1, tmp_path, capsys):
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    line = one_error_line(capsys, ["--ckpt", str(stage1), "--out", str(tmp_path / "enc"), "--resume",
                                   str(tmp_path / "tensor.pt")] + STAGE2)
    assert "tensor.pt is not a checkpoint of train_encoder.py" in line
    line = one_error_line(capsys, ["--ckpt", str(stage1), "--out", str(stage1.parent)] + STAGE2)
    assert "holds the checkpoints of another run" in line


@pytest.mark.parametrize("own, val, warned", [
    (0.38, 0.90, True),  # chest, a pool of another source: the bound the outside measurement found (issue 36)
    (0.536, 0.915, True),  # the same pool, 3200 stage-2 steps
    (0.623, 0.889, True),  # the same pool at 14.4 kimg, 200 steps: 3.4 times the error
    (0.865, 0.902, False),  # chest, a pool of the labels' source: masks that fit the images
    (0.436, 0.666, False),  # the README's demo at its end (mIoU): 1.7 times the error
    (0.99, 0.995, False),  # both near perfect: 2 times a tiny error
    (0.80, 0.95, True),  # 4 times the error, though only 0.15 apart: errors compare, not scores
    (0.30, 0.55, False),  # a weak encoder, 0.25 apart: 1.6 times the error
    (float("nan"), 0.9, True),
])
def test_the_bound_warning_fires_where_the_generators_masks_do_not_fit_its_images(own, val, warned):
    for kind in ("dice", "miou"):
        warning = train_encoder.bound_warning({f"val_{kind}": torch.tensor(val), f"own_{kind}": torch.tensor(own)})
        assert (warning is not None) == warned
        assert warning is None or warning.startswith(f"own_{kind} {own:.3f} against val_{kind} {val:.3f}")
        assert warning is None or "--dm-look-augment" in warning  # the remedy measured for a pool of another source
    assert train_encoder.bound_warning({"val_dice": torch.tensor(0.9)}) is None  # --own-samples 0: nothing to compare


def test_a_bound_far_below_the_validation_score_is_warned_of_at_each_validation(stage1, tmp_path, monkeypatch,
                                                                                capsys):
    monkeypatch.setattr(train_encoder, "encoder_score", lambda E, G, batches, autocast, kind: {
        f"{kind}_miou": {"val": 0.9, "own": 0.5}[kind]})
    run(stage1, tmp_path, "--iter", "4", "--snap-every", "4", "--val-every", "2")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: at step {s}, own_miou 0.500 against val_miou 0.900: the encoder misses 5.00 times "
                        "as much of G's own masks as of the held-out labels" + warnings[0].split("labels", 1)[1]
                        for s in (2, 4)]
