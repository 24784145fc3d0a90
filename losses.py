"""The losses of SemanticGAN (Li et al., CVPR 2021, Sec. 3) and the StyleGAN2 regularisers.

Stage 1 (train_gan.py), with D_r the image discriminator and D_m the image-and-mask discriminator:

    L_Dr = E_x[softplus(-D_r(x))] + E_z[softplus(D_r(G_x(z)))]                 non-saturating logistic
    L_Dm = mean_s ( E[relu(1 - D_m^s(x, y))] + E_z[relu(1 + D_m^s(G(z)))] )      hinge, over the scales s
    L_G  = E_z[softplus(-D_r(G_x(z)))] + mean_s -E_z[D_m^s(G(z))] + 2.0 * L_FM
    L_FM = mean_s sum_l | D_m^{s,l}(G(z)) - D_m^{s,l}(x, y) |_1                 feature matching, layers l < last

The paper writes L_Dm in the logistic form; the official code trains D_m with the hinge loss above and adds
the feature-matching term (pix2pixHD's, weight 2.0, scales weighted 1/3). We follow the official code: it is
what produced the paper's numbers.

Regularisers (StyleGAN2, Karras et al. 2020):

    R1 = gamma / 2 * E_x[ |grad_x D(x)|^2 ]                                     gamma = 10, on D_r and on D_m
    PL = E_{w,y}[ (|J_w^T y|_2 - a)^2 ],  y ~ N(0, I) / sqrt(H W),  a <- a + 0.01 (mean |J_w^T y| - a)

Both run lazily (every 16 and every 4 steps) and are multiplied by their interval so their weight per image
stays the same. For D_m, R1 differentiates the sum of the three scales' mean logits w.r.t. the image and
the mask of the real pair.

Masks (stage 2, train_encoder.py; and the metrics): cross-entropy (binary for K = 1) and the soft Dice loss
    Dice = 1 - mean_k (2 sum p_k t_k + eps) / (sum p_k + sum t_k + eps).
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ops
from model import mask_probabilities, real_mask_input

# ----------------------------------------------------------------------------------------------------
# Adversarial losses


def d_logistic_loss(real_logits, fake_logits):
    """L_Dr: softplus(-D(x)) + softplus(D(G(z))), averaged."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_nonsaturating_loss(fake_logits):
    """The generator's part of L_Dr: softplus(-D(G(z))), averaged."""
    return F.softplus(-fake_logits).mean()


def d_hinge_loss(real_outputs, fake_outputs):
    """L_Dm: hinge loss of D_m averaged over its scales (each output a list of layer outputs, logits last)."""
    losses = [F.relu(1 - real[-1]).mean() + F.relu(1 + fake[-1]).mean() for real, fake in zip(real_outputs, fake_outputs)]
    return sum(losses) / len(losses)


def g_hinge_loss(fake_outputs):
    """The generator's part of L_Dm: -D_m(G(z)) averaged over patches and scales."""
    return sum(-fake[-1].mean() for fake in fake_outputs) / len(fake_outputs)


def feature_matching_loss(fake_outputs, real_outputs):
    """L_FM: L1 between D_m's intermediate features of generated and real pairs, summed over layers, averaged
    over scales. Real features are constants: this loss trains only the generator."""
    per_scale = [sum(F.l1_loss(f, r.detach()) for f, r in zip(fake[:-1], real[:-1]))
                 for fake, real in zip(fake_outputs, real_outputs)]
    return sum(per_scale) / len(per_scale)


# ----------------------------------------------------------------------------------------------------
# Regularisers


def r1_penalty(score, inputs):
    """E[|grad D|^2] w.r.t. `inputs` (a tensor or a list: D_m's image and mask), summed over inputs.

    `score` is D's output summed (any reduction linear in the samples works: the gradient of a sum is
    the per-sample gradient). The weight gradients of this first backward are skipped: only the second
    backward, through this penalty, needs them.
    """
    inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    with ops.no_weight_gradients():
        grads = torch.autograd.grad(score, inputs, create_graph=True)
    return sum(g.float().square().flatten(1).sum(1) for g in grads).mean()


def d_m_score(outputs):
    """The D_m scalar R1 differentiates: the sum over scales of the mean logit, times the batch size (so
    that the gradient is per sample, as for D_r)."""
    batch = outputs[0][-1].shape[0]
    return sum(scale[-1].float().mean() for scale in outputs) * batch


def path_length_penalty(images, w_plus, mean_path_length, decay=0.01):
    """StyleGAN2's path-length regulariser.

    Returns (penalty, new running mean a, the batch's mean path length). `images` must have been made
    from `w_plus` (Generator(..., return_latents=True)). The gradient w.r.t. w reaches the convolutions
    only through their inputs (model.py modulates activations), so no_weight_gradients() is safe here.
    """
    noise = torch.randn_like(images) / math.sqrt(images.shape[2] * images.shape[3])
    with ops.no_weight_gradients():
        (grad,) = torch.autograd.grad((images * noise).sum(), w_plus, create_graph=True)
    path_lengths = grad.float().square().sum(2).mean(1).sqrt()
    batch_mean = path_lengths.mean().detach()
    if dist.is_available() and dist.is_initialized():  # every process keeps the same running mean
        dist.all_reduce(batch_mean)
        batch_mean = batch_mean / dist.get_world_size()
    new_mean = mean_path_length + decay * (batch_mean - mean_path_length)
    penalty = (path_lengths - new_mean).square().mean()
    return penalty, new_mean, batch_mean


# ----------------------------------------------------------------------------------------------------
# Mask losses


def mask_cross_entropy(mask_logits, mask):
    """Cross-entropy of logits [B, K, H, W] against a class-index mask [B, H, W] (binary for K = 1)."""
    if mask_logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(mask_logits[:, 0].float(), (mask > 0).float())
    return F.cross_entropy(mask_logits.float(), mask.long())


def dice_loss(mask_logits, mask, eps=1.0):
    """Soft Dice loss, 1 - the mean over classes of 2|P T| / (|P| + |T|), on the class probabilities."""
    probabilities = mask_probabilities(mask_logits.float())
    target = real_mask_input(mask, mask_logits.shape[1])
    intersection = (probabilities * target).sum([0, 2, 3])
    total = probabilities.sum([0, 2, 3]) + target.sum([0, 2, 3])
    return 1 - ((2 * intersection + eps) / (total + eps)).mean()
