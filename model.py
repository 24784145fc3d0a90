"""The four networks of SemanticGAN (Li et al., CVPR 2021, Fig. 2 and 3).

    G    : z -> w (mapping, 8 layers) -> (image x, mask logits y)     StyleGAN2 config-f + a tSeg branch
    D_r  : x -> realism score                                         StyleGAN2 residual discriminator
    D_m  : (x, y) -> per-patch scores at 3 scales (+ features)        pix2pixHD multi-scale patch discriminator
    E    : x -> w+ (one w per style input of G)                       pSp encoder (feature pyramid over IR-SE)

Generator: StyleGAN2's synthesis network (Karras et al. 2020): a learned 4x4 constant, two modulated 3x3
convolutions per resolution (weight demodulation, per-pixel noise with a learned strength, bias + leaky ReLU)
and the "skip" output architecture. Beside every tImage layer (ToRGB) SemanticGAN adds a tSeg layer on the
same features and style: a 1x1 modulated convolution without demodulation plus a bias, giving K mask logits.
Both outputs are upsampled and summed across resolutions (Fig. 3):
    x = sum_r up(tImage_r(h_r, w_r)),   y = sum_r up(tSeg_r(h_r, w_r)).
A modulated convolution scales its input channels by the style s and its output channels by the demodulation d,
    y = (W * (x . s)) . d,   d_o = 1 / sqrt(sum_{i,k} (s_i W_oik)^2 + 1e-8),
which equals convolving with the per-sample weight s_i W_oik d_o (StyleGAN2 Eq. 1-3) but is one ordinary
convolution for the whole batch: faster than a grouped one, and its double backward (path length) never
needs the gradient w.r.t. a convolution weight to reach the style.

Discriminators. D_r is StyleGAN2's (residual blocks, minibatch standard deviation). D_m is the official
code's, pix2pixHD's multi-scale discriminator (Wang et al. 2018): 3 scales, the input average-pooled (3x3,
stride 2) between them; each a plain strided 4x4 convolution from 64 channels, two more strided and one
stride-1 4x4 convolution with spectral norm and instance norm (no bias), then a plain 1-channel 4x4 output;
LeakyReLU 0.2; every layer's output is returned for the feature-matching loss. Its input is the image and K
mask channels concatenated. With dm_mask="logits" (the default, the official code's), a generated mask enters
as its raw logits and a real one as one-hot in {-1, +1} (the official dataset.py normalises masks like images),
so G learns logits of about +-1; with "probabilities" (ours, an option until a GPU run compares them), as
softmax probabilities (sigmoid for K = 1) against one-hot in {0, 1}, so that D_m judges the shape and
alignment of a mask rather than the scale of its logits (as in Luc et al. 2016, adversarial segmentation).

Stop-gradient: D_m must shape only the mask branch, so in G's step the image of a generated pair is detached
before D_m sees it (`generated_pair`). D_m's gradient then reaches the tSeg layers and, through them, the
shared synthesis layers and the mapping network, never the tImage layers.

Encoder: pSp (Richardson et al. 2021): an IR-SE ResNet body (trained from scratch: nothing is downloaded), a
feature pyramid with lateral 1x1 connections, and per style a map2style head (strided 3x3 convolutions +
LeakyReLU down to 1x1, then an equalized linear layer): styles 0-2 from the coarse map (1/16 of the input),
3-6 from the middle one (1/8), the rest from the fine one (1/4). It predicts offsets from G's mean latent.

Equalized learning rate (Karras et al. 2018): weights are stored N(0, 1) and scaled at run time by
1/sqrt(fan_in) (times a learning-rate multiplier); `ops.bias_act` applies bias + leaky ReLU with gain sqrt(2).

Also here, shared by training and inference: reading a stage-1 checkpoint (`load_checkpoint`, `load_generator`,
`resolve_checkpoint`) and model.pt, the inference bundle (`load_bundle`, `BUNDLE_FORMAT`), the decision on mask
logits (`mask_classes`) and bf16 autocast (`make_autocast`); other code's checkpoints (the official SemanticGAN
code's, rosinality's) are weights.py's. invert.py and generate.py need this file, losses.py, data.py and ops/,
never the training scripts. Needs: torch and ops/.
"""

import argparse
import math
import os
import random
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

import ops

# ----------------------------------------------------------------------------------------------------
# Widths


def stylegan_channels(resolution, channel_multiplier=2, max_channels=512):
    """Feature maps at a resolution in StyleGAN2 config-f (512 up to 32 px, then halving), capped at
    max_channels (narrow networks for CPU demos and tests; the default is the paper's)."""
    width = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
             256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}[resolution]
    return min(width, max_channels)


RESOLUTIONS = (32, 64, 128, 256, 512, 1024)


def check_resolution(resolution):
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be a power of two from 32 to 1024, got {resolution}")
    return int(math.log2(resolution))


# ----------------------------------------------------------------------------------------------------
# Equalized-learning-rate layers


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate: y = act(x (W c)^T + b lr_mul), c = lr_mul / sqrt(in)."""

    def __init__(self, in_dim, out_dim, bias=True, bias_init=0.0, lr_mul=1.0, activation=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full([out_dim], float(bias_init))) if bias else None
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation  # None or 'lrelu'

    def forward(self, x):
        bias = None if self.bias is None else self.bias * self.lr_mul
        if self.activation:
            return ops.bias_act(F.linear(x, self.weight * self.scale), bias, act=self.activation)
        return F.linear(x, self.weight * self.scale, bias)


class EqualConv2d(nn.Module):
    """Convolution with equalized learning rate (weight scaled by 1/sqrt(in * k * k) at run time)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.stride, self.padding = stride, padding

    def forward(self, x):
        return ops.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)


class PixelNorm(nn.Module):
    """Normalise each latent to unit root-mean-square (the input of the mapping network)."""

    def forward(self, z):
        return z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)


# ----------------------------------------------------------------------------------------------------
# Generator


class MappingNetwork(nn.Module):
    """z -> w: pixel norm, then n_layers equalized linear layers with lr multiplier 0.01 and leaky ReLU."""

    def __init__(self, style_dim=512, n_layers=8, lr_mul=0.01):
        super().__init__()
        layers = [PixelNorm()]
        layers += [EqualLinear(style_dim, style_dim, lr_mul=lr_mul, activation="lrelu") for _ in range(n_layers)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class ModulatedConv2d(nn.Module):
    """Modulated convolution, optionally demodulated, optionally upsampling by 2 as StyleGAN2: a stride-2
    transposed convolution, then the [1, 3, 3, 1] low-pass filter (never a zero-inserted tensor)."""

    def __init__(self, in_channels, out_channels, kernel_size, style_dim, demodulate=True, upsample=False,
                 blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.modulation = EqualLinear(style_dim, in_channels, bias_init=1.0)  # styles start at 1: identity
        self.demodulate, self.upsample = demodulate, upsample
        self.padding = kernel_size // 2
        if upsample:
            self.register_buffer("blur_kernel", ops.setup_filter(blur_kernel), persistent=False)

    def forward(self, x, w):
        style = self.modulation(w)  # [B, in]
        weight = self.weight * self.scale  # [out, in, k, k]
        x = x * style.to(x.dtype)[:, :, None, None]
        if self.upsample:
            x = ops.conv_transpose2d(x, weight.transpose(0, 1), stride=2)  # 2H + k - 2
            # the filter crops the extra k - 2 = 1 sample and smooths: 2H exactly
            x = ops.upfirdn2d(x, self.blur_kernel, pad=1, gain=4)
        else:
            x = ops.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            # d[b, o] = 1 / sqrt(sum_i s[b, i]^2 sum_k W[o, i, k]^2): the norm of the per-sample weight
            demod = torch.rsqrt(style.square() @ weight.square().sum([2, 3]).t() + 1e-8)  # [B, out]
            x = x * demod.to(x.dtype)[:, :, None, None]
        return x


class NoiseInjection(nn.Module):
    """x + strength * noise, with one learned strength per layer (zero at start)."""

    def __init__(self):
        super().__init__()
        self.strength = nn.Parameter(torch.zeros([]))

    def forward(self, x, noise):
        return x + self.strength * noise


class StyledConv(nn.Module):
    """Modulated conv -> noise -> bias + leaky ReLU: one layer of the synthesis network."""

    def __init__(self, in_channels, out_channels, kernel_size, style_dim, upsample=False, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, kernel_size, style_dim, upsample=upsample,
                                    blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x, w, noise):
        x = self.noise(self.conv(x, w), noise)
        return ops.bias_act(x, self.bias.to(x.dtype), act="lrelu")


class ToOutput(nn.Module):
    """tImage (ToRGB) and tSeg: a 1x1 modulated conv without demodulation + bias, added to the upsampled
    output of the resolution below (the skip architecture)."""

    def __init__(self, in_channels, out_channels, style_dim, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("blur_kernel", ops.setup_filter(blur_kernel), persistent=False)

    def forward(self, x, w, skip=None):
        out = ops.bias_act(self.conv(x, w), self.bias.to(x.dtype))
        if skip is not None:
            out = out + ops.upsample2d(skip, self.blur_kernel)
        return out


class Generator(nn.Module):
    """G: returns (image, mask logits). num_classes: the mask channels, one logit per class, or 1 for a binary
    task in the official form (the foreground's logit; mask_channels)."""

    def __init__(self, resolution=256, num_classes=8, image_channels=3, style_dim=512, n_mlp=8,
                 channel_multiplier=2, max_channels=512, lr_mlp=0.01, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.config = dict(resolution=resolution, num_classes=num_classes,  # Generator(**G.config) rebuilds it
                           image_channels=image_channels, style_dim=style_dim, n_mlp=n_mlp,
                           channel_multiplier=channel_multiplier, max_channels=max_channels, lr_mlp=lr_mlp,
                           blur_kernel=tuple(blur_kernel))
        log_size = check_resolution(resolution)
        self.resolution, self.num_classes, self.image_channels = resolution, num_classes, image_channels
        self.style_dim = style_dim
        self.n_latent = 2 * log_size - 2  # one w per modulated conv layer that reads a new style
        ch = lambda r: stylegan_channels(r, channel_multiplier, max_channels)  # noqa: E731

        self.mapping = MappingNetwork(style_dim, n_mlp, lr_mlp)
        self.constant = nn.Parameter(torch.randn(1, ch(4), 4, 4))
        self.conv1 = StyledConv(ch(4), ch(4), 3, style_dim, blur_kernel=blur_kernel)
        self.t_image = nn.ModuleList([ToOutput(ch(4), image_channels, style_dim, blur_kernel)])
        self.t_seg = nn.ModuleList([ToOutput(ch(4), num_classes, style_dim, blur_kernel)])
        self.convs = nn.ModuleList()
        for log_r in range(3, log_size + 1):
            r = 2 ** log_r
            self.convs.append(StyledConv(ch(r // 2), ch(r), 3, style_dim, upsample=True, blur_kernel=blur_kernel))
            self.convs.append(StyledConv(ch(r), ch(r), 3, style_dim, blur_kernel=blur_kernel))
            self.t_image.append(ToOutput(ch(r), image_channels, style_dim, blur_kernel))
            self.t_seg.append(ToOutput(ch(r), num_classes, style_dim, blur_kernel))
        # fixed noise maps for reproducible samples (randomize_noise=False)
        self.noise_resolutions = [4] + [2 ** (k // 2 + 3) for k in range(len(self.convs))]
        for i, r in enumerate(self.noise_resolutions):
            self.register_buffer(f"noise_{i}", torch.randn(1, 1, r, r))

    @torch.no_grad()
    def mean_latent(self, n=4096, device=None):
        """The average w of n random z: the centre that truncation pulls towards."""
        z = torch.randn(n, self.style_dim, device=device or self.constant.device)
        return self.mapping(z).mean(0, keepdim=True)

    def make_w_plus(self, latents, input_is_w=False, truncation=1.0, truncation_latent=None, mixing_index=None):
        """z / w codes -> W+ [B, n_latent, style_dim]. latents: a tensor [B, D], or a list of one or two (style
        mixing: the first drives the styles before `mixing_index`, random if None, the second the rest), or with
        input_is_w a W+ tensor [B, n_latent, D]. Truncation pulls every w towards `truncation_latent` (default:
        the mean latent, estimated on the spot)."""
        if isinstance(latents, torch.Tensor) and latents.ndim == 3:
            if not input_is_w:
                raise ValueError("a [B, n_latent, D] latent is a W+ code: pass input_is_w=True")
            w_plus = latents
        else:
            codes = [latents] if isinstance(latents, torch.Tensor) else list(latents)
            ws = codes if input_is_w else [self.mapping(z) for z in codes]
            if len(ws) == 1:
                w_plus = ws[0][:, None].expand(-1, self.n_latent, -1)
            else:
                index = random.randint(1, self.n_latent - 1) if mixing_index is None else mixing_index
                w_plus = torch.cat([ws[0][:, None].expand(-1, index, -1),
                                    ws[1][:, None].expand(-1, self.n_latent - index, -1)], dim=1)
        if truncation != 1.0:
            center = truncation_latent if truncation_latent is not None else self.mean_latent()
            w_plus = center + truncation * (w_plus - center)
        return w_plus

    def make_noise(self, batch, randomize_noise=True):
        if not randomize_noise:
            return [getattr(self, f"noise_{i}") for i in range(len(self.noise_resolutions))]
        return [torch.randn(batch, 1, r, r, device=self.constant.device) for r in self.noise_resolutions]

    def synthesis(self, w_plus, noise):
        """W+ [B, n_latent, D] and noise maps -> (image [B, C, R, R], mask logits [B, K, R, R])."""
        x = self.constant.expand(w_plus.shape[0], -1, -1, -1)
        x = self.conv1(x, w_plus[:, 0], noise[0])
        image = self.t_image[0](x, w_plus[:, 1])
        mask = self.t_seg[0](x, w_plus[:, 1])
        i = 1
        for up_conv, conv, t_image, t_seg, n1, n2 in zip(self.convs[::2], self.convs[1::2], self.t_image[1:],
                                                         self.t_seg[1:], noise[1::2], noise[2::2]):
            x = up_conv(x, w_plus[:, i], n1)
            x = conv(x, w_plus[:, i + 1], n2)
            image = t_image(x, w_plus[:, i + 2], image)
            mask = t_seg(x, w_plus[:, i + 2], mask)
            i += 2
        return image, mask

    def forward(self, latents, input_is_w=False, truncation=1.0, truncation_latent=None, mixing_index=None,
                noise=None, randomize_noise=True, return_latents=False):
        """(image, mask logits), or (image, mask logits, W+) with return_latents (path length needs W+)."""
        w_plus = self.make_w_plus(latents, input_is_w, truncation, truncation_latent, mixing_index)
        if noise is None:
            noise = self.make_noise(w_plus.shape[0], randomize_noise)
        image, mask = self.synthesis(w_plus, noise)
        return (image, mask, w_plus) if return_latents else (image, mask)


def mask_probabilities(mask_logits):
    """Class probabilities of mask logits: softmax over K channels, or a sigmoid when K = 1."""
    return torch.sigmoid(mask_logits) if mask_logits.shape[1] == 1 else torch.softmax(mask_logits, dim=1)


def mask_classes(mask_logits):
    """Predicted class map [B, H, W] of mask logits [B, K, H, W]: argmax, or sigmoid > 0.5 (logit > 0) for one
    channel. The one decision used everywhere: stage 1's samples, stage 2's validation, invert.py, generate.py."""
    return (mask_logits[:, 0] > 0).long() if mask_logits.shape[1] == 1 else mask_logits.argmax(1)


# Binary tasks (one foreground class: lungs, lesions, the liver): "sigmoid", the official form (GeneratorSeg's
# seg_dim 1), gives them one mask channel: D_m sees it, stage 2 takes a binary cross-entropy and a Dice on it, the
# decision is logit > 0 (sigmoid > 0.5). "softmax" keeps two channels, as any K.
BINARY_FORMS = ("sigmoid", "softmax")


def mask_channels(num_classes, binary="sigmoid"):
    """The generator's mask channels for `num_classes` classes (background included): 1 for two classes in
    the official sigmoid form, else one per class."""
    return 1 if num_classes == 2 and binary == "sigmoid" else num_classes


def one_hot_mask(mask, num_classes):
    """A class-index mask [B, H, W] as one-hot [B, K, H, W] in {0, 1}, or (mask > 0) [B, 1, H, W] when K = 1."""
    if num_classes == 1:
        return (mask > 0).float()[:, None]
    return F.one_hot(mask.long(), num_classes).permute(0, 3, 1, 2).float()


DM_MASK_INPUTS = ("logits", "probabilities")


def real_mask_input(mask, num_classes, dm_mask="logits"):
    """A real class-index mask [B, H, W] as D_m sees it: [B, K, H, W] one-hot in {-1, +1} ("logits") or
    {0, 1} ("probabilities"); for K = 1 the single channel is (mask > 0)."""
    one_hot = one_hot_mask(mask, num_classes)
    return one_hot * 2 - 1 if dm_mask == "logits" else one_hot


def generated_mask_input(mask_logits, dm_mask="logits"):
    """Generated mask logits as D_m sees them: as they are ("logits") or as class probabilities."""
    return mask_logits if dm_mask == "logits" else mask_probabilities(mask_logits)


def generated_pair(image, mask_logits, dm_mask="logits"):
    """The (image, mask) pair D_m judges for the generator, the image detached (the stop-gradient): D_m can make
    masks agree with images, never bend images towards masks."""
    return image.detach(), generated_mask_input(mask_logits, dm_mask)


# ----------------------------------------------------------------------------------------------------
# D_r: the image discriminator


class ConvLayer(nn.Sequential):
    """[blur + stride-2 conv | conv] + optional bias and leaky ReLU (StyleGAN2 discriminator layer)."""

    def __init__(self, in_channels, out_channels, kernel_size, downsample=False, blur_kernel=(1, 3, 3, 1),
                 bias=True, activate=True):
        layers = []
        if downsample:
            # low-pass first, then a strided conv: the padding makes an even input exactly halve
            p = (len(blur_kernel) - 2) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias and not activate))
        if activate:
            layers.append(BiasLeakyReLU(out_channels, bias=bias))
        super().__init__(*layers)


class Blur(nn.Module):
    def __init__(self, kernel, pad):
        super().__init__()
        self.register_buffer("kernel", ops.setup_filter(kernel), persistent=False)
        self.pad = (pad[0], pad[1], pad[0], pad[1])

    def forward(self, x):
        return ops.upfirdn2d(x, self.kernel, pad=self.pad)


class BiasLeakyReLU(nn.Module):
    def __init__(self, channels, bias=True):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x):
        return ops.bias_act(x, None if self.bias is None else self.bias.to(x.dtype), act="lrelu")


class ResBlock(nn.Module):
    """Two 3x3 convs (the second halving the resolution) plus a 1x1 downsampled skip, summed / sqrt(2)."""

    def __init__(self, in_channels, out_channels, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.conv1 = ConvLayer(in_channels, in_channels, 3)
        self.conv2 = ConvLayer(in_channels, out_channels, 3, downsample=True, blur_kernel=blur_kernel)
        self.skip = ConvLayer(in_channels, out_channels, 1, downsample=True, blur_kernel=blur_kernel,
                              bias=False, activate=False)

    def forward(self, x):
        return (self.conv2(self.conv1(x)) + self.skip(x)) * (1 / math.sqrt(2))


def minibatch_stddev(x, group_size=4):
    """Append the average standard deviation of features over groups of samples (StyleGAN, Sec. 3); a group is
    the largest divisor of the batch <= group_size, so any batch size works."""
    B, C, H, W = x.shape
    group = math.gcd(B, group_size)
    std = x.reshape(group, -1, C, H, W).var(0, unbiased=False).add(1e-8).sqrt()  # [B/group, C, H, W]
    std = std.mean([1, 2, 3]).reshape(-1, 1, 1, 1).repeat(group, 1, H, W)
    return torch.cat([x, std.to(x.dtype)], dim=1)


class ImageDiscriminator(nn.Module):
    """D_r: StyleGAN2's residual discriminator on images. Returns one logit per image [B, 1]."""

    def __init__(self, resolution=256, image_channels=3, channel_multiplier=2, max_channels=512,
                 blur_kernel=(1, 3, 3, 1), stddev_group=4):
        super().__init__()
        log_size = check_resolution(resolution)
        ch = lambda r: stylegan_channels(r, channel_multiplier, max_channels)  # noqa: E731
        self.blocks = nn.Sequential(ConvLayer(image_channels, ch(resolution), 1), *[
            ResBlock(ch(2 ** log_r), ch(2 ** (log_r - 1)), blur_kernel) for log_r in range(log_size, 2, -1)])
        self.stddev_group = stddev_group
        self.final_conv = ConvLayer(ch(4) + 1, ch(4), 3)
        self.final_linear = EqualLinear(ch(4) * 4 * 4, ch(4), activation="lrelu")
        self.out = EqualLinear(ch(4), 1)

    def forward(self, image):
        x = self.blocks(image)
        x = self.final_conv(minibatch_stddev(x, self.stddev_group))
        return self.out(self.final_linear(x.flatten(1)))


# ----------------------------------------------------------------------------------------------------
# D_m: the image-and-mask discriminator


class PatchConv(nn.Conv2d):
    """A 4x4 convolution (padding 2, as pix2pixHD) that runs through ops.conv2d, whose double backward (R1)
    is the cheap one. `normalized`: spectral norm (Miyato et al. 2018) on the weight and no bias, because
    the instance norm that follows would subtract it again (the official get_norm_layer removes it too)."""

    def __init__(self, in_channels, out_channels, stride, normalized=False):
        super().__init__(in_channels, out_channels, kernel_size=4, stride=stride, padding=2, bias=not normalized)
        if normalized:
            nn.utils.parametrizations.spectral_norm(self)

    def forward(self, x):
        return ops.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)


class PatchDiscriminator(nn.Module):
    """One scale of D_m, as the official NLayerDiscriminator with norm 'spectralinstance' (the n_layers middle
    convolutions normalized, InstanceNorm without affine parameters); returns every layer's output, the last
    the logit map."""

    def __init__(self, in_channels, base_channels=64, n_layers=3, max_channels=512):
        super().__init__()
        layers = [nn.Sequential(PatchConv(in_channels, base_channels, 2), nn.LeakyReLU(0.2))]
        c = base_channels
        for n in range(1, n_layers + 1):
            c_next = min(c * 2, max_channels)
            stride = 2 if n < n_layers else 1  # n_layers strided convs in all (with the first), then stride 1
            layers.append(nn.Sequential(PatchConv(c, c_next, stride, normalized=True), nn.InstanceNorm2d(c_next),
                                        nn.LeakyReLU(0.2)))
            c = c_next
        layers.append(PatchConv(c, 1, 1))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features


class MaskDiscriminator(nn.Module):
    """D_m: forward(image, mask [B, K, H, W] from real_mask_input / generated_mask_input) -> per scale (finest
    first) the list of that scale's layer outputs, [-1] of each the logit map."""

    def __init__(self, image_channels=3, num_classes=8, num_scales=3, base_channels=64, n_layers=3,
                 max_channels=512):
        super().__init__()
        self.scales = nn.ModuleList([PatchDiscriminator(image_channels + num_classes, base_channels, n_layers,
                                                        max_channels) for _ in range(num_scales)])

    def forward(self, image, mask):
        x = torch.cat([image, mask.to(image.dtype)], dim=1)
        outputs = []
        for i, scale in enumerate(self.scales):
            if i > 0:
                x = F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)
            outputs.append(scale(x))
        return outputs


# ----------------------------------------------------------------------------------------------------
# E: the pSp encoder


class SqueezeExcite(nn.Module):
    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(),
                                nn.Conv2d(hidden, channels, 1, bias=False), nn.Sigmoid())

    def forward(self, x):
        return x * self.fc(x)


class BottleneckIRSE(nn.Module):
    """IR-SE unit (ArcFace's improved residual unit with squeeze-excitation), as in pSp's backbone."""

    def __init__(self, in_channels, depth, stride):
        super().__init__()
        if in_channels == depth:
            self.shortcut = nn.MaxPool2d(1, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.residual = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth), SqueezeExcite(depth))

    def forward(self, x):
        return self.shortcut(x) + self.residual(x)


class Map2Style(nn.Module):
    """Strided 3x3 convs + LeakyReLU (slope 0.01, as pSp and the official ToStyleCode) from a spatial x
    spatial map down to 1x1, then an equalized linear."""

    def __init__(self, in_channels, style_dim, spatial):
        super().__init__()
        layers = []
        for k in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(in_channels if k == 0 else style_dim, style_dim, 3, 2, 1), nn.LeakyReLU(0.01)]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(style_dim, style_dim)

    def forward(self, x):
        return self.linear(self.convs(x).flatten(1))


class Encoder(nn.Module):
    """pSp's GradualStyleEncoder: x -> W+ [B, n_latent, style_dim] = latent_avg + predicted offsets."""

    def __init__(self, resolution=256, image_channels=3, style_dim=512, units=(3, 4, 14, 3),
                 widths=(64, 128, 256, 512), max_channels=512):
        super().__init__()
        self.config = dict(resolution=resolution, image_channels=image_channels, style_dim=style_dim,
                           units=tuple(units), widths=tuple(widths), max_channels=max_channels)  # Encoder(**E.config)
        log_size = check_resolution(resolution)
        self.n_latent = 2 * log_size - 2
        self.coarse, self.middle = 3, 7  # styles [0, 3) coarse, [3, 7) middle, [7, n) fine
        widths = [min(w, max_channels) for w in widths]
        pyramid = min(512, max_channels)
        self.input_layer = nn.Sequential(nn.Conv2d(image_channels, widths[0], 3, 1, 1, bias=False),
                                         nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0]))
        stages, c = [], widths[0]
        for n, depth in zip(units, widths):  # each stage halves the resolution
            stages.append(nn.Sequential(*[BottleneckIRSE(c if k == 0 else depth, depth, 2 if k == 0 else 1)
                                          for k in range(n)]))
            c = depth
        self.stages = nn.ModuleList(stages)
        # lateral connections bring the 1/8 and 1/4 maps to the pyramid's width
        self.lateral_middle = nn.Conv2d(widths[2], pyramid, 1)
        self.lateral_fine = nn.Conv2d(widths[1], pyramid, 1)
        self.top = nn.Conv2d(widths[3], pyramid, 1) if widths[3] != pyramid else nn.Identity()
        factors = [16] * self.coarse + [8] * (self.middle - self.coarse) + [4] * (self.n_latent - self.middle)
        self.heads = nn.ModuleList(Map2Style(pyramid, style_dim, resolution // f) for f in factors)
        self.register_buffer("latent_avg", torch.zeros(style_dim))

    def forward(self, x):
        x = self.input_layer(x)
        x = self.stages[0](x)
        fine = self.stages[1](x)       # 1/4 resolution
        middle = self.stages[2](fine)  # 1/8
        coarse = self.top(self.stages[3](middle))  # 1/16
        styles = [head(coarse) for head in self.heads[:self.coarse]]
        p_middle = _upsample_add(coarse, self.lateral_middle(middle))
        styles += [head(p_middle) for head in self.heads[self.coarse:self.middle]]
        p_fine = _upsample_add(p_middle, self.lateral_fine(fine))
        styles += [head(p_fine) for head in self.heads[self.middle:]]
        return torch.stack(styles, dim=1) + self.latent_avg


def _upsample_add(x, lateral):
    return F.interpolate(x, size=lateral.shape[2:], mode="bilinear", align_corners=True) + lateral


# ----------------------------------------------------------------------------------------------------
# Reading a stage-1 checkpoint of train_gan.py and model.pt of train_encoder.py (so that inference needs no
# training script), and the precision the networks run in


class CheckpointError(Exception):
    """A checkpoint or model.pt that is missing, unreadable or of another kind. The message is one line naming
    the file and what to pass instead; every script prints it as `error: ...` and exits with status 2."""


def short_error(error):
    """'OSError: [Errno 28] No space left on device' (the first line, the type named)."""
    text = str(error).strip().splitlines()
    if text and text[0].startswith("Weights only load failed"):
        # torch's first line advises weights_only=False, which would run whatever code the file holds
        return "not a checkpoint of plain tensors and data (a pickle that needs code, or another kind of file)"
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def load_checkpoint(path, advice="delete it to resume from the one before, or pass another --resume"):
    """What torch.save wrote at `path`, read with weights_only=True (this project's files hold state_dicts and
    plain data only, so reading one cannot run code), allowing argparse.Namespace, which holds the arguments of
    the official SemanticGAN and rosinality checkpoints. A missing or unreadable file, or one that needs code to
    unpickle, is a CheckpointError ending in `advice`."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist: pass an existing file or --resume auto") from None
    except OSError as e:  # a folder, no permission
        raise CheckpointError(f"checkpoint {path} cannot be read ({short_error(e)}); {advice}") from None
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # a zip (torch.save), or a pickle (older)
        raise CheckpointError(f"checkpoint {path} cannot be read: it is not a file torch.save wrote (it starts with "
                              f"{head!r}); {advice}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if needs:  # torch's message runs over several lines: name the class instead
            raise CheckpointError(f"checkpoint {path} cannot be read: unpickling it needs code ({needs[1]}), which "
                                  f"is never run here; save its state_dicts and plain data only, or {advice}")
        raise CheckpointError(f"checkpoint {path} cannot be read ({short_error(e)}); {advice}")


def generator_config(ckpt):
    """Generator arguments of a stage-1 checkpoint."""
    a = ckpt["args"]
    channels = ckpt.get("mask_channels", ckpt["num_classes"])  # older checkpoints: one channel per class
    return dict(resolution=a["resolution"], num_classes=channels, image_channels=ckpt["image_channels"],
                style_dim=a["style_dim"], n_mlp=a["n_mlp"], channel_multiplier=a["channel_multiplier"],
                max_channels=a["max_channels"])


def load_generator(ckpt, path, device):
    """G_ema of a stage-1 checkpoint (as load_checkpoint read it from `path`; an official SemanticGAN checkpoint
    once weights.as_stage1 has read it as one), in eval mode, without gradients."""
    if not isinstance(ckpt, dict) or not {"G_ema", "args", "num_classes", "image_channels"} <= set(ckpt):
        raise CheckpointError(f"{path} is not a stage-1 checkpoint of train_gan.py (no G_ema and arguments) nor "
                              "one of the official SemanticGAN code (g_ema); pass --ckpt OUT/checkpoint-STEP.pt of a "
                              "train_gan.py run")
    G = Generator(**generator_config(ckpt))
    G.load_state_dict(ckpt["G_ema"])
    return G.to(device).eval().requires_grad_(False)


# model.pt (train_encoder.make_bundle), the layout BUNDLE_FORMAT names: "G_ema" and "E" (state_dicts), "generator" and
# "encoder" (their constructors' arguments), "mean_latent", "preprocessing" (resolution, channels, fit), "num_classes"
# (background included), "class_names", "lpips" (the network stage 2 used), "step", "validation", "args" and
# "stage1_args"; optional (older files lack it): "labeled_errors", the encoder's reconstruction errors of the labeled
# training images ({"lpips_net", "lpips": [...], "mse": [...]}), invert.py's error_ratio; "flag_images" ({"images":
# uint8 [N, C, R, R], "source"}), held-out images invert.py calibrates its flag on.
BUNDLE_FORMAT = "semanticgan-model-1"


def load_bundle(path, device="cpu"):
    """(G_ema, E, bundle) from a model.pt of train_encoder.py; CheckpointError (one line) if it is not one."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such model file; pass --model OUT/model.pt of a train_encoder.py run")
    bundle = load_checkpoint(path, "pass --model OUT/model.pt of a train_encoder.py run")
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{path} is not a model.pt of train_encoder.py (a stage-1 checkpoint is not enough: "
                              "train the encoder on it first); pass --model OUT/model.pt")
    G = Generator(**bundle["generator"])
    G.load_state_dict(bundle["G_ema"])
    E = Encoder(**bundle["encoder"])
    E.load_state_dict(bundle["E"])
    return G.to(device).eval().requires_grad_(False), E.to(device).eval().requires_grad_(False), bundle


def make_autocast(args, device):
    """(autocast, precision) for --precision: `autocast()` is a bf16 autocast context on `device` for "bf16",
    and for "auto" on a GPU that has bf16, else a disabled one (fp32); `precision` says which."""
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    enabled = precision == "bf16"
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled), precision


def list_checkpoints(folder):
    """The complete checkpoint-STEP.pt in `folder`, oldest first (temporary files of interrupted writes ignored)."""
    names = sorted(name for name in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if re.fullmatch(r"checkpoint-\d{8}\.pt", name))
    return [os.path.join(folder, name) for name in names]


def resolve_checkpoint(path):
    """A checkpoint file, or the latest checkpoint-STEP.pt of a train_gan.py --out folder."""
    if os.path.isdir(path):
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"{path}: no checkpoint-STEP.pt in this folder; pass a train_gan.py --out folder or "
                                  "a checkpoint")
        return found[-1]
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file; pass a checkpoint or a train_gan.py --out folder")
    return path
