"""train_gan.py end to end on the demo data at 32 px with narrow networks: a short run, an exact resume,
crash-safe checkpoints, a diverged run, bad input, and two processes under torchrun (gloo)."""
import datetime
import errno
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import losses
import model
import train_gan
import training
import weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "demo", "--demo-length", "24", "--num-classes", "3", "--resolution", "32", "--max-channels", "16",
        "--style-dim", "32", "--n-mlp", "2", "--batch", "2", "--workers", "0", "--log-every", "0", "--grid", "4",
        "--r1-every", "4", "--pl-every", "2"]  # regularisers often, so a 20-step run exercises both


def run(tmp, *extra):
    train_gan.main(TINY + ["--out", str(tmp)] + list(extra))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def twenty_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run(out, "--iter", "20", "--snap-every", "10")  # a snapshot every 10 steps
    return out


def test_twenty_steps_finish_with_finite_losses_a_grid_and_a_checkpoint(twenty_steps):
    records = [json.loads(line) for line in open(twenty_steps / "log.jsonl")]
    assert records[-1]["step"] == 20
    seen = set()
    for record in records:
        for key in ("D_r", "D_m", "G", "G_r", "G_m", "G_fm", "R1_D_r", "R1_D_m", "PL", "img_per_s", "eta_hours"):
            if key in record:
                seen.add(key)
                assert math.isfinite(record[key]), (key, record)
    assert {"D_r", "D_m", "G", "R1_D_r", "R1_D_m", "PL"} <= seen
    assert sorted(os.listdir(twenty_steps)) == ["checkpoint-00000010.pt", "checkpoint-00000020.pt", "log.jsonl",
                                                "samples-00000010.png", "samples-00000020.png"]
    from PIL import Image
    grid = Image.open(twenty_steps / "samples-00000020.png")
    assert grid.width == grid.height * 4 * 3 // 1 // 1 or grid.width > grid.height  # 4 samples x (image|mask|overlay)
    ckpt = load(twenty_steps / "checkpoint-00000020.pt")
    assert ckpt["step"] == 20 and ckpt["num_classes"] == 3 and ckpt["image_channels"] == 3
    assert set(ckpt) >= {"G", "G_ema", "D_r", "D_m", "opt_G", "opt_D_r", "opt_D_m", "rng", "labeled_stream",
                         "unlabeled_stream", "mean_path_length", "args"}


def test_resume_continues_exactly(twenty_steps, tmp_path):
    run(tmp_path, "--iter", "10", "--snap-every", "10")
    assert (tmp_path / "checkpoint-00000010.pt").exists() and not (tmp_path / "checkpoint-00000020.pt").exists()
    stopped = load(tmp_path / "checkpoint-00000010.pt")
    stopped["elapsed"] = 1000.0  # as if the first ten steps had taken 1000 s: the resumed run counts on from there
    torch.save(stopped, tmp_path / "checkpoint-00000010.pt")
    run(tmp_path, "--iter", "20", "--snap-every", "10", "--resume", "auto")
    resumed, straight = load(tmp_path / "checkpoint-00000020.pt"), load(twenty_steps / "checkpoint-00000020.pt")
    for net in ("G", "G_ema", "D_r", "D_m"):
        for name, value in straight[net].items():
            torch.testing.assert_close(resumed[net][name], value, rtol=1e-5, atol=1e-6, msg=f"{net}.{name}")
    torch.testing.assert_close(resumed["mean_path_length"], straight["mean_path_length"])
    assert resumed["labeled_stream"] == straight["labeled_stream"]
    # and the resumed run logged from step 11 on, its elapsed seconds continuing the checkpoint's
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 21))
    assert all(r["elapsed"] < 1000 for r in records[:10]) and all(1000 < r["elapsed"] < 1300 for r in records[10:])
    assert resumed["elapsed"] > records[-1]["elapsed"]


def test_every_record_has_the_wall_clock_time_and_the_elapsed_seconds(twenty_steps):
    records = [json.loads(line) for line in open(twenty_steps / "log.jsonl")]
    stamps = [datetime.datetime.fromisoformat(r["time"]) for r in records]  # ISO 8601 with the UTC offset
    assert all(s.utcoffset() is not None for s in stamps) and stamps == sorted(stamps)
    written = datetime.datetime.fromtimestamp(os.path.getmtime(twenty_steps / "log.jsonl"), datetime.timezone.utc)
    assert abs((written - stamps[-1]).total_seconds()) < 2  # the time of the last record: when it was written
    elapsed = [r["elapsed"] for r in records]
    assert 0 < elapsed[0] and elapsed == sorted(elapsed)
    # elapsed is the time since the start: between two records as much as the clock says (stamps to the second)
    assert elapsed[-1] - elapsed[0] == pytest.approx((stamps[-1] - stamps[0]).total_seconds(), abs=1.01)
    assert load(twenty_steps / "checkpoint-00000020.pt")["elapsed"] >= elapsed[-1]


def test_tensorboard_gets_the_logged_numbers_and_the_sample_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, "--iter", "4", "--snap-every", "2", "--tensorboard")  # a snapshot every 2 steps
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    for key in ("D_r", "G", "R1_D_r", "mask_area", "img_per_s", "elapsed"):
        logged = {r["step"]: r[key] for r in records if key in r}
        assert logged and {e.step: e.value for e in events.Scalars(key)} == pytest.approx(logged, rel=1e-6), key
    grids = events.Images("samples")
    assert [e.step for e in grids] == [2, 4]
    shown = np.asarray(Image.open(io.BytesIO(grids[-1].encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(shown, np.asarray(Image.open(tmp_path / "samples-00000004.png").convert("RGB")))


def test_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # an import of either now fails, as when not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit) as exit:
        run(tmp_path, "--iter", "2", "--tensorboard")
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --tensorboard needs the tensorboard package: pip install tensorboard"]
    assert not list(tmp_path.glob("checkpoint-*")) and not list(tmp_path.glob("events.*"))


def test_a_checkpoint_write_killed_half_way_leaves_the_previous_one(tmp_path, monkeypatch):
    run(tmp_path, "--iter", "10", "--snap-every", "10")
    good = (tmp_path / "checkpoint-00000010.pt").read_bytes()
    real_save = torch.save

    def killed_half_way(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        f.truncate(f.tell() // 2)  # half the bytes are on disk when the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_half_way)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, "--iter", "20", "--snap-every", "10", "--resume", "auto")
    assert stop.value.code == 130
    assert (tmp_path / "checkpoint-00000010.pt").read_bytes() == good
    assert not (tmp_path / "checkpoint-00000020.pt").exists()
    # a temporary file left by a SIGKILL (no chance to clean up) is never taken for a checkpoint
    (tmp_path / "checkpoint-00000020.pt.tmp-999").write_bytes(good[: len(good) // 2])
    assert model.list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-00000010.pt")]


def test_a_diverged_run_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    run(tmp_path, "--iter", "4", "--snap-every", "4")
    good = (tmp_path / "checkpoint-00000004.pt").read_bytes()
    real_loss = train_gan.losses.d_logistic_loss
    monkeypatch.setattr(train_gan.losses, "d_logistic_loss", lambda r, f: real_loss(r, f) * float("nan"))
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, "--iter", "8", "--snap-every", "4", "--resume", "auto")
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged" in err[0] and "D_r" in err[0]
    assert (tmp_path / "checkpoint-00000004.pt").read_bytes() == good
    assert model.list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-00000004.pt")]


@pytest.mark.parametrize("case", ["missing data", "missing checkpoint", "corrupt checkpoint", "other architecture"])
def test_bad_input_ends_in_one_line(tmp_path, case):
    args = TINY + ["--out", str(tmp_path), "--iter", "2"]
    if case == "missing data":
        args[args.index("demo")] = str(tmp_path / "nowhere")
    elif case == "missing checkpoint":
        args += ["--resume", str(tmp_path / "nothing.pt")]
    elif case == "corrupt checkpoint":
        (tmp_path / "checkpoint-00000002.pt").write_bytes(b"not a checkpoint")
        args += ["--resume", "auto"]
    else:
        subprocess.run([sys.executable, "train_gan.py"] + args, cwd=ROOT, check=True, capture_output=True)
        args[args.index("--max-channels") + 1] = "8"
        args += ["--resume", "auto", "--iter", "4"]
    result = subprocess.run([sys.executable, "train_gan.py"] + args, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    expected = {"missing data": "nowhere", "missing checkpoint": "nothing.pt", "corrupt checkpoint": "cannot be read",
                "other architecture": "--max-channels"}[case]
    assert expected in lines[0]


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import train_gan, training
args = train_gan.parse_args({argv!r})
rank, world, device = training.setup_distributed()
nets = train_gan._train(args, rank, world, device)
torch.save({{name: net.state_dict() for name, net in nets.items()}}, f"{{args.out}}/rank{{rank}}.pt")
dist.destroy_process_group()
"""


def test_torchrun_two_processes_agree_on_the_weights(tmp_path):
    argv = TINY + ["--out", str(tmp_path), "--iter", "6", "--snap-every", "3"]
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(root=ROOT, argv=argv))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "4 global" in result.stdout
    rank0, rank1 = load(tmp_path / "rank0.pt"), load(tmp_path / "rank1.pt")
    for net in rank0:
        for name, value in rank0[net].items():
            torch.testing.assert_close(rank1[net][name], value, rtol=0, atol=0, msg=f"{net}.{name}")
    # the weights moved: training happened on both ranks
    initial = train_gan.build_networks(train_gan.parse_args(argv), 3, 3, torch.device("cpu"))[0]
    assert any(not torch.equal(initial.state_dict()[k], v) for k, v in rank0["G"].items() if "noise_" not in k)
    ckpt = load(tmp_path / "checkpoint-00000006.pt")
    assert len(ckpt["rng"]) == 2


def test_bf16_autocast_path_trains(tmp_path):
    """The mixed-precision code path (bf16 autocast; CPU autocast here) runs every step kind with finite losses."""
    run(tmp_path, "--iter", "4", "--precision", "bf16")
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert records[-1]["step"] == 4
    assert all(math.isfinite(v) for r in records for k, v in r.items() if isinstance(v, float))
    assert any("R1_D_m" in r for r in records) and any("PL" in r for r in records)


def test_kimg_budget_counts_global_images():
    args = train_gan.parse_args(TINY + ["--kimg", "0.1"])
    assert args.iter == 50  # 100 images at batch 2 on one process


# ----------------------------------------------------------------------------------------------------
# One step, looked into: what D_m is fed, how many generator forwards, which R1


def one_step(step, *extra, classes=3, batch=None):
    """train_step on tiny networks from a fixed seed; returns (losses, G's mask outputs, D_m's mask inputs)."""
    args = train_gan.parse_args(TINY + list(extra))
    torch.manual_seed(0)
    random.seed(0)  # style mixing's coin
    device = torch.device("cpu")
    G, G_ema, D_r, D_m = train_gan.build_networks(args, 3, classes, device)
    optimizers = train_gan.build_optimizers(args, G, D_r, D_m)
    autocast, _ = model.make_autocast(args, device)
    state = {"G_ema": G_ema, "mean_path_length": torch.zeros(())}
    generated, seen = [], []
    G.register_forward_hook(lambda module, inputs, output: generated.append(output[1].detach()))
    D_m.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[1].detach()))
    one_step.images, one_step.fakes, one_step.d_r_images = [], [], []
    D_m.register_forward_pre_hook(lambda module, inputs: one_step.images.append(inputs[0].detach()))
    G.register_forward_hook(lambda module, inputs, output: one_step.fakes.append(output[0].detach()))
    D_r.register_forward_pre_hook(lambda module, inputs: one_step.d_r_images.append(inputs[0].detach()))
    batch = batch or (torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randint(0, classes, (2, 32, 32)))
    out = train_gan.train_step(step, (G, D_r, D_m), optimizers, batch, args, state, autocast)
    one_step.nets = (G, D_r, D_m)
    return out, generated, seen, batch[2]


@pytest.mark.parametrize("dm_mask", ["logits", "probabilities"])
@pytest.mark.parametrize("shared", [True, False])
def test_d_m_is_fed_as_asked_from_one_or_two_generator_forwards(dm_mask, shared):
    extra = ["--dm-mask", dm_mask] + ([] if shared else ["--no-shared-fakes"])
    _, generated, seen, masks = one_step(1, *extra)  # step 1: neither R1 nor path length
    assert len(generated) == (2 if shared else 3)  # the D steps' fakes (once or twice), the G step's
    real, fake_d, fake_g, real_g = seen  # D step: real then fake; G step: fake then real (no grad)
    as_seen = (lambda logits: logits) if dm_mask == "logits" else (lambda logits: torch.softmax(logits, 1))
    torch.testing.assert_close(fake_d, as_seen(generated[1 if not shared else 0]))
    torch.testing.assert_close(fake_g, as_seen(generated[-1]))
    low = -1.0 if dm_mask == "logits" else 0.0
    assert set(real.unique().tolist()) == {low, 1.0} and torch.equal(real, real_g)
    assert torch.equal(real.argmax(1), masks)
    if dm_mask == "logits":
        assert fake_d.min() < 0  # raw logits, not probabilities


@pytest.mark.parametrize("dm_mask", ["logits", "probabilities"])
def test_dm_mismatched_shows_d_m_each_real_image_with_another_ones_mask_as_a_fake(dm_mask, monkeypatch):
    judged = []
    monkeypatch.setattr(losses, "d_hinge_loss_mismatched",
                        lambda real, fake, mismatched: judged.append((real, fake, mismatched)) or torch.zeros((), requires_grad=True))
    out, _, seen, masks = one_step(4, "--dm-mask", dm_mask, "--dm-mismatched")  # an R1 step: D_m_fit logged
    real, fake_d, mismatched = seen[:3]  # D step: real, generated, then the mismatched pairs
    assert torch.equal(mismatched, real.roll(1, 0)) and not torch.equal(mismatched, real)  # two images: swapped
    assert torch.equal(mismatched.argmax(1), masks.roll(1, 0))
    assert len(judged) == 1 and out["D_m"] == 0  # the D_m step's loss is the mismatched one, fed D_m's outputs
    real_outputs, _, mismatched_outputs = judged[0]
    assert len(real_outputs) == len(mismatched_outputs) == 3  # all of D_m's scales
    # D_m_fit, logged every --r1-every steps: the mean logit of the real pairs minus the mismatched ones',
    # averaged over the scales
    fit = (losses.d_m_score(real_outputs) - losses.d_m_score(mismatched_outputs)) / 3
    torch.testing.assert_close(out["D_m_fit"], fit)
    out, _, _, _ = one_step(1, "--dm-mask", dm_mask, "--dm-mismatched")
    assert "D_m_fit" not in out


def slow_look_augment(images, u, noise, strength=1.0):
    """train_gan.look_augment written out per image and pixel in float64, from its random draws."""
    images, u, noise = images.double().numpy(), u.double().numpy().reshape(-1, 4), noise.double().numpy()
    B, C, H, W = images.shape
    out = np.empty_like(images)
    radius = max(1, math.ceil(3 * strength * H / 64))
    for b in range(B):
        x = ((images[b] + 1) / 2).clip(1e-4, None) ** (2 ** (strength * (2 * u[b, 0] - 1)))
        x = x.mean() + (x - x.mean()) * 2 ** (strength * (2 * u[b, 1] - 1))
        sigma = max(strength * u[b, 2] * H / 64, 1e-3)
        taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
        taps /= taps.sum()
        reflect = lambda i, n: -i if i < 0 else (2 * (n - 1) - i if i >= n else i)  # noqa: E731
        blurred = np.zeros_like(x)
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    blurred[c, i, j] = sum(taps[a + radius] * taps[k + radius] * x[c, reflect(i + a, H), reflect(j + k, W)]
                                           for a in range(-radius, radius + 1) for k in range(-radius, radius + 1))
        out[b] = (blurred + 0.05 * strength * u[b, 3] * noise[b]) * 2 - 1
    return torch.from_numpy(out)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_look_augment_against_a_slow_reference(strength):
    images = torch.rand(3, 2, 32, 32) * 2 - 1
    torch.manual_seed(5)
    looked = train_gan.look_augment(images, strength)
    torch.manual_seed(5)  # the same draws: four uniforms per image, then the noise
    u = torch.rand(3, 4, 1, 1, 1)
    noise = torch.randn(3, 2, 32, 32)
    torch.testing.assert_close(looked.double(), slow_look_augment(images, u, noise, strength), atol=1e-5, rtol=0)
    assert not torch.allclose(looked, images, atol=0.05)
    torch.testing.assert_close(train_gan.look_augment(images, 0.0), images, atol=1e-3, rtol=0)  # strength 0: none


def test_dm_look_augment_changes_the_images_d_m_sees_and_nothing_else(monkeypatch):
    monkeypatch.setattr(train_gan, "look_augment", lambda images: images + 10)  # a mark on every image it changes
    batch = (torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32)))
    for extra, mark in (([], 0), (["--dm-look-augment"], 10)):
        one_step(4, "--dm-mismatched", *extra, batch=batch)  # an R1 step: D_m's R1 sees the real images too
        seen, fakes = one_step.images, one_step.fakes
        # D_m: real, generated, mismatched (the real images with the other's mask), R1's real, then the G step's
        # generated and real; the shared fakes are G's first output, the G step's its second
        assert len(seen) == 6
        for images in (seen[0], seen[2], seen[3], seen[5]):
            torch.testing.assert_close(images, batch[1] + mark)
        torch.testing.assert_close(seen[1], fakes[0] + mark)
        torch.testing.assert_close(seen[4], fakes[1] + mark)
        assert all(images.abs().max() < 9 for images in one_step.d_r_images)  # D_r: real and generated, unmarked
        assert len(one_step.d_r_images) == 4  # D step real and fake, R1, G step


def test_the_first_line_says_what_d_m_sees(tmp_path, capsys):
    run(tmp_path / "plain", "--iter", "1")
    assert "; D_m sees mask logits\n" in capsys.readouterr().out
    run(tmp_path / "look", "--iter", "1", "--dm-mask", "probabilities", "--dm-look-augment")
    assert "; D_m sees mask probabilities, the look augmented\n" in capsys.readouterr().out
    run(tmp_path / "mismatched", "--iter", "1", "--dm-mismatched")
    assert "; D_m sees mask logits, mismatched pairs\n" in capsys.readouterr().out


def test_mismatched_partners_are_other_images_by_identity():
    assert train_gan.mismatched_partners(torch.tensor([5, 5, 7, 7])).tolist() == [3, 3, 1, 1]
    assert train_gan.mismatched_partners(torch.tensor([3, 4, 5, 6])).tolist() == [3, 0, 1, 2]  # rolled by one
    assert train_gan.mismatched_partners(torch.tensor([2, 2, 2])).tolist() == [-1, -1, -1]
    assert train_gan.mismatched_partners(torch.tensor([9])).tolist() == [-1]


class Numbered(torch.utils.data.Dataset):
    """Labeled pair i: an image of constant value i / 10 and a mask of class i % 3 everywhere but one pixel
    per image (so that each pair's mask is its own)."""

    def __init__(self, count):
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, key):
        i = key[0] if isinstance(key, (tuple, list)) else key
        mask = torch.full((32, 32), i % 3, dtype=torch.long)
        mask[0, i] = (i + 1) % 3
        return torch.full((3, 32, 32), i / 10), mask


def test_with_4_labels_at_batch_16_no_mismatched_pair_is_an_image_with_its_own_mask():
    stream = data.InfiniteLoader(Numbered(4), 16, seed=0, workers=0)
    images, masks = next(stream)
    ids = stream.indices
    assert len(ids) == 16 and set(ids.tolist()) == {0, 1, 2, 3}
    assert torch.equal(images[:, 0, 0, 0], ids.float() / 10)  # the indices are the images'
    batch = (torch.randn(16, 3, 32, 32), images, masks, ids)
    out, _, seen, _ = one_step(4, "--dm-mismatched", "--batch", "16", batch=batch)
    mismatched_images, mismatched_masks = one_step.images[2], seen[2].argmax(1)
    assert len(mismatched_images) == 16  # every image has a partner
    for image, mask in zip(mismatched_images, mismatched_masks):
        image_id = round(image[0, 0, 0].item() * 10)
        mask_id = int(mask[0].ne(mask[0, -1]).nonzero()[0])  # the one pixel that names the mask's pair
        assert image_id != mask_id
    assert torch.isfinite(out["D_m_fit"])
    # one image over the whole batch: no mismatched pair, so neither the term nor D_m_fit
    same = (torch.randn(2, 3, 32, 32), images[:1].repeat(2, 1, 1, 1), masks[:1].repeat(2, 1, 1), ids[:1].repeat(2))
    out, _, seen, _ = one_step(4, "--dm-mismatched", batch=same)
    assert "D_m_fit" not in out and len(seen) == 2 + 1 + 2  # D step: real, fake; R1; G step: fake, real


def test_without_dm_mismatched_d_m_sees_no_third_pair_and_d_m_fit_is_measured_without_changing_training(monkeypatch):
    _, _, seen, _ = one_step(1)
    assert len(seen) == 4  # D step: real, generated; G step: generated, real
    out, _, seen, masks = one_step(4)  # an R1 step: D_m_fit is measured on the mismatched pairs
    assert len(seen) == 6 and torch.equal(seen[2].argmax(1), masks.roll(1, 0)) and torch.isfinite(out["D_m_fit"])
    measured = {k: v.clone() for k, v in one_step.nets[2].state_dict().items()}  # spectral norm's vectors too
    monkeypatch.setattr(train_gan, "mismatched_logits_for_the_log", lambda *args: None)
    out, _, _, _ = one_step(4)
    assert "D_m_fit" not in out
    for name, value in one_step.nets[2].state_dict().items():
        assert torch.equal(value, measured[name]), name


@pytest.mark.parametrize("binary", ["sigmoid", "softmax"])
def test_a_binary_task_has_one_mask_channel_as_the_official_code_or_two(binary):
    """Two classes (background and one foreground): by default the official one channel, its raw logit for
    D_m against the real mask in {-1, +1}; --binary softmax keeps two channels, one-hot."""
    _, generated, seen, masks = one_step(1, "--binary", binary, classes=2)
    channels = 1 if binary == "sigmoid" else 2
    assert all(g.shape[1] == channels for g in generated) and all(s.shape[1] == channels for s in seen)
    real, fake_d = seen[0], seen[1]
    if binary == "sigmoid":
        assert torch.equal(real[:, 0], (masks > 0).float() * 2 - 1)
        torch.testing.assert_close(fake_d, generated[0])
    else:
        assert torch.equal(real.argmax(1), masks) and set(real.unique().tolist()) == {-1.0, 1.0}


def test_a_binary_run_keeps_its_form_on_resume(tmp_path, capsys):
    binary = ["--num-classes", "2"]  # the last --num-classes counts
    train_gan.main(TINY + binary + ["--out", str(tmp_path), "--iter", "2", "--snap-every", "2"])
    ckpt = load(tmp_path / "checkpoint-00000002.pt")
    assert (ckpt["num_classes"], ckpt["mask_channels"]) == (2, 1) and ckpt["args"]["binary"] == "sigmoid"
    assert ckpt["G_ema"]["t_seg.0.bias"].shape == (1,)
    assert "2 classes (one sigmoid mask channel)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        train_gan.main(TINY + binary + ["--out", str(tmp_path), "--iter", "4", "--resume", "auto",
                                        "--binary", "softmax"])
    err = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code == 2 and len(err) == 1 and "pass --binary sigmoid to resume" in err[0], err


# ----------------------------------------------------------------------------------------------------
# What long runs on clusters meet: preemption, bad files in a big pool, a changed pool, a full disk


def signal_after(monkeypatch, at_step, signum):
    """Make train_step send this process `signum` after step index `at_step`, as a scheduler would."""
    real_step = train_gan.train_step

    def step_then_signal(step, *args, **kwargs):
        result = real_step(step, *args, **kwargs)
        if step == at_step:
            os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(train_gan, "train_step", step_then_signal)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_step_with_a_checkpoint_and_the_resume_is_exact(twenty_steps, tmp_path, monkeypatch,
                                                                           capsys, signum):
    before = signal.getsignal(signum)
    signal_after(monkeypatch, 6, signum)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, "--iter", "20", "--snap-every", "10")
    assert stop.value.code == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"stopped by {signal.Signals(signum).name} at step 7: checkpoint "
                   f"{tmp_path / 'checkpoint-00000007.pt'} written; continue with --resume auto"]
    assert model.list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-00000007.pt")]
    assert signal.getsignal(signum) == before  # the handlers are put back
    monkeypatch.undo()
    run(tmp_path, "--iter", "20", "--snap-every", "10", "--resume", "auto")
    resumed, straight = load(tmp_path / "checkpoint-00000020.pt"), load(twenty_steps / "checkpoint-00000020.pt")
    for net in ("G", "G_ema", "D_r", "D_m"):
        for name, value in straight[net].items():
            torch.testing.assert_close(resumed[net][name], value, rtol=1e-5, atol=1e-6, msg=f"{net}.{name}")
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == list(range(1, 21))


def test_a_step_that_never_ends_still_stops_on_sigterm(tmp_path, monkeypatch, capsys):
    """A step that cannot start or finish (a data stream that never delivers, as --batch -2 once made) must
    not leave the process deaf to SIGTERM: the watchdog stops it without a checkpoint, the last one intact."""
    monkeypatch.setattr(training.StopOnSignal, "GRACE", 0.5)
    real_step = train_gan.train_step

    def signal_then_hang(step, *args, **kwargs):
        if step == 4:  # after the step-4 checkpoint
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                time.sleep(0.01)
            raise AssertionError("the watchdog did not stop a step that never ends")
        return real_step(step, *args, **kwargs)

    monkeypatch.setattr(train_gan, "train_step", signal_then_hang)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, "--iter", "20", "--snap-every", "4")
    assert stop.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stopped by SIGTERM: the step under way had not ended"), err
    assert "no checkpoint was written" in err[0]
    assert model.list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-00000004.pt")]
    assert load(tmp_path / "checkpoint-00000004.pt")["step"] == 4


def test_agreement_is_immediate_for_one_process():
    agree = training.Agreement(1, torch.device("cpu"), 2)
    assert agree(None, True) == (False, True) and agree(signal.SIGTERM, False) == (True, False)


SIGNAL_SCRIPT = """
import os, signal, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import train_gan, training
args = train_gan.parse_args({argv!r})
rank, world, device = training.setup_distributed()
real_step = train_gan.train_step
def step_then_signal(step, *a, **k):
    result = real_step(step, *a, **k)
    if rank == 1 and step == {at_step}:  # only rank 1 is signalled
        os.kill(os.getpid(), signal.SIGTERM)
    return result
if {signal_rank_1}:
    train_gan.train_step = step_then_signal
try:
    nets = train_gan._train(args, rank, world, device)
    torch.save({{name: net.state_dict() for name, net in nets.items()}}, f"{{args.out}}/rank{{rank}}.pt")
except training.Stopped as stopped:
    open(f"{{args.out}}/stopped{{rank}}.txt", "w").write(str(stopped))
dist.destroy_process_group()
"""


def torchrun(tmp_path, script_name, argv, signal_rank_1, at_step=2):
    script = tmp_path / script_name
    script.write_text(SIGNAL_SCRIPT.format(root=ROOT, argv=argv, at_step=at_step, signal_rank_1=signal_rank_1))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_under_torchrun_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path):
    """Rank 1 alone is signalled after step index 2; the ranks agree one step later and both stop after
    step 4 with one checkpoint; resumed, the run equals one never stopped."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    argv = TINY + ["--iter", "7", "--snap-every", "500"]  # no snapshot but the last
    torchrun(tmp_path, "a.py", argv + ["--out", str(straight)], signal_rank_1=False)
    torchrun(tmp_path, "b.py", argv + ["--out", str(stopped)], signal_rank_1=True)
    texts = [(stopped / f"stopped{rank}.txt").read_text() for rank in (0, 1)]
    assert "at step 4:" in texts[0] and "a signal to another process" in texts[0]
    assert "stopped by SIGTERM at step 4:" in texts[1]
    assert model.list_checkpoints(str(stopped)) == [str(stopped / "checkpoint-00000004.pt")]
    torchrun(tmp_path, "c.py", argv + ["--out", str(stopped), "--resume", "auto"], signal_rank_1=False)
    for rank in (0, 1):
        resumed, reference = load(stopped / f"rank{rank}.pt"), load(straight / f"rank{rank}.pt")
        for net in ("G", "G_ema", "D_r", "D_m"):
            for name, value in reference[net].items():
                torch.testing.assert_close(resumed[net][name], value, rtol=1e-5, atol=1e-6, msg=f"{net}.{name}")


def make_pool(root, count, start=0):
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")


@pytest.fixture
def folders(tmp_path):
    """A pool of 16 images and 4 labeled pairs (classes 0-2) at 32 px."""
    pool, labeled = tmp_path / "pool", tmp_path / "labeled"
    for folder in (pool, labeled / "images", labeled / "masks"):
        folder.mkdir(parents=True)
    make_pool(pool, 16)
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(labeled / f"images/p{i}.png")
        Image.fromarray(rng.integers(0, 3, (32, 32), dtype=np.uint8)).save(labeled / f"masks/p{i}.png")
    return pool, labeled


def folder_args(folders, out, *extra):
    pool, labeled = folders
    tiny = [a for a in TINY]
    tiny[tiny.index("demo")] = str(pool)
    tiny = tiny[:tiny.index("--demo-length")] + tiny[tiny.index("--demo-length") + 2:]
    return tiny + ["--labeled-dir", str(labeled), "--out", str(out)] + list(extra)


def test_unreadable_pool_images_are_replaced_counted_and_named_up_to_a_limit(folders, tmp_path, monkeypatch):
    pool, _ = folders
    (pool / "000-corrupt.png").write_bytes(b"no image here")  # first in the list: met when guessing channels
    real_build = train_gan.data.build_datasets

    def build_then_delete(*args, **kwargs):  # a file removed after the pool was listed
        built = real_build(*args, **kwargs)
        (pool / "007.png").unlink(missing_ok=True)
        return built

    monkeypatch.setattr(train_gan.data, "build_datasets", build_then_delete)
    # 21 images (16 + the corrupt one + 4 labeled): 12 steps of 2 go through every image at least once
    command = [sys.executable, "train_gan.py"]
    argv = folder_args(folders, tmp_path / "run", "--iter", "24", "--snap-every", "500", "--max-unreadable", "0.1")
    train_gan.main(argv)
    records = [json.loads(line) for line in open(tmp_path / "run/log.jsonl")]
    assert records[-1]["step"] == 24 and records[-1]["unreadable_images"] == 2
    assert load(tmp_path / "run/checkpoint-00000024.pt")["unlabeled_stream"]["unreadable"].keys() == {
        str(pool / "000-corrupt.png"), str(pool / "007.png")}
    # as a user sees it: the warnings name the files; past the limit (1% of 21: one file) one error line
    (pool / "008-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a second bad file; 007.png is gone
    result = subprocess.run(command + folder_args(folders, tmp_path / "strict", "--iter", "24", "--snap-every", "500"),
                            cwd=ROOT, capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("warning: 1 unreadable image(s) skipped while guessing the channels") \
        and "000-corrupt.png" in lines[0]
    assert any(line.startswith("warning: ") and "replaced by another image of the pool" in line for line in lines)
    assert [line for line in lines if line.startswith("error: ")] == [lines[-1]]
    assert "2 of the 21 images of the unlabeled pool are unreadable" in lines[-1] and "--max-unreadable" in lines[-1]


def test_a_changed_pool_is_refused_unless_new_data_is_asked_for(folders, tmp_path, capsys):
    pool, _ = folders
    out = tmp_path / "run"
    train_gan.main(folder_args(folders, out, "--iter", "4", "--snap-every", "4"))
    with pytest.raises(SystemExit) as refused:
        train_gan.main(folder_args(folders, tmp_path / "fresh", "--iter", "4", "--new-data"))
    assert refused.value.code == 2 and "--new-data continues a run" in capsys.readouterr().err
    make_pool(pool, 5, start=16)  # the user adds images
    with pytest.raises(SystemExit) as refused:
        train_gan.main(folder_args(folders, out, "--iter", "8", "--snap-every", "4", "--resume", "auto"))
    err = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code == 2 and len(err) == 1
    assert "unlabeled pool stream was saved with length 20 and is resumed with 25" in err[0] and "--new-data" in err[0]
    before = load(out / "checkpoint-00000004.pt")
    train_gan.main(folder_args(folders, out, "--iter", "8", "--snap-every", "4", "--resume", "auto", "--new-data"))
    assert "resumed from" in capsys.readouterr().out
    after = load(out / "checkpoint-00000008.pt")
    assert after["step"] == 8 and after["unlabeled_stream"]["length"] == 25
    assert after["unlabeled_stream"]["seed"] == 1 + 7919 * 4  # a fresh stream, seeded by the step
    # the optimisers kept their state: 4 more steps add as many Adam steps again (G steps + path-length steps)
    assert after["opt_G"]["state"][0]["step"] == 2 * before["opt_G"]["state"][0]["step"]
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == list(range(1, 9))


def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    run(tmp_path, "--iter", "4", "--snap-every", "4")
    good = (tmp_path / "checkpoint-00000004.pt").read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, "--iter", "12", "--snap-every", "4", "--resume", "auto")
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert "cannot write" in err[0] and "checkpoint-00000008.pt" in err[0] and "No space left" in err[0]
    assert f"the previous checkpoint {tmp_path / 'checkpoint-00000004.pt'} is intact" in err[0]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-00000004.pt"]  # no temporary file
    assert (tmp_path / "checkpoint-00000004.pt").read_bytes() == good
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")][-1] == 8  # it went no further


def test_an_unwritable_out_stops_before_training(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as stop:
        run(tmp_path / "a_file" / "run", "--iter", "2")
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "--out" in err[0] and "cannot write there" in err[0]


def test_an_unreadable_labeled_image_still_stops_the_run_at_once(folders, tmp_path):
    _, labeled = folders
    (labeled / "images/p2.png").write_bytes(b"no image here")
    argv = folder_args(folders, tmp_path / "run", "--iter", "8", "--max-unreadable", "0.5", "--channels", "3")
    result = subprocess.run([sys.executable, "train_gan.py"] + argv, cwd=ROOT, capture_output=True, text=True)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and "p2.png" in errors[0] and "not a readable image" in errors[0]


# ----------------------------------------------------------------------------------------------------
# Mask quality without an encoder: area and connected regions against the labeled masks'


def flood_fill_regions(mask):
    """4-connected regions of a boolean numpy mask, by breadth-first search (the obvious slow way)."""
    seen, regions = np.zeros_like(mask, dtype=bool), 0
    H, W = mask.shape
    for y in range(H):
        for x in range(W):
            if mask[y, x] and not seen[y, x]:
                regions += 1
                queue = [(y, x)]
                seen[y, x] = True
                while queue:
                    a, b = queue.pop()
                    for c, d in ((a - 1, b), (a + 1, b), (a, b - 1), (a, b + 1)):
                        if 0 <= c < H and 0 <= d < W and mask[c, d] and not seen[c, d]:
                            seen[c, d] = True
                            queue.append((c, d))
    return regions


def test_mask_parts_counts_the_regions_a_flood_fill_finds():
    g = torch.Generator().manual_seed(0)
    masks = torch.cat([torch.rand(8, 23, 17, generator=g) < p for p in (0.1, 0.4, 0.55, 0.7, 0.95)])
    masks[0] = False  # an empty mask has no region
    masks[1] = True
    masks[2] = False
    masks[2, 3:10, 2:5] = masks[2, 12:20, 8:15] = True
    masks[2, 5, 8:15] = True  # a bar touching nothing: 3 regions
    masks[3] = torch.eye(23, 17, dtype=torch.bool)  # a diagonal: only 8-connected, 17 regions in 4-connectivity
    want = [flood_fill_regions(m.numpy()) for m in masks]
    assert want[:4] == [0, 1, 3, 17]
    assert train_gan.mask_parts(masks).tolist() == want


def test_mask_statistics_by_hand():
    maps = torch.zeros(3, 8, 8, dtype=torch.long)
    maps[0, :2, :2] = 1
    maps[0, 5:, 5:] = 1  # class 1: two regions, 4 + 9 pixels
    maps[1, 4, :] = 1  # one region, 8 pixels
    maps[2, 1:3, 1:3] = 2  # class 2 only here, 4 pixels, one region
    maps[2, 4:8, 3:8] = 3
    maps[2, 5, 4] = maps[2, 6, 6] = 0  # two holes in class 3: the background has three regions there
    area, parts, background = train_gan.mask_statistics(maps, 5)
    torch.testing.assert_close(area, torch.tensor([21 / 192, 4 / 192, 18 / 192, 0.0]))
    assert parts.tolist() == [1.5, 1.0, 1.0, 0.0]  # class 4 occurs nowhere: no region
    assert background == pytest.approx((1 + 2 + 3) / 3)  # the bar of mask 1 cuts its background in two


def test_mask_quality_is_one_against_the_generators_own_masks_and_follows_a_shrinking_mask():
    G = model.Generator(32, num_classes=3, image_channels=1, style_dim=32, n_mlp=2, max_channels=16).eval()
    latents = torch.randn(12, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        maps = model.mask_classes(G(latents, randomize_noise=False)[1])
    own = train_gan.mask_statistics(maps, 3)
    quality = train_gan.mask_quality(G, latents, 5, own)  # in chunks of 5: the same masks
    assert [quality[k].item() for k in ("mask_area", "mask_parts", "mask_holes")] == pytest.approx([1, 1, 1])
    doubled = (own[0] * 2, own[1] / 3, own[2] / 4)  # labels twice as large, in a third of the regions, fewer holes
    quality = train_gan.mask_quality(G, latents, 12, doubled)
    assert [quality[k].item() for k in ("mask_area", "mask_parts", "mask_holes")] == pytest.approx([0.5, 3, 4])


def test_mask_quality_is_logged_at_every_snapshot(twenty_steps):
    records = [json.loads(line) for line in open(twenty_steps / "log.jsonl")]
    logged = {r["step"]: (r["mask_area"], r["mask_parts"], r["mask_holes"]) for r in records if "mask_area" in r}
    assert sorted(logged) == [10, 20]
    assert all(math.isfinite(v) and v >= 0 for values in logged.values() for v in values)


# ----------------------------------------------------------------------------------------------------
# Nothing a user types loses a checkpoint


def test_a_collapsed_mask_branch_is_logged_warned_of_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """No labeled class in any generated mask: mask_parts is 0 (no region), not NaN, each snapshot prints the
    warning (its warm-up set to 0 kimg: a test cannot train 4), and neither it nor any measurement stops the run or
    the checkpoint a SIGTERM asks for."""
    monkeypatch.setattr(model, "mask_classes", lambda logits: torch.zeros(logits.shape[0], *logits.shape[2:],
                                                                         dtype=torch.long, device=logits.device))
    monkeypatch.setattr(train_gan, "MASK_BAND_AFTER_KIMG", 0.0)
    signal_after(monkeypatch, 5, signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, "--iter", "20", "--snap-every", "4")
    assert stop.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "checkpoint" in err and (tmp_path / "checkpoint-00000006.pt").is_file()
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    collapsed = [r for r in records if "mask_area" in r]
    assert [r["step"] for r in collapsed] == [4, 6] and all(r["mask_area"] == 0 and r["mask_parts"] == 0
                                                            for r in collapsed)
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    # no region at all: no area, and parts 0 are no excess; both remedies named
    assert len(warnings) == 2 and all("range (mask_area 0.00;" in w and "--dm-mask probabilities" in w
                                      and "--dm-look-augment" in w for w in warnings)
    assert "at 0.0 kimg" in warnings[0]  # step 4 of batch 2: 0.008 kimg


@pytest.mark.parametrize("kimg, area, parts, holes, warned", [
    (4.8, 0.70, 10.74, 9.77, ["mask_parts", "mask_holes"]),  # the official input's break-up (issue 36)
    (8.0, 0.27, 5.42, 1.55, ["mask_area", "mask_parts", "mask_holes"]),  # shrunk to a fifth of the labels' area
    (24.0, 0.73, 1.55, 1.30, ["mask_parts"]),  # the mixed pool's later drift: half the grid off the lungs
    (43.2, 1.07, 1.73, 2.16, ["mask_parts", "mask_holes"]),
    (4.8, 1.07, 1.08, 0.96, []),  # probabilities + mismatched, lungs in every grid sample
    (24.0, 1.00, 0.90, 0.96, []),  # a pool of the labels' source at 24 kimg
    (6.0, 0.61, 1.17, 0.92, []),  # the README's demo at its end
    (4.0, 0.97, 1.50, 0.97, []),  # the demo at 4 kimg: still forming, and at the band's edge
    (1.6, 1.47, 1.51, 4.18, []),  # every run is outside before 4 kimg, healthy ones too
    (20.0, float("nan"), 1.0, 1.0, ["mask_area"]),
])
def test_the_mask_warning_names_what_left_the_labels_range(kimg, area, parts, holes, warned):
    measured = {"mask_area": torch.tensor(area), "mask_parts": torch.tensor(parts), "mask_holes": torch.tensor(holes)}
    warning = train_gan.mask_warning(measured, kimg)
    if not warned:
        assert warning is None
    else:
        named = warning[warning.index("(") + 1:warning.index(";")]
        assert [part.split()[0] for part in named.split(", ")] == warned and f"at {kimg:.1f} kimg" in warning


def test_a_warning_goes_to_the_console_and_to_tensorboard(tmp_path, capsys):
    class Writer:  # what Progress uses of a SummaryWriter
        texts = []

        def add_text(self, tag, text, step):
            self.texts.append((tag, text, step))

        def flush(self):
            pass

    progress = training.Progress(str(tmp_path / "log.jsonl"), 2, 10, 0, torch.device("cpu"), tensorboard=Writer())
    progress.warn("masks off the lungs", 7)
    assert capsys.readouterr().err == "warning: masks off the lungs\n"
    assert Writer.texts == [("warnings", "masks off the lungs", 7)]


def test_a_measurement_that_is_not_finite_is_logged_as_null_and_a_loss_still_stops(tmp_path):
    progress = training.Progress(str(tmp_path / "log.jsonl"), 2, 10, 0, torch.device("cpu"))
    progress.add({"D_r": torch.tensor(0.5)})
    progress.add({"mask_parts": torch.tensor(float("nan"))}, measured=True)
    progress.report(1, 0, 1)
    record = json.loads(open(tmp_path / "log.jsonl").read())
    assert record["mask_parts"] is None and record["D_r"] == 0.5
    progress.add({"D_r": torch.tensor(float("nan"))})
    with pytest.raises(training.TrainingError, match="D_r became nan"):
        progress.report(2, 0, 1)


def test_the_watchdog_never_fires_inside_a_snapshot(tmp_path, monkeypatch, capsys):
    """SIGTERM during a slow regular snapshot (longer than the watchdog's grace): the snapshot is written
    whole, and the run stops with a checkpoint at the end of the next step."""
    monkeypatch.setattr(training.StopOnSignal, "GRACE", 0.3)
    real_save = training.save_checkpoint

    def slow_save(payload, path, keep):
        if payload["step"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.5)  # five times the grace, inside the write
        real_save(payload, path, keep)

    monkeypatch.setattr(training, "save_checkpoint", slow_save)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, "--iter", "20", "--snap-every", "4")
    assert stop.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"stopped by SIGTERM at step 5: checkpoint {tmp_path / 'checkpoint-00000005.pt'} written; "
                   "continue with --resume auto"]
    assert load(tmp_path / "checkpoint-00000004.pt")["step"] == 4


def test_the_watchdogs_interrupt_acts_only_while_a_step_is_under_way():
    stopper = training.StopOnSignal()
    try:
        stopper.GRACE = 0.2
        stopper.handler(signal.SIGTERM, None)  # the signal: the watchdog starts
        stopper.step_started()
        stopper.step_ended()  # the step ended before the watchdog's interrupt arrived: ignored
        stopper.fired = True
        stopper.handler(signal.SIGINT, None)
        stopper.step_started()
        with pytest.raises(training.Stopped, match="the step under way had not ended"):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        stopper.restore()


def test_a_rolled_back_run_is_followed_by_resume_auto_and_the_later_snapshots_are_kept_aside(tmp_path, capsys):
    run(tmp_path, "--iter", "6", "--snap-every", "2", "--keep", "2")  # checkpoints at 2, 4, 6; 4 and 6 kept
    abandoned = (tmp_path / "checkpoint-00000006.pt").read_bytes()
    run(tmp_path, "--iter", "6", "--snap-every", "1", "--keep", "2", "--resume",
        str(tmp_path / "checkpoint-00000004.pt"))  # back to 4, a checkpoint every step
    out = capsys.readouterr().out
    aside = tmp_path / "abandoned-after-00000004"
    assert f"moved to {aside}" in out
    assert (aside / "checkpoint-00000006.pt").read_bytes() == abandoned and (aside / "samples-00000006.png").is_file()
    assert [json.loads(line)["step"] for line in open(aside / "log.jsonl")] == [5, 6]
    assert model.list_checkpoints(str(tmp_path)) == [str(tmp_path / f"checkpoint-0000000{s}.pt") for s in (5, 6)]
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == list(range(1, 7))
    # --resume auto continues the run that went on, not the abandoned one
    run(tmp_path, "--iter", "7", "--snap-every", "1", "--keep", "2", "--resume", "auto")
    assert "resumed from " + str(tmp_path / "checkpoint-00000006.pt") in capsys.readouterr().out
    assert load(tmp_path / "checkpoint-00000007.pt")["step"] == 7


def test_a_fresh_run_never_writes_among_another_runs_checkpoints(tmp_path, capsys):
    run(tmp_path / "a", "--iter", "2", "--snap-every", "2")
    kept = (tmp_path / "a" / "checkpoint-00000002.pt").read_bytes()
    for extra in ([], ["--resume", str(tmp_path / "a" / "checkpoint-00000002.pt")]):
        target = tmp_path / "a" if not extra else tmp_path / "b"
        if extra:
            run(tmp_path / "b", "--iter", "2", "--snap-every", "2")
        with pytest.raises(SystemExit) as refused:
            run(target, "--iter", "4", "--snap-every", "2", *extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert refused.value.code == 2 and len(err) == 1 and "holds the checkpoints of another run" in err[0], err
    assert (tmp_path / "a" / "checkpoint-00000002.pt").read_bytes() == kept


@pytest.mark.parametrize("kind", ["official", "image-only export", "model.pt", "a tensor", "an encoder checkpoint"])
def test_resume_with_a_file_that_is_not_a_stage1_checkpoint_is_one_line(tmp_path, capsys, kind):
    run(tmp_path / "run", "--iter", "2", "--snap-every", "2")
    ckpt = load(tmp_path / "run" / "checkpoint-00000002.pt")
    path = tmp_path / "file.pt"
    if kind == "official":
        torch.save(weights.export_official(ckpt, "x"), path)
    elif kind == "image-only export":
        torch.save(weights.export_official(ckpt, "x", image_only=True), path)
    elif kind == "model.pt":
        torch.save({"format": model.BUNDLE_FORMAT, "G_ema": ckpt["G_ema"], "args": {}, "stage1_args": ckpt["args"]},
                   path)
    elif kind == "a tensor":
        torch.save(torch.zeros(3), path)
    else:
        torch.save({"stage": "encoder", "E": {}, "args": {}}, path)
    with pytest.raises(SystemExit) as refused:
        run(tmp_path / "new", "--iter", "4", "--resume", str(path))
    err = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code == 2 and len(err) == 1 and str(path) in err[0], err
    assert ("train_encoder.py --resume" if kind == "an encoder checkpoint" else f"--init {path}") in err[0]
    assert "--style-dim" not in err[0]


def test_out_inside_the_data_is_refused(folders, tmp_path, capsys):
    pool, labeled = folders
    for out in (pool / "run", labeled / "run", labeled):
        with pytest.raises(SystemExit) as refused:
            train_gan.main(folder_args(folders, out, "--iter", "2"))
        err = capsys.readouterr().err
        assert refused.value.code == 2 and "lies inside" in err and not (pool / "run").exists(), err
