"""train_gan.py end to end on the demo data at 32 px with narrow networks: a short run, an exact resume,
crash-safe checkpoints, a diverged run, bad input, and two processes under torchrun (gloo)."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import train_gan

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
    run(out, "--iter", "20", "--snap-kimg", "0.02")  # a snapshot every 10 steps
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
    run(tmp_path, "--iter", "10", "--snap-kimg", "0.02")
    assert (tmp_path / "checkpoint-00000010.pt").exists() and not (tmp_path / "checkpoint-00000020.pt").exists()
    run(tmp_path, "--iter", "20", "--snap-kimg", "0.02", "--resume", "auto")
    resumed, straight = load(tmp_path / "checkpoint-00000020.pt"), load(twenty_steps / "checkpoint-00000020.pt")
    for net in ("G", "G_ema", "D_r", "D_m"):
        for name, value in straight[net].items():
            torch.testing.assert_close(resumed[net][name], value, rtol=1e-5, atol=1e-6, msg=f"{net}.{name}")
    torch.testing.assert_close(resumed["mean_path_length"], straight["mean_path_length"])
    assert resumed["labeled_stream"] == straight["labeled_stream"]
    # and the resumed run logged from step 11 on
    steps = [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")]
    assert steps == list(range(1, 21))


def test_a_checkpoint_write_killed_half_way_leaves_the_previous_one(tmp_path, monkeypatch):
    run(tmp_path, "--iter", "10", "--snap-kimg", "0.02")
    good = (tmp_path / "checkpoint-00000010.pt").read_bytes()
    real_save = torch.save

    def killed_half_way(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        f.truncate(f.tell() // 2)  # half the bytes are on disk when the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_half_way)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, "--iter", "20", "--snap-kimg", "0.02", "--resume", "auto")
    assert stop.value.code == 130
    assert (tmp_path / "checkpoint-00000010.pt").read_bytes() == good
    assert not (tmp_path / "checkpoint-00000020.pt").exists()
    # a temporary file left by a SIGKILL (no chance to clean up) is never taken for a checkpoint
    (tmp_path / "checkpoint-00000020.pt.tmp-999").write_bytes(good[: len(good) // 2])
    assert train_gan.list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-00000010.pt")]


def test_a_diverged_run_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    run(tmp_path, "--iter", "4", "--snap-kimg", "0.008")
    good = (tmp_path / "checkpoint-00000004.pt").read_bytes()
    real_loss = train_gan.losses.d_logistic_loss
    monkeypatch.setattr(train_gan.losses, "d_logistic_loss", lambda r, f: real_loss(r, f) * float("nan"))
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, "--iter", "8", "--snap-kimg", "0.008", "--resume", "auto")
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged" in err[0] and "D_r" in err[0]
    assert (tmp_path / "checkpoint-00000004.pt").read_bytes() == good
    assert train_gan.list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-00000004.pt")]


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
import train_gan
args = train_gan.parse_args({argv!r})
rank, world, device = train_gan.setup_distributed()
nets = train_gan._train(args, rank, world, device)
torch.save({{name: net.state_dict() for name, net in nets.items()}}, f"{{args.out}}/rank{{rank}}.pt")
dist.destroy_process_group()
"""


def test_torchrun_two_processes_agree_on_the_weights(tmp_path):
    argv = TINY + ["--out", str(tmp_path), "--iter", "6", "--snap-kimg", "0.012"]
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


def one_step(step, *extra):
    """train_step on tiny networks from a fixed seed; returns (losses, G's mask outputs, D_m's mask inputs)."""
    args = train_gan.parse_args(TINY + list(extra))
    torch.manual_seed(0)
    random.seed(0)  # style mixing's coin
    device = torch.device("cpu")
    G, G_ema, D_r, D_m = train_gan.build_networks(args, 3, 3, device)
    optimizers = train_gan.build_optimizers(args, G, D_r, D_m)
    autocast, _ = train_gan.make_autocast(args, device)
    state = {"G_ema": G_ema, "mean_path_length": torch.zeros(())}
    generated, seen = [], []
    G.register_forward_hook(lambda module, inputs, output: generated.append(output[1].detach()))
    D_m.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[1].detach()))
    batch = (torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32)))
    out = train_gan.train_step(step, (G, D_r, D_m), optimizers, batch, args, state, autocast)
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


def test_dm_r1_per_sample_is_batch_squared_times_the_official():
    official, _, _, _ = one_step(0)  # step 0: R1 runs
    per_sample, _, _, _ = one_step(0, "--dm-r1", "per-sample")
    assert per_sample["R1_D_m"].item() == pytest.approx(2 ** 2 * official["R1_D_m"].item(), rel=1e-5)
    assert per_sample["R1_D_r"].item() == pytest.approx(official["R1_D_r"].item(), rel=1e-6)
