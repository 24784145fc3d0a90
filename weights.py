"""Other code's weights, read into this project's networks and written back (kept apart from the networks, as
rosinality's convert_weight.py and stylegan2-ada's legacy.py do): the official SemanticGAN code's
(nv-tlabs/semanticGAN_code; train_seg_gan.py saves "g", "g_ema", "d_img", "d_seg", "args") and those of
rosinality/stylegan2-pytorch, the StyleGAN2 port it builds on ("g_ema", "g", "d", "args"; converted FFHQ, church,
car and medical generators circulate in that format). train_gan.py --init reads any of the three sources
(read_networks, load_official); stage 2 and generate.py take an official checkpoint as a stage-1 one (as_stage1).

    python weights.py export-official runs/jsrt official-layout.pt            # for the official scripts
    python weights.py export-official runs/jsrt image-only.pt --image-only    # rosinality's layout, G alone

The official networks are ours under other names and shapes (rosinality's generator: the official one, no to_seg*):

    ours                              official
    mapping.net.i                     style.i
    constant                          input.input
    conv1, convs.j                    conv1, convs.j: conv.weight with a leading 1 (its per-sample batch axis),
                                      bias as activate.bias, noise.strength [] as noise.weight [1]
    t_image.0, t_image.i              to_rgb1, to_rgbs.(i-1): conv.weight with a leading 1, bias [1, C, 1, 1]
    t_seg.0, t_seg.i                  to_seg1, to_segs.(i-1): the same
    noise_i                           noises.noise_i
    D_r blocks.k, final_linear, out   convs.k, final_linear.0, final_linear.1
    D_m scales.i.layers.j             scale(N-1-i)_layerj: the official forward runs its module scale(N-1) on
                                      the full-size input and scale0 on the input pooled N-1 times; spectral
                                      norm as the old hook stores it (weight_orig, weight_u, weight_v)

The [1, 3, 3, 1] blur filters are buffers there (times 4 where they upsample), constants here: checked when read,
written for the official load_state_dict. A file is read in three steps: its state_dicts in the official layout
(official_tensors; a file of this project is renamed into it, so one reader serves all three sources), each
network's constructor arguments read from their shapes (official_shapes), and the tensors loaded into networks
built with them (load_official); whatever does not fit is a CheckpointError naming the file and the tensor.
Needs: model.py (the networks, CheckpointError, reading checkpoints) and cli.py (cli.ArgumentParser).
"""

import argparse
import os
import re
import sys

import torch

import cli
from model import (BUNDLE_FORMAT, RESOLUTIONS, CheckpointError, Generator, ImageDiscriminator, MaskDiscriminator,
                   load_checkpoint, resolve_checkpoint, short_error, stylegan_channels)

SOURCES = {"semanticgan": "this project", "official": "the official SemanticGAN code",
           "rosinality": "rosinality/stylegan2-pytorch"}


def official_generator_name(name):
    """The official GeneratorSeg's name of our Generator's tensor `name` (a parameter, a noise map or a blur
    filter); None for the filter of the first tImage / tSeg, which never upsamples and has none there."""
    parts = name.split(".")
    if parts[0] == "mapping":
        return "style." + ".".join(parts[2:])
    if name == "constant":
        return "input.input"
    if parts[0].startswith("noise_"):
        return "noises." + name
    if parts[0] in ("t_image", "t_seg"):
        stem, index, rest = {"t_image": "to_rgb", "t_seg": "to_seg"}[parts[0]], int(parts[1]), ".".join(parts[2:])
        if index == 0:
            return None if rest == "blur_kernel" else f"{stem}1.{rest}"
        return f"{stem}s.{index - 1}." + ("upsample.kernel" if rest == "blur_kernel" else rest)
    layer = "conv1" if parts[0] == "conv1" else ".".join(parts[:2])  # conv1 or convs.j
    rest = name[len(layer) + 1:]
    return f"{layer}." + {"bias": "activate.bias", "noise.strength": "noise.weight",
                          "conv.blur_kernel": "conv.blur.kernel"}.get(rest, rest)


def official_generator_shape(name, shape):
    """The official shape of our Generator's tensor `name`, whose shape is `shape`."""
    if name.endswith("conv.weight"):
        return (1, *shape)
    if name.endswith("noise.strength"):
        return (1,)
    if re.fullmatch(r"t_(image|seg)\.\d+\.bias", name):
        return (1, *shape, 1, 1)
    return tuple(shape)


def official_image_discriminator_name(name):
    """The official (and rosinality's) Discriminator's name of our ImageDiscriminator's tensor `name`."""
    for ours, theirs in (("blocks.", "convs."), ("final_linear.", "final_linear.0."), ("out.", "final_linear.1.")):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name  # final_conv.*


def official_mask_discriminator_name(name, num_scales):
    """The official MultiscaleDiscriminator's (getIntermFeat) name of our MaskDiscriminator's tensor `name`,
    for `num_scales` scales: our scale i (finest first) is its module scale(N-1-i)."""
    scale, layer, rest = re.fullmatch(r"scales\.(\d+)\.layers\.(\d+)\.(.+)", name).groups()
    rest = {"0.parametrizations.weight.original": "0.0.weight_orig", "0.parametrizations.weight.0._u": "0.0.weight_u",
            "0.parametrizations.weight.0._v": "0.0.weight_v", "weight": "0.weight", "bias": "0.bias"}.get(rest, rest)
    return f"scale{num_scales - 1 - int(scale)}_layer{layer}.{rest}"


def official_layout(kind, num_scales=3):
    """(name_of, shape_of, gain of the blur filters) of our network `kind` ('G', 'D_r', or 'D_m' with
    `num_scales` scales) in the official layout. The generator's filters upsample: they carry a gain of 4."""
    same = lambda name, shape: tuple(shape)  # noqa: E731
    if kind == "G":
        return official_generator_name, official_generator_shape, 4
    if kind == "D_r":
        return official_image_discriminator_name, same, 1
    return (lambda name: official_mask_discriminator_name(name, num_scales)), same, 1


def _layout_of(net):
    """official_layout of our network `net`, and what messages call it."""
    kind = "G" if isinstance(net, Generator) else "D_r" if isinstance(net, ImageDiscriminator) else "D_m"
    return official_layout(kind, len(getattr(net, "scales", ()))), {
        "G": "StyleGAN2 generator", "D_r": "StyleGAN2 discriminator (D_r)",
        "D_m": "multi-scale patch discriminator (D_m)"}[kind]


def to_official(net):
    """Our network's state_dict in the official layout, the blur filters included (the official modules hold
    them as buffers, so their load_state_dict expects them)."""
    (name_of, shape_of, gain), _ = _layout_of(net)
    state = net.state_dict()
    out = {name_of(n): t.detach().reshape(shape_of(n, t.shape)).clone() for n, t in state.items()}
    return {**out, **{name_of(n): b.detach() * gain for n, b in net.named_buffers()
                      if n not in state and name_of(n) is not None}}


def load_official(net, state, path, what, fresh=None):
    """Fill our network `net` from `state`, a state_dict in the official layout (`what` names it in messages, e.g.
    'g_ema'), and return it. Our tensors matching the regular expression `fresh` keep their values (a mask branch
    for other classes, or one the file lacks) and their counterparts in the file are ignored; every other tensor
    must be there in its official shape, and nothing else may be (a blur filter only as [1, 3, 3, 1])."""
    (name_of, shape_of, gain), describe = _layout_of(net)
    ours = net.state_dict()
    kept = {n for n in ours if fresh and re.match(fresh, n)}
    wanted = {name_of(n): n for n in ours if n not in kept}
    filters = {name_of(n): b.detach().cpu() * gain for n, b in net.named_buffers()
               if n not in ours and name_of(n) is not None}
    ignored = {name_of(n) for n in kept}
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in wanted and k not in filters and k not in ignored]
    if missing or unexpected:
        problems = ([f"has no tensor {missing[0]}" + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")]
                    if missing else []) + ([f"holds {unexpected[0]}, which has no place in it"] if unexpected else [])
        raise CheckpointError(f"{path}: {what} {' and '.join(problems)}; expected a {describe} in the official layout")
    for theirs, n in wanted.items():
        expected = shape_of(n, ours[n].shape)
        if tuple(state[theirs].shape) != tuple(expected):
            raise CheckpointError(f"{path}: {what}'s {theirs} is {list(state[theirs].shape)}, expected "
                                  f"{list(expected)} for a {describe} of the shape its other tensors give")
    for theirs, kernel in filters.items():
        found = state.get(theirs)
        if found is not None and not (found.shape == kernel.shape and torch.allclose(found.float(), kernel)):
            raise CheckpointError(f"{path}: {what}'s {theirs} is not StyleGAN2's [1, 3, 3, 1] blur filter, the only "
                                  "one this project has")
    net.load_state_dict({**{n: state[theirs].reshape(ours[n].shape) for theirs, n in wanted.items()},
                         **{n: ours[n] for n in kept}})
    return net


def checkpoint_source(ckpt):
    """Which code wrote a checkpoint: 'semanticgan' (train_gan.py, or a model.pt), 'official' (a generator with
    to_seg1), 'rosinality' (a StyleGAN2 generator without), or None."""
    if not isinstance(ckpt, dict):
        return None
    if ckpt.get("format") == BUNDLE_FORMAT or {"G_ema", "args"} <= set(ckpt):
        return "semanticgan"
    g_ema = ckpt.get("g_ema")
    if isinstance(g_ema, dict) and "to_rgb1.conv.weight" in g_ema:
        return "official" if "to_seg1.conv.weight" in g_ema else "rosinality"
    return None


def official_tensors(ckpt, path):
    """The networks of a checkpoint as state_dicts in the official layout: 'g_ema', and those of 'g', 'd_img'
    (rosinality's 'd') and 'd_seg' that the file holds. A file of this project is renamed into that layout."""
    source = checkpoint_source(ckpt)
    if source is None:
        raise CheckpointError(f"{path} is not a checkpoint of this project, of the official SemanticGAN code (g_ema "
                              "with to_seg1, d_img, d_seg) or of rosinality/stylegan2-pytorch (g_ema, d); pass one "
                              "of those")
    if source != "semanticgan":
        keys = {"g_ema": "g_ema", "g": "g", "d_img": "d_img" if source == "official" else "d", "d_seg": "d_seg"}
        return {ours: ckpt[theirs] for ours, theirs in keys.items() if isinstance(ckpt.get(theirs), dict)}
    tensors = {}
    for theirs, ours in (("g_ema", "G_ema"), ("g", "G"), ("d_img", "D_r"), ("d_seg", "D_m")):
        if isinstance(ckpt.get(ours), dict):
            scales = {n.split(".")[1] for n in ckpt[ours] if n.startswith("scales.")}
            name_of, shape_of, _ = official_layout("G" if ours == "G_ema" else ours, len(scales))
            tensors[theirs] = {name_of(n): t.reshape(shape_of(n, t.shape)) for n, t in ckpt[ours].items()}
    return tensors


def _numbers(state, pattern):
    """The distinct integers that group 1 of `pattern` matches at the start of the names in `state`."""
    return {int(m[1]) for m in (re.match(pattern, name) for name in state) if m}


def _tensor(state, name, what):
    if name not in state:
        raise CheckpointError(f"{what} has no tensor {name}; expected a StyleGAN2 network in the official layout")
    return state[name]


def _resolution(resolution, what):
    if resolution not in RESOLUTIONS:
        raise CheckpointError(f"{what} works at {resolution} px; this project takes {RESOLUTIONS[0]} to "
                              f"{RESOLUTIONS[-1]} px")
    return resolution


def _channel_table(widths, what):
    """(channel_multiplier, max_channels) that make stylegan_channels give `widths` {resolution: channels}."""
    cap = max(widths.values())
    for multiplier in (2, 1, 4, 8):  # config-f's first
        if all(stylegan_channels(r, multiplier, cap) == w for r, w in widths.items()):
            return multiplier, cap
    raise CheckpointError(f"{what} has {dict(sorted(widths.items()))} feature maps per resolution, which no StyleGAN2 "
                          "channel table gives (512 up to 32 px, then halving times a multiplier, capped)")


def _generator_shape(g, what):
    ups = len(_numbers(g, r"to_rgbs\.(\d+)\."))
    widths = {4: _tensor(g, "input.input", what).shape[1]}
    widths.update({2 ** (k + 3): _tensor(g, f"convs.{2 * k}.conv.weight", what).shape[1] for k in range(ups)})
    channel_multiplier, max_channels = _channel_table(widths, what)
    seg = g.get("to_seg1.conv.weight")
    return dict(resolution=_resolution(2 ** (ups + 2), what), num_classes=None if seg is None else seg.shape[1],
                image_channels=_tensor(g, "to_rgb1.conv.weight", what).shape[1],
                style_dim=_tensor(g, "style.1.weight", what).shape[1], n_mlp=len(_numbers(g, r"style\.(\d+)\.")),
                channel_multiplier=channel_multiplier, max_channels=max_channels)


def _image_discriminator_shape(d, what):
    blocks = len(_numbers(d, r"convs\.(\d+)\.conv1\."))
    resolution = _resolution(2 ** (blocks + 2), what)
    first = _tensor(d, "convs.0.0.weight", what)
    widths = {resolution >> k: _tensor(d, f"convs.{k}.conv2.1.weight", what).shape[0] for k in range(1, blocks + 1)}
    channel_multiplier, max_channels = _channel_table({resolution: first.shape[0], **widths}, what)
    return dict(resolution=resolution, image_channels=first.shape[1], channel_multiplier=channel_multiplier,
                max_channels=max_channels)


def _mask_discriminator_shape(d, image_channels, what):
    layers = len(_numbers(d, r"scale0_layer(\d+)\.")) - 2
    first = _tensor(d, "scale0_layer0.0.weight", what)
    widths = [first.shape[0]] + [_tensor(d, f"scale0_layer{n}.0.0.weight_orig", what).shape[0]
                                 for n in range(1, layers + 1)]
    if layers < 1 or first.shape[1] <= image_channels:
        raise CheckpointError(f"{what} is not a D_m for {image_channels}-channel images and their masks "
                              f"(its input has {first.shape[1]} channels)")
    return dict(image_channels=image_channels, num_classes=first.shape[1] - image_channels,
                num_scales=len(_numbers(d, r"scale(\d+)_layer0\.")), base_channels=widths[0], n_layers=layers,
                max_channels=max(widths))


def official_shapes(tensors, path):
    """Constructor arguments read from the shapes in `tensors` (official_tensors): 'generator' (num_classes None
    without tSeg), 'image_discriminator', 'mask_discriminator' (None if absent); a mismatch is a CheckpointError."""
    g = _generator_shape(tensors["g_ema"], f"{path}: g_ema")
    shapes = {"generator": g, "image_discriminator": None, "mask_discriminator": None}
    if "d_img" in tensors:
        shapes["image_discriminator"] = d_r = _image_discriminator_shape(tensors["d_img"], f"{path}: its D_r")
        if (d_r["resolution"], d_r["image_channels"]) != (g["resolution"], g["image_channels"]):
            raise CheckpointError(f"{path}: its D_r takes {d_r['resolution']} px images of {d_r['image_channels']} "
                                  f"channels, its generator makes {g['resolution']} px of {g['image_channels']}")
    if "d_seg" in tensors:
        shapes["mask_discriminator"] = d_m = _mask_discriminator_shape(tensors["d_seg"], g["image_channels"],
                                                                       f"{path}: d_seg")
        if g["num_classes"] not in (None, d_m["num_classes"]):
            raise CheckpointError(f"{path}: d_seg takes masks of {d_m['num_classes']} channels, its generator makes "
                                  f"{g['num_classes']}")
    return shapes


def read_networks(path, advice):
    """(source, tensors, shapes) of a checkpoint of any of the three sources (checkpoint_source,
    official_tensors, official_shapes); `path` may be a train_gan.py --out folder (its latest checkpoint)."""
    path = resolve_checkpoint(path)
    ckpt = load_checkpoint(path, advice)
    tensors = official_tensors(ckpt, path)
    shapes = {**official_shapes(tensors, path), "dm_mask": trained_dm_mask(ckpt)}
    return checkpoint_source(ckpt), tensors, shapes


def trained_dm_mask(ckpt):
    """What the D_m of a file's training saw of a mask ('logits' or 'probabilities'), for which its mask
    branch learnt its logits; None for a StyleGAN2 generator without one. The official code's is logits
    (unless export_official wrote another); this project's checkpoints from before the option, probabilities."""
    source = checkpoint_source(ckpt)
    if source == "official":
        return getattr(ckpt.get("args"), "dm_mask", "logits")
    if source != "semanticgan":
        return None
    trained = ckpt.get("stage1_args") if ckpt.get("format") == BUNDLE_FORMAT else ckpt.get("args")
    return (trained or {}).get("dm_mask", "probabilities")


def build_official(tensors, shapes, key, path):
    """Our network for tensors[key] ('g_ema', 'g', 'd_img' or 'd_seg'), built with `shapes` and filled."""
    kind = {"g": "generator", "g_ema": "generator", "d_img": "image_discriminator"}.get(key, "mask_discriminator")
    network = {"generator": Generator, "image_discriminator": ImageDiscriminator}.get(kind, MaskDiscriminator)
    with torch.random.fork_rng(devices=[]):  # the initial values are overwritten: draw them off the caller's stream
        net = network(**shapes[kind])
    return load_official(net, tensors[key], path, key)


def as_stage1(ckpt, path):
    """A checkpoint as stage 2 and generate.py read it: this project's as it is; an official SemanticGAN one as a
    stage-1 checkpoint holding its G_ema, with the arguments read from its tensors and the D_m input it was trained
    with (trained_dm_mask). A StyleGAN2 generator without a mask branch is a CheckpointError."""
    source = checkpoint_source(ckpt)
    if source in (None, "semanticgan"):
        return ckpt
    if source == "rosinality":
        raise CheckpointError(f"{path} is a StyleGAN2 generator (rosinality/stylegan2-pytorch) without a mask branch; "
                              f"train one on top of it first: train_gan.py --init {path} --train seg")
    tensors = {"g_ema": ckpt["g_ema"]}
    config = official_shapes(tensors, path)["generator"]
    G = build_official(tensors, {"generator": config}, "g_ema", path)
    args = {k: config[k] for k in ("resolution", "style_dim", "n_mlp", "channel_multiplier", "max_channels")}
    args.update(dm_mask=trained_dm_mask(ckpt), binary="sigmoid" if config["num_classes"] == 1 else "softmax", init=path)
    return {"G_ema": G.state_dict(), "args": args, "num_classes": max(config["num_classes"], 2),
            "image_channels": config["image_channels"], "mask_channels": config["num_classes"], "source": "official"}


def export_official(ckpt, path, image_only=False):
    """A checkpoint of this project (stage-1, or a model.pt: G_ema only) in the official layout: {'g', 'g_ema',
    'd_img', 'd_seg', 'args'} as train_seg_gan.py saves them; with image_only, rosinality's {'g', 'g_ema', 'd',
    'args'} without mask branch and D_m (for --init). 'args' is an argparse.Namespace, as both codes write it."""
    if checkpoint_source(ckpt) != "semanticgan":
        raise CheckpointError(f"{path} is not a checkpoint of this project; pass a train_gan.py checkpoint or --out "
                              "folder")
    tensors = official_tensors(ckpt, path)
    shapes = official_shapes(tensors, path)
    out = {key: to_official(build_official(tensors, shapes, key, path)) for key in tensors}
    g = shapes["generator"]
    args = dict(size=g["resolution"], latent=g["style_dim"], n_mlp=g["n_mlp"])
    if image_only:
        out = {("d" if key == "d_img" else key): {n: t for n, t in state.items() if not n.startswith("to_seg")}
               for key, state in out.items() if key != "d_seg"}
        out["args"] = argparse.Namespace(**args, channel_multiplier=g["channel_multiplier"])
        return out
    # dm_mask is ours (the official code ignores it): as_stage1 reads it back for stage 2's mask temperatures
    mode = "RGB" if g["image_channels"] == 3 else "L"
    out["args"] = argparse.Namespace(**args, seg_dim=g["num_classes"], image_mode=mode,
                                     channel_multiplier=g["channel_multiplier"], dm_mask=trained_dm_mask(ckpt))
    return out


def build_export_parser():
    parser = cli.ArgumentParser(prog="weights.py export-official", description="Write a stage-1 checkpoint in the "
                                 "layout of the official SemanticGAN code (g, g_ema, d_img, d_seg, args), so that its "
                                 "scripts can read it; or, with --image-only, as a rosinality StyleGAN2 checkpoint.")
    parser.add_argument("checkpoint", metavar="RUN_OR_CKPT", help="a train_gan.py checkpoint, or its --out folder "
                        "(the latest checkpoint)")
    parser.add_argument("out", metavar="OUT.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT.pt (never the checkpoint "
                        "exported)")
    parser.add_argument("--image-only", action="store_true", help="rosinality/stylegan2-pytorch's layout (g, g_ema, "
                        "d, args) without the mask branch and D_m: the image generator alone, for --init")
    return parser


def export_main(argv):
    args = build_export_parser().parse_args(argv)
    tmp = f"{args.out}.tmp-{os.getpid()}"
    try:
        path = resolve_checkpoint(args.checkpoint)
        if os.path.exists(args.out) and os.path.samefile(args.out, path):
            raise CheckpointError(f"{args.out} is the checkpoint exported: pass another OUT.pt")
        if os.path.exists(args.out) and not args.overwrite:
            raise CheckpointError(f"{args.out} exists: pass another OUT.pt, or --overwrite to replace it")
        exported = export_official(load_checkpoint(path, "pass a complete train_gan.py checkpoint"), path,
                                   args.image_only)
        torch.save(exported, tmp)
        os.replace(tmp, args.out)  # never a half-written file under the name asked for
    except (CheckpointError, OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        print(f"error: {e}" if isinstance(e, CheckpointError) else
              f"error: cannot write {args.out} ({short_error(e)}); pass a writable path", file=sys.stderr)
        sys.exit(2)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    layout = "rosinality/stylegan2-pytorch" if args.image_only else "the official SemanticGAN code"
    print(f"wrote {args.out}: {path} in the layout of {layout} ({', '.join(exported)})")


if __name__ == "__main__":
    export_main(sys.argv[2:] if sys.argv[1:2] == ["export-official"] else ["--help"])
