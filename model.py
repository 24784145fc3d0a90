"""The four networks of SemanticGAN (Li et al., CVPR 2021, Fig. 2 and 3).

    G    : z -> w (mapping, 8 layers) -> (image x, mask logits y)     StyleGAN2 config-f + a tSeg branch
    D_r  : x -> realism score                                         StyleGAN2 residual discriminator
    D_m  : (x, y) -> per-patch scores at 3 scales (+ features)        pix2pixHD multi-scale patch discriminator
    E    : x -> w+ (one w per style input of G)                       pSp encoder (feature pyramid over IR-SE)

Generator. The synthesis network is StyleGAN2's (Karras et al. 2020): a learned 4x4 constant, two modulated
3x3 convolutions per resolution (weight demodulation, per-pixel noise with a learned strength, bias + leaky
ReLU), and the "skip" output architecture. SemanticGAN adds, beside every tImage layer (ToRGB), a tSeg
layer fed by the same features and the same style: a 1x1 modulated convolution without demodulation plus a
bias, producing K mask logits. Both outputs are upsampled and summed across resolutions (Fig. 3), so
    x = sum_r up(tImage_r(h_r, w_r)),   y = sum_r up(tSeg_r(h_r, w_r)).
The style of a modulated convolution scales its input channels and the demodulation coefficient scales its
output channels,
    y = (W * (x . s)) . d,   d_o = 1 / sqrt(sum_{i,k} (s_i W_oik)^2 + 1e-8),
which equals convolving with the per-sample weight s_i W_oik d_o (StyleGAN2 Eq. 1-3) but stays one ordinary
convolution for the whole batch: faster than a grouped convolution, and its double backward (path length)
never needs the gradient w.r.t. a convolution weight to reach the style.

Discriminators. D_r follows StyleGAN2 (residual blocks, minibatch standard deviation). D_m follows the
official SemanticGAN code, which takes pix2pixHD's multi-scale discriminator (Wang et al. 2018): 3 scales,
the input average-pooled (3x3, stride 2) between them; each scale a plain strided 4x4 convolution from 64
channels, two more strided and one stride-1 4x4 convolution with spectral norm and instance norm (and no
bias), then a plain 1-channel 4x4 output; LeakyReLU 0.2; every layer's output is returned for the
feature-matching loss. Its input is the image and K mask channels concatenated. By default, as in the
official code, a generated mask enters as its raw logits and a real one as one-hot in {-1, +1}; with
dm_mask="probabilities" (ours, an option until a GPU run compares them) as softmax probabilities (sigmoid
for K = 1) against one-hot in {0, 1}, so that D_m judges the shape and alignment of a mask rather than the
scale of its logits (as in Luc et al. 2016, adversarial segmentation).

The stop-gradient. D_m must shape only the mask branch: in the generator's step the image of a generated
pair is detached before D_m sees it (`generated_pair`). D_m's gradient then reaches the tSeg layers and,
through them, the shared synthesis layers and the mapping network, and never the tImage layers.

Encoder. pSp (Richardson et al. 2021): an IR-SE ResNet body (trained from scratch: no pretrained weights
are downloaded), a feature pyramid with lateral 1x1 connections, and one map2style head (strided 3x3
convolutions + LeakyReLU down to 1x1, then an equalized linear layer) per style: styles 0-2 from the coarse
map (1/16 of the input), 3-6 from the middle one (1/8), the rest from the fine one (1/4). It predicts
offsets from the generator's mean latent.

Equalized learning rate (Karras et al. 2018): weights are stored N(0, 1) and scaled by 1/sqrt(fan_in) (times
a learning-rate multiplier) at run time; `ops.bias_act` applies bias + leaky ReLU with gain sqrt(2).

Files. What training and inference share is here, below both: reading a stage-1 checkpoint
(`load_checkpoint`, `load_generator`) and model.pt, the inference bundle (`load_bundle`, `BUNDLE_FORMAT`),
the decision on mask logits (`mask_classes`) and bf16 autocast (`make_autocast`), and the checkpoints of other
code: the official SemanticGAN code's and rosinality/stylegan2-pytorch's, mapped onto these networks and back
(`read_networks`, `load_official`, `as_stage1`, `export_official`; `python model.py export-official`).
invert.py and generate.py need this file, losses.py, data.py and ops/, never the training scripts. Needs:
torch and ops/.
"""

import argparse
import math
import os
import random
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import ops

# ----------------------------------------------------------------------------------------------------
# Widths


def stylegan_channels(resolution, channel_multiplier=2, max_channels=512):
    """Feature maps at a resolution in StyleGAN2 config-f (512 up to 32 px, then halving), capped.

    The cap makes narrow networks for CPU demos and tests; the paper's widths are the default.
    """
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
    """Modulated convolution (StyleGAN2 Eq. 1-3), optionally upsampling by 2 and demodulating.

    Upsampling is a stride-2 transposed convolution followed by the [1, 3, 3, 1] low-pass filter (never a
    zero-inserted tensor), as in StyleGAN2.
    """

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
        style = self.modulation(w)                                      # [B, in]
        weight = self.weight * self.scale                               # [out, in, k, k]
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
    """SemanticGAN's generator: StyleGAN2 with a tSeg beside every tImage. Returns (image, mask logits).

    num_classes: the mask channels, one logit per class, or 1 for a binary task in the official form (the
    foreground's logit; mask_channels)."""

    def __init__(self, resolution=256, num_classes=8, image_channels=3, style_dim=512, n_mlp=8,
                 channel_multiplier=2, max_channels=512, lr_mlp=0.01, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        # the arguments, so that a saved generator can be rebuilt: Generator(**G.config)
        self.config = dict(resolution=resolution, num_classes=num_classes, image_channels=image_channels,
                           style_dim=style_dim, n_mlp=n_mlp, channel_multiplier=channel_multiplier,
                           max_channels=max_channels, lr_mlp=lr_mlp, blur_kernel=tuple(blur_kernel))
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
        # Fixed noise maps for reproducible samples (used with randomize_noise=False).
        self.noise_resolutions = [4] + [2 ** (k // 2 + 3) for k in range(len(self.convs))]
        for i, r in enumerate(self.noise_resolutions):
            self.register_buffer(f"noise_{i}", torch.randn(1, 1, r, r))

    # -- latents

    @torch.no_grad()
    def mean_latent(self, n=4096, device=None):
        """The average w of n random z: the centre that truncation pulls towards."""
        z = torch.randn(n, self.style_dim, device=device or self.constant.device)
        return self.mapping(z).mean(0, keepdim=True)

    def make_w_plus(self, latents, input_is_w=False, truncation=1.0, truncation_latent=None, mixing_index=None):
        """Turn z / w codes into W+ [B, n_latent, style_dim].

        latents: a tensor [B, D], or a list of one or two of them (two = style mixing: the first code drives
        the styles before `mixing_index`, the second the rest; a random index if None), or, with input_is_w,
        a W+ tensor [B, n_latent, D]. Truncation pulls every w towards `truncation_latent` (default: the
        mean latent, estimated on the spot).
        """
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

    # -- synthesis

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
    if mask_logits.shape[1] == 1:
        return (mask_logits[:, 0] > 0).long()
    return mask_logits.argmax(1)


# Binary tasks (one foreground class: lungs, lesions, the liver). The official code gives them one mask
# channel (its GeneratorSeg's default, seg_dim 1): D_m sees that channel, stage 2 a binary cross-entropy and a
# Dice on it, and the decision is logit > 0 (sigmoid > 0.5). "softmax" keeps two channels, as any K.
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


# How D_m sees a mask. "logits", the official code's: the generator's raw logits against the real one-hot
# mask shifted to {-1, +1} (its dataset.py normalises masks like images, (x - 0.5) / 0.5), so the generator
# learns logits of about +-1. "probabilities", ours: softmax (sigmoid for K = 1) against one-hot in {0, 1},
# the same range for both, so D_m judges the shape and alignment of a mask, not the scale of its logits.
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
    """The (image, mask) pair D_m judges for the generator: the stop-gradient of SemanticGAN.

    The image is detached, so the generator's loss from D_m reaches the mask branch (tSeg, and through it
    the shared synthesis layers) but never the image branch (tImage): D_m can only make masks agree with
    images, never bend images towards masks.
    """
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
    """Append the average standard deviation of features over groups of samples (StyleGAN, Sec. 3).

    The group is the largest divisor of the batch that is <= group_size, so any batch size works.
    """
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
        blocks = [ConvLayer(image_channels, ch(resolution), 1)]
        for log_r in range(log_size, 2, -1):
            blocks.append(ResBlock(ch(2 ** log_r), ch(2 ** (log_r - 1)), blur_kernel))
        self.blocks = nn.Sequential(*blocks)
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
    """One scale of pix2pixHD's discriminator; returns every layer's output (the last is the logit map).

    As the official NLayerDiscriminator with norm 'spectralinstance': the first convolution (stride 2) and
    the last (to 1 channel) are plain, with a bias; the n_layers in between (stride 2, 2, then 1) have
    spectral norm, no bias and an instance norm (no affine parameters).
    """

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
    """D_m: multi-scale patch discriminator on (image, mask) concatenated.

    forward(image, mask) -> a list with, per scale (finest first), the list of that scale's layer outputs;
    [-1] of each is the logit map. `mask` is [B, K, H, W], as real_mask_input / generated_mask_input make it.
    """

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
        self.heads = nn.ModuleList()
        for i in range(self.n_latent):
            spatial = resolution // (16 if i < self.coarse else 8 if i < self.middle else 4)
            self.heads.append(Map2Style(pyramid, style_dim, spatial))
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
# The files that hold the networks (a stage-1 checkpoint of train_gan.py, model.pt of train_encoder.py),
# read here so that inference needs no training script; and the precision the networks run in


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
    """What torch.save wrote at `path`, read with weights_only=True: the files of this project hold
    state_dicts and plain data only, so reading one cannot run code. One class beyond plain data is allowed,
    argparse.Namespace, which the official SemanticGAN and rosinality checkpoints store their arguments in (it
    only holds attributes). A missing or unreadable file, or one that needs code to unpickle, is a
    CheckpointError ending in `advice`."""
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
        raise CheckpointError(f"checkpoint {path} cannot be read ({short_error(e)}); "
                              f"{advice}")


def generator_config(ckpt):
    """Generator arguments of a stage-1 checkpoint."""
    a = ckpt["args"]
    channels = ckpt.get("mask_channels", ckpt["num_classes"])  # older checkpoints: one channel per class
    return dict(resolution=a["resolution"], num_classes=channels, image_channels=ckpt["image_channels"],
                style_dim=a["style_dim"], n_mlp=a["n_mlp"], channel_multiplier=a["channel_multiplier"],
                max_channels=a["max_channels"])


def load_generator(ckpt, path, device):
    """G_ema of a stage-1 checkpoint (as load_checkpoint read it from `path`), or of an official SemanticGAN
    checkpoint (as_stage1), in eval mode, without gradients."""
    ckpt = as_stage1(ckpt, path)
    if not isinstance(ckpt, dict) or not {"G_ema", "args", "num_classes", "image_channels"} <= set(ckpt):
        raise CheckpointError(f"{path} is not a stage-1 checkpoint of train_gan.py (no G_ema and arguments) nor "
                              "one of the official SemanticGAN code (g_ema); pass --ckpt OUT/checkpoint-STEP.pt of a "
                              "train_gan.py run")
    G = Generator(**generator_config(ckpt))
    G.load_state_dict(ckpt["G_ema"])
    return G.to(device).eval().requires_grad_(False)


# model.pt, the inference bundle that train_encoder.make_bundle writes: "G_ema" and "E" (state_dicts) with
# "generator" and "encoder" (their constructors' arguments), "mean_latent", "preprocessing" (resolution,
# channels, fit), "num_classes" (background included) and "class_names", "lpips" (the network stage 2 used),
# "step", "validation", and both stages' arguments ("args", "stage1_args"). BUNDLE_FORMAT names this layout.
# Optional, so that older files keep loading: "labeled_errors", the encoder's reconstruction errors of the
# labeled training images ({"lpips_net", "lpips": [...], "mse": [...]}), what invert.py flags images against.
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


# ----------------------------------------------------------------------------------------------------
# Weights of other code: checkpoints of the official SemanticGAN code (nv-tlabs/semanticGAN_code;
# train_seg_gan.py saves "g", "g_ema", "d_img", "d_seg" and "args") and of rosinality/stylegan2-pytorch, the
# StyleGAN2 port the official code builds on ("g_ema", "g", "d", "args"; converted FFHQ, church, car and
# medical generators circulate in that format), read into the networks above and written back.
#
# Their networks compute what ours compute under other names and shapes (rosinality's generator is the
# official one without to_seg1 / to_segs):
#
#   ours                              official
#   mapping.net.i                     style.i
#   constant                          input.input
#   conv1, convs.j                    conv1, convs.j: conv.weight with a leading 1 (its per-sample batch axis),
#                                     bias as activate.bias, noise.strength [] as noise.weight [1]
#   t_image.0, t_image.i              to_rgb1, to_rgbs.(i-1): conv.weight with a leading 1, bias [1, C, 1, 1]
#   t_seg.0, t_seg.i                  to_seg1, to_segs.(i-1): the same
#   noise_i                           noises.noise_i
#   D_r blocks.k, final_linear, out   convs.k, final_linear.0, final_linear.1
#   D_m scales.i.layers.j             scale(N-1-i)_layerj: the official forward runs its module scale(N-1) on
#                                     the full-size input and scale0 on the input pooled N-1 times; spectral
#                                     norm as the old hook stores it (weight_orig, weight_u, weight_v)
#
# The [1, 3, 3, 1] blur filters are buffers there (times 4 where they upsample) and constants here: checked
# when read, written for the official load_state_dict. A file is read in three steps: its state_dicts in the
# official layout (official_tensors; a file of this project is renamed into it, so that one reader serves all
# three sources), the constructor arguments of each network read from their shapes (official_shapes), and
# the tensors loaded into networks built with them (load_official). Whatever does not fit is a
# CheckpointError naming the file and the tensor.

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


def _kind(net):
    return "G" if isinstance(net, Generator) else "D_r" if isinstance(net, ImageDiscriminator) else "D_m"


def _layout_of(net):
    return official_layout(_kind(net), len(getattr(net, "scales", ())))


def to_official(net):
    """Our network's state_dict in the official layout, the blur filters included (the official modules hold
    them as buffers, so their load_state_dict expects them)."""
    name_of, shape_of, gain = _layout_of(net)
    state = net.state_dict()
    out = {name_of(n): t.detach().reshape(shape_of(n, t.shape)).clone() for n, t in state.items()}
    for n, buffer in net.named_buffers():
        if n not in state and name_of(n) is not None:
            out[name_of(n)] = buffer.detach() * gain
    return out


_DESCRIBE = {"G": "StyleGAN2 generator", "D_r": "StyleGAN2 discriminator (D_r)",
             "D_m": "multi-scale patch discriminator (D_m)"}


def load_official(net, state, path, what, fresh=None):
    """Fill our network `net` from `state`, a state_dict in the official layout (`what` names it in messages,
    e.g. 'g_ema'). Our tensors whose names match the regular expression `fresh` keep their values (a mask
    branch for other classes, or one the file lacks) and their counterparts in the file are ignored; every
    other tensor must be there in its official shape, and nothing else may be (a blur filter only as
    [1, 3, 3, 1]). Returns `net`."""
    name_of, shape_of, gain = _layout_of(net)
    describe = _DESCRIBE[_kind(net)]
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
        raise CheckpointError(f"{path}: {what} {' and '.join(problems)}; expected a {describe} in the official "
                              "layout")
    for theirs, n in wanted.items():
        expected = shape_of(n, ours[n].shape)
        if tuple(state[theirs].shape) != tuple(expected):
            raise CheckpointError(f"{path}: {what}'s {theirs} is {list(state[theirs].shape)}, expected "
                                  f"{list(expected)} for a {describe} of the shape its other tensors give")
    for theirs, kernel in filters.items():
        if theirs in state and not (state[theirs].shape == kernel.shape and torch.allclose(state[theirs].float(), kernel)):
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
    for theirs, (ours, kind) in {"g_ema": ("G_ema", "G"), "g": ("G", "G"), "d_img": ("D_r", "D_r"),
                                 "d_seg": ("D_m", "D_m")}.items():
        if isinstance(ckpt.get(ours), dict):
            scales = {n.split(".")[1] for n in ckpt[ours] if n.startswith("scales.")}
            name_of, shape_of, _ = official_layout(kind, len(scales))
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
    widths = {resolution: first.shape[0]}
    widths.update({resolution >> k: _tensor(d, f"convs.{k}.conv2.1.weight", what).shape[0] for k in range(1, blocks + 1)})
    channel_multiplier, max_channels = _channel_table(widths, what)
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
    """The constructor arguments of the networks in `tensors` (official_tensors), read from their shapes:
    'generator' (num_classes None for a generator without tSeg), 'image_discriminator' and
    'mask_discriminator' (None where the file has none). Networks that cannot belong together are a
    CheckpointError."""
    generator = _generator_shape(tensors["g_ema"], f"{path}: g_ema")
    shapes = {"generator": generator, "image_discriminator": None, "mask_discriminator": None}
    if "d_img" in tensors:
        shapes["image_discriminator"] = d_r = _image_discriminator_shape(tensors["d_img"], f"{path}: its D_r")
        if (d_r["resolution"], d_r["image_channels"]) != (generator["resolution"], generator["image_channels"]):
            raise CheckpointError(f"{path}: its D_r takes {d_r['resolution']} px images of {d_r['image_channels']} "
                                  f"channels, its generator makes {generator['resolution']} px of "
                                  f"{generator['image_channels']}")
    if "d_seg" in tensors:
        shapes["mask_discriminator"] = d_m = _mask_discriminator_shape(
            tensors["d_seg"], generator["image_channels"], f"{path}: d_seg")
        if generator["num_classes"] not in (None, d_m["num_classes"]):
            raise CheckpointError(f"{path}: d_seg takes masks of {d_m['num_classes']} channels, its generator makes "
                                  f"{generator['num_classes']}")
    return shapes


def resolve_checkpoint(path):
    """A checkpoint file, or the latest checkpoint-STEP.pt of a train_gan.py --out folder."""
    if os.path.isdir(path):
        found = sorted(name for name in os.listdir(path) if re.fullmatch(r"checkpoint-\d{8}\.pt", name))
        if not found:
            raise CheckpointError(f"{path}: no checkpoint-STEP.pt in this folder; pass a train_gan.py --out folder or "
                                  "a checkpoint")
        return os.path.join(path, found[-1])
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file; pass a checkpoint or a train_gan.py --out folder")
    return path


def read_networks(path, advice):
    """(source, tensors, shapes) of a checkpoint of any of the three sources (checkpoint_source,
    official_tensors, official_shapes); `path` may be a train_gan.py --out folder (its latest checkpoint)."""
    path = resolve_checkpoint(path)
    ckpt = load_checkpoint(path, advice)
    tensors = official_tensors(ckpt, path)
    shapes = official_shapes(tensors, path)
    shapes["dm_mask"] = trained_dm_mask(ckpt)
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
    with torch.random.fork_rng(devices=[]):  # the initial values are overwritten: draw them off the caller's stream
        if key in ("g", "g_ema"):
            net = Generator(**shapes["generator"])
        elif key == "d_img":
            net = ImageDiscriminator(**shapes["image_discriminator"])
        else:
            net = MaskDiscriminator(**shapes["mask_discriminator"])
    return load_official(net, tensors[key], path, key)


def as_stage1(ckpt, path):
    """A checkpoint as stage 2 and generate.py read it: one of this project as it is; an official SemanticGAN
    checkpoint as a stage-1 checkpoint holding its G_ema, with the arguments read from its tensors and the D_m
    input it was trained with (trained_dm_mask: the official logits unless the file says). A StyleGAN2 generator without a mask branch is a CheckpointError."""
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
    """A checkpoint of this project (a stage-1 checkpoint, or a model.pt: G_ema only) in the official layout:
    {'g', 'g_ema', 'd_img', 'd_seg', 'args'} as train_seg_gan.py saves them; with image_only, rosinality's
    {'g', 'g_ema', 'd', 'args'} without the mask branch and D_m (a StyleGAN2 generator that --init can start
    from). 'args' is an argparse.Namespace, as both codes write it."""
    if checkpoint_source(ckpt) != "semanticgan":
        raise CheckpointError(f"{path} is not a checkpoint of this project; pass a train_gan.py checkpoint or --out "
                              "folder")
    tensors = official_tensors(ckpt, path)
    shapes = official_shapes(tensors, path)
    out = {key: to_official(build_official(tensors, shapes, key, path)) for key in tensors}
    g = shapes["generator"]
    if image_only:
        out = {("d" if key == "d_img" else key): {n: t for n, t in state.items() if not n.startswith("to_seg")}
               for key, state in out.items() if key != "d_seg"}
        out["args"] = argparse.Namespace(size=g["resolution"], latent=g["style_dim"], n_mlp=g["n_mlp"],
                                         channel_multiplier=g["channel_multiplier"])
        return out
    # dm_mask is ours (the official code reads only the fields it knows): what D_m saw decides stage 2's mask
    # temperatures when the file is read back (as_stage1)
    out["args"] = argparse.Namespace(size=g["resolution"], latent=g["style_dim"], n_mlp=g["n_mlp"],
                                     seg_dim=g["num_classes"], image_mode="RGB" if g["image_channels"] == 3 else "L",
                                     channel_multiplier=g["channel_multiplier"],
                                     dm_mask=trained_dm_mask(ckpt))
    return out


# ----------------------------------------------------------------------------------------------------
# `python model.py`: parameter counts and forward+backward timings of the three trained networks


def _time_forward_backward(step, device, iters, warmup):
    """Median seconds of step() (a forward and a backward), CUDA events on a GPU, perf_counter on the CPU."""
    import statistics
    import time

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _benchmark(args):
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    G = Generator(args.resolution, args.classes, args.image_channels, max_channels=args.max_channels).to(device)
    D_r = ImageDiscriminator(args.resolution, args.image_channels, max_channels=args.max_channels).to(device)
    D_m = MaskDiscriminator(args.image_channels, args.classes, base_channels=min(64, args.max_channels),
                            max_channels=args.max_channels).to(device)
    print(f"{'network':<8} {'parameters':>12}")
    for name, net in (("G", G), ("D_r", D_r), ("D_m", D_m)):
        print(f"{name:<8} {sum(p.numel() for p in net.parameters()):>12,}")
    B, R = args.batch, args.resolution
    z = torch.randn(B, G.style_dim, device=device)
    image = torch.randn(B, args.image_channels, R, R, device=device)
    mask = torch.rand(B, args.classes, R, R, device=device)
    steps = {
        "G": lambda: sum(t.float().mean() for t in G(z)).backward(),
        "D_r": lambda: D_r(image).sum().backward(),
        "D_m": lambda: sum(s[-1].mean() for s in D_m(image, mask)).backward(),
    }
    print(f"\nforward+backward, {device}, {R} px, batch {B}: median ms of {args.iters} runs after {args.warmup}")
    print(f"{'network':<8} " + " ".join(f"{impl:>10}" for impl in args.impls))
    for name, step in steps.items():
        row = []
        for impl in args.impls:
            os.environ["SEMANTICGAN_OPS"] = "ref" if impl == "ref" else ""
            row.append(_time_forward_backward(step, device, args.iters, args.warmup) * 1000)
        print(f"{name:<8} " + " ".join(f"{ms:>10.2f}" for ms in row))


def build_parser():
    import data  # the command line's checked options (data.py does not import this file)

    parser = data.ArgumentParser(description="Parameter counts and forward+backward time of G, D_r and D_m.")
    parser.add_argument("--resolution", type=int, choices=RESOLUTIONS, default=256)
    parser.add_argument("--batch", type=data.POSITIVE_INT, default=16)
    parser.add_argument("--classes", type=data.POSITIVE_INT, default=8)
    parser.add_argument("--image-channels", type=int, choices=(1, 3), default=3)
    parser.add_argument("--max-channels", type=data.POSITIVE_INT, default=512,
                        help="cap on feature maps (narrow networks)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impls", type=data.choice_list(("cuda", "ref")), default="cuda,ref",
                        help="ops implementations to time ('cuda' = fused kernels and gradfix convolutions, "
                             "'ref' = plain PyTorch)")
    parser.add_argument("--iters", type=data.POSITIVE_INT, default=20)
    parser.add_argument("--warmup", type=data.COUNT, default=5)
    return parser


# `python model.py export-official RUN_OR_CKPT OUT.pt`: a stage-1 checkpoint in the official layout


def build_export_parser():
    import data

    parser = data.ArgumentParser(prog="model.py export-official", description="Write a stage-1 checkpoint in the "
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
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        print(f"error: cannot write {args.out} ({short_error(e)}); pass a writable path", file=sys.stderr)
        sys.exit(2)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    layout = "rosinality/stylegan2-pytorch" if args.image_only else "the official SemanticGAN code"
    print(f"wrote {args.out}: {path} in the layout of {layout} ({', '.join(exported)})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["export-official"]:
        export_main(sys.argv[2:])
    else:
        _benchmark(build_parser().parse_args())
