"""model.py: shapes, the paper's parameter counts, the StyleGAN2 properties, the stop-gradient, double
backward for R1 and path length, and checkpoints that load with weights_only=True."""
import io
import math
import sys

import pytest
import torch

import model

conv2d_gradfix = sys.modules["ops.conv2d_gradfix"]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def tiny_generator(resolution=32, num_classes=3, image_channels=3, **kw):
    return model.Generator(resolution, num_classes, image_channels, style_dim=32, n_mlp=2, max_channels=16, **kw)


def tiny_encoder(resolution=32, image_channels=3, style_dim=32):
    return model.Encoder(resolution, image_channels, style_dim, units=(1, 1, 1, 1), widths=(8, 8, 16, 16),
                         max_channels=16)


# ---------------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize("resolution", [32, 64, 256])
@pytest.mark.parametrize("num_classes,image_channels", [(1, 1), (2, 3), (8, 3), (8, 1)])
@pytest.mark.parametrize("batch", [1, 4])
def test_shapes_and_dtypes(resolution, num_classes, image_channels, batch):
    torch.manual_seed(0)
    G = model.Generator(resolution, num_classes, image_channels, style_dim=16, n_mlp=2, max_channels=8)
    image, mask, w_plus = G(torch.randn(batch, 16), return_latents=True)
    n_latent = 2 * int(math.log2(resolution)) - 2
    assert image.shape == (batch, image_channels, resolution, resolution) and image.dtype == torch.float32
    assert mask.shape == (batch, num_classes, resolution, resolution) and mask.dtype == torch.float32
    assert w_plus.shape == (batch, n_latent, 16)

    D_r = model.ImageDiscriminator(resolution, image_channels, max_channels=8)
    assert D_r(image).shape == (batch, 1)
    D_m = model.MaskDiscriminator(image_channels, num_classes, base_channels=4, max_channels=8)
    outputs = D_m(*model.generated_pair(image, mask))
    assert len(outputs) == 3 and all(len(scale) == 5 for scale in outputs)
    assert [scale[-1].shape[1] for scale in outputs] == [1, 1, 1]
    assert outputs[0][-1].shape[-1] > outputs[1][-1].shape[-1] > outputs[2][-1].shape[-1]

    E = model.Encoder(resolution, image_channels, style_dim=16, units=(1, 1, 1, 1), widths=(4, 4, 8, 8), max_channels=8)
    assert E(image).shape == (batch, n_latent, 16)


def test_bad_resolution_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        model.Generator(48)


# ---------------------------------------------------------------------------------------------------
# The paper's widths: parameter counts against the official figures (../shared/REFERENCE.md)


def test_parameter_counts_match_the_official_networks():
    G = model.Generator(256, num_classes=8, image_channels=3)
    D_r = model.ImageDiscriminator(256, image_channels=3)
    D_m = model.MaskDiscriminator(image_channels=3, num_classes=8)
    assert n_params(G) == pytest.approx(31.6e6, rel=0.005)
    assert n_params(D_r) == pytest.approx(28.9e6, rel=0.005)
    assert n_params(D_m) == pytest.approx(8.3e6, rel=0.005)
    # the tSeg branch is exactly the tImage branch with K instead of 3 output channels
    t_seg, t_image = n_params(G.t_seg), n_params(G.t_image)
    n_layers, in_channels = len(G.t_seg), sum(t.conv.weight.shape[1] for t in G.t_seg)
    assert t_seg - t_image == (8 - 3) * (in_channels + n_layers)


# ---------------------------------------------------------------------------------------------------
# D_m as the official code builds it and feeds it


def test_d_m_spectral_norm_and_bias_exactly_as_the_official_layers():
    """Official NLayerDiscriminator, 'spectralinstance': plain first and last conv (with bias); spectral norm,
    no bias and instance norm on the three in between."""
    from torch.nn.utils import parametrize
    D_m = model.MaskDiscriminator(image_channels=3, num_classes=8)
    for scale in D_m.scales:
        convs = [m for m in scale.modules() if isinstance(m, torch.nn.Conv2d)]
        assert [parametrize.is_parametrized(c, "weight") for c in convs] == [False, True, True, True, False]
        assert [c.bias is not None for c in convs] == [True, False, False, False, True]
        assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
        assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
        norms = [any(isinstance(m, torch.nn.InstanceNorm2d) for m in layer.modules()) for layer in scale.layers]
        assert norms == [False, True, True, True, False]


@pytest.mark.parametrize("num_classes", [1, 3])
def test_what_d_m_sees_of_real_and_generated_masks(num_classes):
    torch.manual_seed(0)
    mask = torch.randint(0, max(num_classes, 2), (2, 8, 8))
    real = model.real_mask_input(mask, num_classes)  # official: one-hot in {-1, +1}
    assert set(real.unique().tolist()) == {-1.0, 1.0}
    if num_classes > 1:
        assert (real == 1).sum(1).eq(1).all()  # exactly one class per pixel
        assert torch.equal(real.argmax(1), mask)
    else:
        assert torch.equal(real[:, 0] > 0, mask > 0)
    probabilities = model.real_mask_input(mask, num_classes, "probabilities")
    assert set(probabilities.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(probabilities * 2 - 1, real)

    logits = torch.randn(2, num_classes, 8, 8) * 5
    image = torch.randn(2, 3, 8, 8, requires_grad=True)
    generated_image, generated = model.generated_pair(image, logits)  # official: the raw logits
    assert generated is logits and not generated_image.requires_grad
    _, generated = model.generated_pair(image, logits, "probabilities")
    assert generated.min() >= 0 and generated.max() <= 1
    if num_classes > 1:
        torch.testing.assert_close(generated.sum(1), torch.ones(2, 8, 8))
    else:
        torch.testing.assert_close(generated, torch.sigmoid(logits))


# ---------------------------------------------------------------------------------------------------
# StyleGAN2 properties


def test_equalized_lr_keeps_unit_variance_and_scales_gradients():
    torch.manual_seed(0)
    x = torch.randn(4096, 256)
    for layer in (model.EqualLinear(256, 256), model.EqualLinear(256, 256, lr_mul=0.01)):
        assert layer(x).std().item() == pytest.approx(1.0, abs=0.05)
        # the stored weight is N(0, 1 / lr_mul^2) and multiplied by lr_mul / sqrt(fan_in) at run time
        assert layer.weight.std().item() == pytest.approx(1 / layer.lr_mul, rel=0.05)
        layer(x).sum().backward()
        effective_grad = x.sum(0).expand(256, -1) if layer.bias is not None else None
        torch.testing.assert_close(layer.weight.grad, effective_grad * layer.scale, rtol=1e-4, atol=1e-3)
    conv = model.EqualConv2d(64, 64, 3, padding=1)
    assert conv(torch.randn(8, 64, 16, 16))[..., 1:-1, 1:-1].std().item() == pytest.approx(1.0, abs=0.05)


def test_demodulation_gives_unit_variance_per_sample():
    torch.manual_seed(0)
    conv = model.ModulatedConv2d(128, 64, 3, style_dim=32)
    w = torch.randn(6, 32) * 3  # strongly varying styles: demodulation must undo their scale
    y = conv(torch.randn(6, 128, 24, 24), w)[..., 1:-1, 1:-1]
    for std in y.std(dim=[1, 2, 3]):
        assert std.item() == pytest.approx(1.0, abs=0.06)
    # without demodulation the style's scale comes through
    plain = model.ModulatedConv2d(128, 64, 3, style_dim=32, demodulate=False)
    plain.weight.data.copy_(conv.weight.data)
    plain.modulation.load_state_dict(conv.modulation.state_dict())
    assert plain(torch.randn(6, 128, 24, 24), w).std().item() > 1.5


def test_modulated_conv_equals_a_per_sample_weight():
    """Scaling activations by the style and outputs by the demodulation = StyleGAN2's per-sample weight."""
    torch.manual_seed(0)
    for upsample in (False, True):
        conv = model.ModulatedConv2d(6, 5, 3, style_dim=4, upsample=upsample).double()
        x, w = torch.randn(2, 6, 7, 7, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
        got = conv(x, w)
        s = conv.modulation(w)
        for b in range(2):
            weight = conv.weight * conv.scale * s[b][None, :, None, None]
            weight = weight / weight.square().sum([1, 2, 3], keepdim=True).add(1e-8).sqrt()
            if upsample:
                y = torch.nn.functional.conv_transpose2d(x[b:b + 1], weight.transpose(0, 1), stride=2)
                y = model.ops.upfirdn2d(y, conv.blur_kernel.double(), pad=1, gain=4)
            else:
                y = torch.nn.functional.conv2d(x[b:b + 1], weight, padding=1)
            torch.testing.assert_close(got[b:b + 1], y)


def test_truncation_to_the_mean_latent_gives_the_mean_image():
    torch.manual_seed(0)
    G = tiny_generator()
    mean_w = G.mean_latent(256)
    image, mask = G(torch.randn(3, 32), truncation=0.0, truncation_latent=mean_w, randomize_noise=False)
    mean_image, mean_mask = G(mean_w, input_is_w=True, randomize_noise=False)
    torch.testing.assert_close(image, mean_image.expand_as(image))
    torch.testing.assert_close(mask, mean_mask.expand_as(mask))
    half, _ = G(torch.randn(3, 32), truncation=0.5, truncation_latent=mean_w, randomize_noise=False)
    assert not torch.allclose(half[0], half[1])


def test_fixed_noise_is_deterministic_and_random_noise_is_not():
    torch.manual_seed(0)
    G = tiny_generator()
    for module in G.modules():
        if isinstance(module, model.NoiseInjection):
            module.strength.data.fill_(0.5)  # noise strengths start at zero, where noise would not matter
    z = torch.randn(2, 32)
    a = G(z, randomize_noise=False)
    b = G(z, randomize_noise=False)
    c = G(z, randomize_noise=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a[0], c[0])


def test_style_mixing_switches_codes_at_the_crossover():
    torch.manual_seed(0)
    G = tiny_generator()
    z1, z2 = torch.randn(2, 32), torch.randn(2, 32)
    w_plus = G.make_w_plus([z1, z2], mixing_index=3)
    torch.testing.assert_close(w_plus[:, :3], G.mapping(z1)[:, None].expand(-1, 3, -1))
    torch.testing.assert_close(w_plus[:, 3:], G.mapping(z2)[:, None].expand(-1, G.n_latent - 3, -1))


def test_minibatch_stddev_matches_its_definition():
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    y = model.minibatch_stddev(x, group_size=4)  # 6 samples: groups of gcd(6, 4) = 2
    assert y.shape == (6, 4, 2, 2)
    for i in range(6):
        partner = x[i::3] if i < 3 else x[i - 3::3]  # sample i is grouped with i +- 3 (reshape(group, -1, ...))
        want = (partner.var(0, unbiased=False) + 1e-8).sqrt().mean()
        torch.testing.assert_close(y[i, 3], want.expand(2, 2))


# ---------------------------------------------------------------------------------------------------
# The stop-gradient: D_m's loss never reaches tImage, and does reach tSeg


def test_mask_discriminator_gradient_skips_the_image_branch():
    torch.manual_seed(0)
    G = tiny_generator()
    D_m = model.MaskDiscriminator(3, 3, base_channels=8, max_channels=16)
    image, mask = G(torch.randn(4, 32))
    outputs = D_m(*model.generated_pair(image, mask))
    loss = torch.nn.functional.softplus(-torch.cat([s[-1].flatten() for s in outputs])).mean()
    loss.backward()
    for name, p in G.t_image.named_parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0, f"tImage parameter {name} got a D_m gradient"
    seg_grads = [p.grad for p in G.t_seg.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in seg_grads)
    # the shared synthesis layers are shaped through the mask branch
    assert G.convs[-1].conv.weight.grad.abs().sum() > 0
    # and the same loss without the stop-gradient would have reached tImage: the test can tell the difference
    G.zero_grad()
    image, mask = G(torch.randn(4, 32))
    outputs = D_m(image, model.mask_probabilities(mask))
    sum(s[-1].mean() for s in outputs).backward()
    assert G.t_image[-1].conv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# Double backward: R1 through both discriminators, path length through G; PyTorch's convs and gradfix agree


def with_conv_impl(monkeypatch, impl):
    """Route model.py's convolutions through PyTorch's own derivatives ('ref') or the gradfix Functions."""
    monkeypatch.setattr(conv2d_gradfix, "_use_gradfix", lambda x, _: impl == "gradfix")


def r1_gradients(D, inputs):
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    score = D(*inputs)
    if isinstance(score, list):  # D_m: the sum of the scales' mean logits
        score = sum(scale[-1].mean() for scale in score)
    else:
        score = score.sum()
    with model.ops.no_weight_gradients():
        grads = torch.autograd.grad(score, inputs, create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    D.zero_grad()
    penalty.backward()
    return {name: p.grad.clone() for name, p in D.named_parameters() if p.grad is not None}


def test_r1_double_backward_through_both_discriminators(monkeypatch):
    torch.manual_seed(0)
    image = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    mask = model.real_mask_input(torch.randint(0, 3, (2, 32, 32)), 3).double()
    D_r = model.ImageDiscriminator(32, 3, max_channels=8).double()
    D_m = model.MaskDiscriminator(3, 3, base_channels=4, max_channels=8).double()
    D_m.eval()  # freeze spectral norm's power iteration so both impls see the same weights
    for D, inputs in ((D_r, [image]), (D_m, [image, mask])):
        results = {}
        for impl in ("ref", "gradfix"):
            with_conv_impl(monkeypatch, impl)
            results[impl] = r1_gradients(D, inputs)
        grads = results["ref"]
        # every weight is reached (biases need not be: R1 ignores the output's constant shifts, and instance
        # norm removes the bias before it)
        assert all(grads[name].abs().sum() > 0 for name, _ in D.named_parameters() if "bias" not in name)
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert results["gradfix"].keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(results["gradfix"][name], grads[name])


def path_length_gradients(G, z):
    image, _, w_plus = G(z, return_latents=True, randomize_noise=False)
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(1), dtype=image.dtype)
    noise = noise / math.sqrt(image.shape[2] * image.shape[3])
    (grad,) = torch.autograd.grad((image * noise).sum(), w_plus, create_graph=True)
    path_lengths = grad.square().sum(2).mean(1).sqrt()
    G.zero_grad()
    path_lengths.mean().backward()
    return {n: p.grad.clone() for n, p in G.named_parameters() if p.grad is not None}


def test_path_length_double_backward_through_generator(monkeypatch):
    torch.manual_seed(0)
    G = tiny_generator().double()
    z = torch.randn(2, 32, dtype=torch.float64)
    results = {}
    for impl in ("ref", "gradfix"):
        with_conv_impl(monkeypatch, impl)
        results[impl] = path_length_gradients(G, z)
    assert G.mapping.net[1].weight.grad.abs().sum() > 0 and G.convs[0].conv.weight.grad.abs().sum() > 0
    assert results["gradfix"].keys() == results["ref"].keys()
    for name in results["ref"]:
        torch.testing.assert_close(results["gradfix"][name], results["ref"][name])


# ---------------------------------------------------------------------------------------------------
# Checkpoints: state_dicts load with weights_only=True and give the same outputs


def test_state_dict_round_trip_with_weights_only():
    torch.manual_seed(0)
    nets = {
        "G": (tiny_generator(), lambda m: m(torch.ones(2, 32), randomize_noise=False)),
        "D_r": (model.ImageDiscriminator(32, 3, max_channels=8), lambda m: m(torch.ones(2, 3, 32, 32))),
        "D_m": (model.MaskDiscriminator(3, 3, base_channels=4, max_channels=8),
                lambda m: m(torch.ones(2, 3, 32, 32), torch.ones(2, 3, 32, 32))[0][-1]),
        "E": (tiny_encoder(), lambda m: m(torch.ones(2, 3, 32, 32))),
    }
    buffer = io.BytesIO()
    torch.save({name: net.state_dict() for name, (net, _) in nets.items()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    torch.manual_seed(1)
    fresh = {"G": tiny_generator(), "D_r": model.ImageDiscriminator(32, 3, max_channels=8),
             "D_m": model.MaskDiscriminator(3, 3, base_channels=4, max_channels=8), "E": tiny_encoder()}
    for name, (net, run) in nets.items():
        fresh[name].load_state_dict(loaded[name])
        net.eval(), fresh[name].eval()
        torch.testing.assert_close(run(fresh[name]), run(net))
