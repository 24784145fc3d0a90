"""Checkpoints of other code in and out: the official SemanticGAN code's (g, g_ema, d_img, d_seg) and
rosinality/stylegan2-pytorch's (g_ema, d), read into model.py's networks (weights.read_networks, load_official)
and written back (weights.export_official, `python weights.py export-official`); train_gan.py --init and
--train seg; stage 2 and generate.py on an official checkpoint; bad files in one line.

The reference is ../shared/fixtures/official-tiny.pt (or $SEMANTICGAN_FIXTURES/official-tiny.pt): narrow
official networks with perturbed weights, fixed inputs and the official code's outputs. The tests that need it
skip without it; the others build their own tiny official-layout files and run everywhere."""
import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import generate
import model
import train_encoder
import train_gan
import weights

FIXTURES = Path(os.environ.get("SEMANTICGAN_FIXTURES") or Path(__file__).resolve().parents[2] / "shared" / "fixtures")
FIXTURE = FIXTURES / "official-tiny.pt"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_file(), reason=f"no {FIXTURE} (the official networks' outputs; "
                                   "set SEMANTICGAN_FIXTURES to the folder that holds official-tiny.pt)")

# stage 1 on the demo data without network options: --init decides the shape (--iter 1 unless a test says
# otherwise: a file wrongly accepted ends the run soon)
DATA = ["--data", "demo", "--demo-length", "24", "--num-classes", "3", "--batch", "2", "--workers", "0",
        "--log-every", "0", "--grid", "4", "--r1-every", "4", "--pl-every", "2", "--iter", "1"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def save(obj, path):
    torch.save(obj, path)
    return str(path)


def assert_same(ours, expected, atol=1e-5):
    """Outputs of our networks against the official code's, to 1e-5."""
    torch.testing.assert_close(ours, expected, rtol=0, atol=atol)


# ----------------------------------------------------------------------------------------------------
# Against the official code's outputs (the fixture)


@pytest.fixture(scope="module")
def fixture():
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(FIXTURE, map_location="cpu", weights_only=True)


@needs_fixture
def test_an_official_checkpoint_computes_what_the_official_networks_computed(fixture, tmp_path):
    """G from z and from W+, the mapping, D_r and every layer of D_m, as the official code computed them."""
    path = save(fixture["official_checkpoint"], tmp_path / "official.pt")
    source, tensors, shapes = weights.read_networks(path, "")
    config, inputs, expected = fixture["config"], fixture["inputs"], fixture["expected"]
    assert source == "official" and set(tensors) == {"g", "g_ema", "d_img", "d_seg"}
    assert shapes["generator"] == dict(resolution=32, num_classes=3, image_channels=1, style_dim=64, n_mlp=2,
                                       channel_multiplier=2, max_channels=32)  # read from the tensors alone
    assert shapes["mask_discriminator"] == dict(image_channels=1, num_classes=3, num_scales=3, base_channels=8,
                                                n_layers=3, max_channels=64)
    assert config["d_m_base_channels"] == 8 and config["d_m_scales"] == 3 and config["d_m_layers"] == 3
    for key in ("g_ema", "g"):
        G = weights.build_official(tensors, shapes, key, path).eval()
        assert_same(G.mapping(inputs["z"]), expected["w_from_z"])
        image, mask = G(inputs["z"], noise=inputs["noise"])
        assert_same(image, expected["image_from_z"])
        assert_same(mask, expected["mask_logits_from_z"])
        image, mask = G(inputs["w_plus"], input_is_w=True, noise=inputs["noise"])
        assert_same(image, expected["image_from_w_plus"])
        assert_same(mask, expected["mask_logits_from_w_plus"])
    D_r = weights.build_official(tensors, shapes, "d_img", path).eval()
    assert_same(D_r(inputs["image"]), expected["d_r_logits"])
    D_m = weights.build_official(tensors, shapes, "d_seg", path).eval()
    outputs = D_m(inputs["image"], inputs["mask"])
    assert len(outputs) == len(expected["d_m_outputs_finest_first"]) == 3
    for ours, theirs in zip(outputs, expected["d_m_outputs_finest_first"]):
        assert len(ours) == len(theirs) == 5
        for layer, official in zip(ours, theirs):
            assert_same(layer, official)


@needs_fixture
def test_a_rosinality_generator_computes_its_image_and_leaves_tseg_as_it_was(fixture, tmp_path):
    path = save(fixture["rosinality_checkpoint"], tmp_path / "rosinality.pt")
    source, tensors, shapes = weights.read_networks(path, "")
    assert source == "rosinality" and set(tensors) == {"g_ema"}
    assert shapes["generator"]["num_classes"] is None and shapes["generator"]["image_channels"] == 3
    assert shapes["image_discriminator"] is None and shapes["mask_discriminator"] is None
    G = model.Generator(**{**shapes["generator"], "num_classes": 2}).eval()
    t_seg = {k: v.clone() for k, v in G.t_seg.state_dict().items()}
    weights.load_official(G, tensors["g_ema"], path, "g_ema", fresh=r"t_seg\.")
    inputs = fixture["inputs"]
    image, _ = G(inputs["z"], noise=inputs["noise"])
    assert_same(image, fixture["expected"]["rosinality_image_from_z"])
    assert all(torch.equal(G.t_seg.state_dict()[k], v) for k, v in t_seg.items())


@needs_fixture
def test_exporting_the_official_networks_gives_back_the_official_file(fixture, tmp_path):
    """read, then export: every tensor of g, g_ema, d_img and d_seg, the blur filters and noise maps included,
    bit for bit under its official name and shape; and the arguments the official code writes."""
    official = fixture["official_checkpoint"]
    path = save(official, tmp_path / "official.pt")
    _, tensors, shapes = weights.read_networks(path, "")
    nets = {key: weights.build_official(tensors, shapes, key, path) for key in tensors}
    ours = {"G": nets["g"].state_dict(), "G_ema": nets["g_ema"].state_dict(), "D_r": nets["d_img"].state_dict(),
            "D_m": nets["d_seg"].state_dict(), "args": {}}
    exported = weights.export_official(ours, "ours.pt")
    for key in ("g", "g_ema", "d_img", "d_seg"):
        assert set(exported[key]) == set(official[key]), key
        for name, value in official[key].items():
            assert exported[key][name].shape == value.shape and torch.equal(exported[key][name], value), (key, name)
    for field in ("size", "latent", "n_mlp", "seg_dim", "image_mode", "channel_multiplier"):
        assert getattr(exported["args"], field) == getattr(official["args"], field), field
    image_only = weights.export_official(ours, "ours.pt", image_only=True)
    assert set(image_only) == {"g", "g_ema", "d", "args"}
    assert set(image_only["g_ema"]) == {k for k in official["g_ema"] if not k.startswith("to_seg")}


# ----------------------------------------------------------------------------------------------------
# Tiny official-layout files made here (no fixture needed)


def tiny_networks(classes=3, channels=3, seed=0):
    """G, G_ema, D_r, D_m at 32 px, narrow, every tensor moved off its initial value (so that a zero bias or
    noise strength mapped wrongly shows); D_m's widths (base 8, up to 32) are not train_gan.py's defaults."""
    torch.manual_seed(seed)
    G, G_ema = (model.Generator(32, classes, channels, style_dim=32, n_mlp=2, max_channels=16) for _ in range(2))
    D_r = model.ImageDiscriminator(32, channels, max_channels=16)
    D_m = model.MaskDiscriminator(channels, classes, base_channels=8, max_channels=32)
    with torch.no_grad():
        for net in (G, G_ema, D_r, D_m):
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return G, G_ema, D_r, D_m


def stage1(nets, classes=3, channels=3):
    """A stage-1 checkpoint of these networks, as train_gan.py writes one (the parts read here)."""
    G, G_ema, D_r, D_m = nets
    return {"G": G.state_dict(), "G_ema": G_ema.state_dict(), "D_r": D_r.state_dict(), "D_m": D_m.state_dict(),
            "num_classes": classes, "image_channels": channels, "mask_channels": classes,
            "args": {"resolution": 32, "style_dim": 32, "n_mlp": 2, "channel_multiplier": 2, "max_channels": 16,
                     "dm_mask": "logits"}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the networks, an official checkpoint of them, a rosinality one of the same generator)."""
    folder = tmp_path_factory.mktemp("tiny")
    nets = tiny_networks()
    official = save(weights.export_official(stage1(nets), "tiny"), folder / "official.pt")
    rosinality = save(weights.export_official(stage1(nets), "tiny", image_only=True), folder / "rosinality.pt")
    return nets, official, rosinality


def without_t_seg(state):
    return {k: v for k, v in state.items() if not k.startswith("t_seg.")}


def test_export_official_then_read_back_gives_the_same_networks(tmp_path, capsys):
    nets = tiny_networks(seed=1)
    run = tmp_path / "run"
    run.mkdir()
    save(stage1(nets), run / "checkpoint-00000004.pt")
    weights.export_main([str(run), str(tmp_path / "official.pt")])  # a --out folder: its latest checkpoint
    weights.export_main([str(run / "checkpoint-00000004.pt"), str(tmp_path / "image.pt"), "--image-only"])
    assert "official SemanticGAN" in capsys.readouterr().out
    source, tensors, shapes = weights.read_networks(str(tmp_path / "official.pt"), "")
    assert source == "official"
    assert {**shapes["generator"], "lr_mlp": 0.01, "blur_kernel": (1, 3, 3, 1)} == nets[0].config
    for key, net in zip(("g", "g_ema", "d_img", "d_seg"), nets):
        back = weights.build_official(tensors, shapes, key, "official.pt").state_dict()
        assert back.keys() == net.state_dict().keys()
        assert all(torch.equal(back[k], v) for k, v in net.state_dict().items()), key
    source, tensors, shapes = weights.read_networks(str(tmp_path / "image.pt"), "")
    assert source == "rosinality" and set(tensors) == {"g", "g_ema", "d_img"}
    G = model.Generator(**{**shapes["generator"], "num_classes": 3})
    weights.load_official(G, tensors["g_ema"], "image.pt", "g_ema", fresh=r"t_seg\.")
    assert all(torch.equal(G.state_dict()[k], v) for k, v in without_t_seg(nets[1].state_dict()).items())


@pytest.fixture(scope="module")
def seg_run(tiny, tmp_path_factory):
    """train_gan.py --init (the tiny official file) --train seg, 4 steps, a checkpoint every 2."""
    out = tmp_path_factory.mktemp("seg")
    train_gan.main(DATA + ["--init", tiny[1], "--train", "seg", "--out", str(out), "--iter", "4",
                           "--snap-every", "2"])
    return out


def test_init_then_train_seg_changes_only_tseg_and_d_m(tiny, seg_run):
    """Every frozen parameter (mapping, synthesis, noise strengths, tImage; D_r) bit-identical after 4 steps,
    in G and in G_ema, both from the file's g_ema; tSeg and D_m trained."""
    (_, G_ema, D_r, D_m), _, _ = tiny
    ckpt = load(seg_run / "checkpoint-00000004.pt")
    assert ckpt["args"]["train"] == "seg" and ckpt["args"]["resolution"] == 32 and ckpt["args"]["max_channels"] == 16
    start = G_ema.state_dict()
    for net in ("G", "G_ema"):
        assert ckpt[net].keys() == start.keys()
        for name, value in without_t_seg(start).items():
            assert torch.equal(ckpt[net][name], value), (net, name)
        assert all(not torch.equal(ckpt[net][k], start[k]) for k in start if k.startswith("t_seg.") and "bias" in k)
    assert all(torch.equal(ckpt["D_r"][k], v) for k, v in D_r.state_dict().items())
    assert not torch.equal(ckpt["D_m"]["scales.0.layers.0.0.weight"], D_m.state_dict()["scales.0.layers.0.0.weight"])


def test_a_seg_run_resumes_exactly_and_keeps_its_mode(tiny, seg_run, tmp_path, capsys):
    """... also when its --init file has gone by then (the shape is read from the checkpoint resumed)."""
    init = tmp_path / "init.pt"
    init.write_bytes(Path(tiny[1]).read_bytes())
    args = DATA + ["--init", str(init), "--train", "seg", "--out", str(tmp_path), "--snap-every", "2"]
    train_gan.main(args + ["--iter", "2"])
    assert "started from" in capsys.readouterr().out
    init.unlink()
    train_gan.main(args + ["--iter", "4", "--resume", "auto"])
    resumed, straight = load(tmp_path / "checkpoint-00000004.pt"), load(seg_run / "checkpoint-00000004.pt")
    for net in ("G", "G_ema", "D_r", "D_m"):
        for name, value in straight[net].items():
            assert torch.equal(resumed[net][name], value), (net, name)
    with pytest.raises(SystemExit) as refused:
        train_gan.main(args[:args.index("--train")] + args[args.index("--train") + 2:] + ["--iter", "6", "--resume",
                                                                                         "auto"])
    err = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code == 2 and len(err) == 1 and "--train seg, not all" in err[0], err


def test_one_seg_step_skips_d_r_and_the_path_length():
    """At step 0 (R1 and path length both due): D_r is never run, G's loss is D_m's, and only tSeg and D_m move."""
    args = train_gan.parse_args(DATA + ["--train", "seg", "--resolution", "32", "--max-channels", "16",
                                        "--style-dim", "32", "--n-mlp", "2"])
    torch.manual_seed(0)
    G, G_ema, D_r, D_m = train_gan.build_networks(args, 3, 3, torch.device("cpu"))
    optimizers = train_gan.build_optimizers(args, G, D_r, D_m)
    assert {id(p) for p in optimizers[0].param_groups[0]["params"]} == {id(p) for p in G.t_seg.parameters()}
    # frozen from the start (DDP registers what requires a gradient when it wraps a network)
    assert {n for n, p in G.named_parameters() if p.requires_grad} == {"t_seg." + n for n, _ in G.t_seg.named_parameters()}
    assert not any(p.requires_grad for p in D_r.parameters())
    before = [{k: v.clone() for k, v in net.state_dict().items()} for net in (G, D_r, D_m)]
    calls = []
    D_r.register_forward_hook(lambda *_: calls.append(1))
    batch = (torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32)))
    autocast, _ = model.make_autocast(args, torch.device("cpu"))
    state = {"G_ema": G_ema, "mean_path_length": torch.zeros(())}
    out = train_gan.train_step(0, (G, D_r, D_m), optimizers, batch, args, state, autocast)
    assert set(out) == {"D_m", "D_m_fit", "R1_D_m", "G", "G_m", "G_fm"} and not calls
    # no gradient was even computed for a frozen parameter: the G step's backward stops at tSeg
    assert [n for n, p in G.named_parameters() if p.grad is not None and not n.startswith("t_seg.")] == []
    assert all(p.grad is None for p in D_r.parameters())
    torch.testing.assert_close(out["G"], out["G_m"] + args.fm_weight * out["G_fm"])
    G_after, D_r_after, D_m_after = (net.state_dict() for net in (G, D_r, D_m))
    assert all(torch.equal(G_after[k], v) for k, v in without_t_seg(before[0]).items())
    assert all(torch.equal(D_r_after[k], v) for k, v in before[1].items())
    assert not torch.equal(G_after["t_seg.3.bias"], before[0]["t_seg.3.bias"])
    assert not torch.equal(D_m_after["scales.0.layers.4.bias"], before[2]["scales.0.layers.4.bias"])
    assert torch.equal(state["mean_path_length"], torch.zeros(()))


def test_init_with_other_classes_keeps_all_but_tseg_and_d_ms_first_layers(tmp_path):
    nets = tiny_networks(classes=5)
    path = save(weights.export_official(stage1(nets, classes=5), "five"), tmp_path / "five.pt")
    args = train_gan.parse_args(DATA + ["--init", path, "--out", str(tmp_path)])
    init = train_gan.read_init(args)
    torch.manual_seed(0)
    G, G_ema, D_r, D_m = train_gan.build_networks(args, 3, 3, torch.device("cpu"), init["shapes"])
    fresh = [{k: v.clone() for k, v in net.state_dict().items()} for net in (G, D_m)]
    line = train_gan.start_from(init, G, G_ema, D_r, D_m, args)
    assert "fresh: tSeg and D_m's first layers (the file's masks have 5 channel(s), the data's 3)" in line
    assert "G from g, G_ema from g_ema, D_r from d_img, D_m from d_seg" in line
    for ours, theirs in ((G, nets[0]), (G_ema, nets[1]), (D_r, nets[2])):
        state = ours.state_dict()
        for name, value in theirs.state_dict().items():
            if not name.startswith("t_seg."):
                assert torch.equal(state[name], value), name
    assert all(torch.equal(G.state_dict()[k], v) for k, v in fresh[0].items() if k.startswith("t_seg."))
    assert torch.equal(G.t_seg.state_dict()["0.bias"], G_ema.t_seg.state_dict()["0.bias"])
    for name, value in D_m.state_dict().items():
        first = ".layers.0." in name
        assert torch.equal(value, fresh[1][name] if first else nets[3].state_dict()[name]), name


def test_init_from_a_rosinality_generator_then_two_seg_steps(tiny, tmp_path, capsys):
    nets, _, rosinality = tiny
    train_gan.main(DATA + ["--init", rosinality, "--train", "seg", "--out", str(tmp_path), "--iter", "2",
                           "--snap-every", "2"])
    out = capsys.readouterr().out
    assert "(rosinality/stylegan2-pytorch): G from g_ema, G_ema from g_ema, D_r from d; fresh: D_m, tSeg (the " \
           "file has no mask branch)" in out
    ckpt = load(tmp_path / "checkpoint-00000002.pt")
    assert all(torch.equal(ckpt["G"][k], v) for k, v in without_t_seg(nets[1].state_dict()).items())


# ----------------------------------------------------------------------------------------------------
# Stage 2 and generate.py take an official checkpoint


def test_generate_draws_the_same_pairs_from_an_official_checkpoint(tiny, tmp_path):
    nets, official, _ = tiny
    ours = save(stage1(nets), tmp_path / "checkpoint-00000001.pt")
    for name, ckpt in (("ours", ours), ("official", official)):
        generate.main(["--ckpt", ckpt, "--n", "3", "--truncation", "1", "--out", str(tmp_path / name)])
    for kind in ("images", "masks"):
        for i in range(3):
            a, b = (np.asarray(Image.open(tmp_path / name / kind / f"{i:06d}.png")) for name in ("ours", "official"))
            assert np.array_equal(a, b), (kind, i)


def test_stage2_reads_an_official_checkpoint_and_its_shape(tiny, tmp_path):
    nets, official, _ = tiny
    args, ckpt = train_encoder.parse_args(["--ckpt", official, "--out", str(tmp_path), "--data", "demo"])
    assert args.resolution == 32 and ckpt["args"]["dm_mask"] == "logits"
    assert train_encoder.mask_temperatures(train_encoder.build_parser().parse_args([]), ckpt["args"], 3) == (0.1, 0.3)
    G = model.load_generator(ckpt, official, torch.device("cpu"))
    assert all(torch.equal(G.state_dict()[k], v) for k, v in nets[1].state_dict().items())


# ----------------------------------------------------------------------------------------------------
# Bad files: one line naming the file and what was expected, exit status 2


class NeedsCode:
    """An object that only code can unpickle (a pickled class instance): never run when reading."""


def one_line(capsys, main, argv):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def edited(tiny, tmp_path, edit):
    """The tiny official file with one edit made to its dict."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(tiny[1], weights_only=True)
    edit(ckpt)
    return save(ckpt, tmp_path / "edited.pt")


def rename(state, old, new):
    state[new] = state.pop(old)


BAD_FILES = {
    "needs code": (lambda c: c.update(g=NeedsCode()), "needs code (test_weights.NeedsCode)"),
    "another network": (lambda c: c.update(g_ema=model.Encoder(32, units=(1, 1, 1, 1), max_channels=8).state_dict()),
                        "is not a checkpoint of this project, of the official SemanticGAN code"),
    "a renamed tensor": (lambda c: rename(c["g_ema"], "convs.3.noise.weight", "convs.3.noise.strength"),
                         "g_ema has no tensor convs.3.noise.weight and holds convs.3.noise.strength"),
    "a reshaped tensor": (lambda c: c["g_ema"].update({"to_rgbs.1.bias": c["g_ema"]["to_rgbs.1.bias"].reshape(-1)}),
                          "g_ema's to_rgbs.1.bias is [3], expected [1, 3, 1, 1]"),
    "a reshaped D_m tensor": (lambda c: c["d_seg"].update(
        {"scale1_layer2.0.0.weight_u": c["d_seg"]["scale1_layer2.0.0.weight_u"][:-1]}),
        "d_seg's scale1_layer2.0.0.weight_u is [31], expected [32]"),
    "a D_r tensor more": (lambda c: c["d_img"].update({"final_linear.2.bias": torch.zeros(1)}),
                          "d_img holds final_linear.2.bias, which has no place in it"),
    "another blur filter": (lambda c: c["g_ema"]["convs.0.conv.blur.kernel"].mul_(2),
                            "convs.0.conv.blur.kernel is not StyleGAN2's [1, 3, 3, 1] blur filter"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_init_file_ends_in_one_line(tiny, tmp_path, capsys, case):
    edit, message = BAD_FILES[case]
    path = edited(tiny, tmp_path, edit)
    line = one_line(capsys, train_gan.main, DATA + ["--init", path, "--out", str(tmp_path / "out")])
    assert path in line and message in line, line


def test_a_truncated_file_ends_in_one_line_in_every_script(tiny, tmp_path, capsys):
    path = tmp_path / "truncated.pt"
    path.write_bytes(Path(tiny[1]).read_bytes()[:5000])
    for main, argv in ((train_gan.main, DATA + ["--init", str(path), "--out", str(tmp_path / "a")]),
                       (generate.main, ["--ckpt", str(path), "--out", str(tmp_path / "b")]),
                       (train_encoder.main, ["--ckpt", str(path), "--out", str(tmp_path / "c")])):
        line = one_line(capsys, main, argv)
        assert str(path) in line and "cannot be read" in line, line


def test_stage2_and_generate_refuse_a_generator_without_a_mask_branch(tiny, tmp_path, capsys):
    for main, argv in ((generate.main, ["--ckpt", tiny[2], "--out", str(tmp_path / "b")]),
                       (train_encoder.main, ["--ckpt", tiny[2], "--out", str(tmp_path / "c")])):
        line = one_line(capsys, main, argv)
        assert tiny[2] in line and "without a mask branch" in line and "--init" in line, line


@pytest.mark.parametrize("case", ["grey data", "another resolution", "seg without init"])
def test_options_that_do_not_fit_the_init_file_end_in_one_line(tiny, tmp_path, capsys, case):
    argv = DATA + ["--out", str(tmp_path)] + {
        "grey data": ["--init", tiny[1], "--channels", "1"],
        "another resolution": ["--init", tiny[1], "--resolution", "64"],
        "seg without init": ["--train", "seg"]}[case]
    line = one_line(capsys, train_gan.main, argv)
    assert {"grey data": "generates RGB images (3 channels), the data is grey (1): pass --channels 3",
            "another resolution": "holds a generator with --resolution 32, not 64",
            "seg without init": "--train seg trains the mask branch of an existing generator"}[case] in line, line


# ----------------------------------------------------------------------------------------------------
# export-official never writes over what it reads, and keeps what stage 2 needs to know


def test_export_never_writes_over_its_source_nor_an_existing_file_unasked(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    source = save(stage1(tiny_networks()), run / "checkpoint-00000004.pt")
    kept = Path(source).read_bytes()
    for argv in ([str(run), source], [source, source], [source, source, "--overwrite"]):
        line = one_line(capsys, weights.export_main, argv)
        assert "is the checkpoint exported" in line
    assert Path(source).read_bytes() == kept
    other = tmp_path / "mine.pt"
    other.write_bytes(b"someone's file")
    assert "--overwrite" in one_line(capsys, weights.export_main, [source, str(other)])
    assert other.read_bytes() == b"someone's file"
    weights.export_main([source, str(other), "--overwrite"])
    assert weights.checkpoint_source(model.load_checkpoint(str(other))) == "official"


def test_the_export_says_what_it_wrote(tmp_path, capsys):
    nets = tiny_networks()
    bundle = {"format": model.BUNDLE_FORMAT, "G_ema": nets[1].state_dict(), "args": {},
              "stage1_args": stage1(nets)["args"]}
    path = save(bundle, tmp_path / "model.pt")
    weights.export_main([path, str(tmp_path / "official.pt")])
    printed = capsys.readouterr().out
    assert "(g_ema, args)" in printed and "d_img" not in printed and "d_seg" not in printed
    assert set(model.load_checkpoint(str(tmp_path / "official.pt"))) == {"g_ema", "args"}


def test_a_probabilities_generator_keeps_its_d_m_input_through_an_export(tmp_path, capsys):
    nets = tiny_networks()
    ckpt = stage1(nets)
    ckpt["args"]["dm_mask"] = "probabilities"
    exported = save(weights.export_official(ckpt, "x"), tmp_path / "official.pt")
    args, read_back = train_encoder.parse_args(["--ckpt", exported, "--out", str(tmp_path / "enc"), "--data", "demo"])
    assert read_back["args"]["dm_mask"] == "probabilities"
    assert train_encoder.mask_temperatures(train_encoder.build_parser().parse_args([]), read_back["args"], 3) == (1, 1)
    # --init with the other D_m input: refused, since its tSeg and D_m learnt that one
    line = one_line(capsys, train_gan.main, DATA + ["--init", exported, "--out", str(tmp_path / "a"), "--dm-mask",
                                                    "logits"])
    assert "--dm-mask probabilities" in line
    train_gan.main(DATA + ["--init", exported, "--out", str(tmp_path / "b"), "--dm-mask", "probabilities"])


def test_init_with_a_text_file_says_what_it_is(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("my notes\n")
    line = one_line(capsys, train_gan.main, DATA + ["--init", str(tmp_path / "notes.txt"), "--out",
                                                    str(tmp_path / "a")])
    assert "not a file torch.save wrote" in line and "KeyError" not in line
