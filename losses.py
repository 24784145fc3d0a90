"""The losses of SemanticGAN (Li et al., CVPR 2021, Sec. 3) and the StyleGAN2 regularisers.

Stage 1 (train_gan.py), with D_r the image discriminator and D_m the image-and-mask discriminator:

    L_Dr = E_x[softplus(-D_r(x))] + E_z[softplus(D_r(G_x(z)))]                 non-saturating logistic
    L_Dm = mean_s ( E[relu(1 - D_m^s(x, y))] + E_z[relu(1 + D_m^s(G(z)))] ) / 2  hinge, over the scales s
    L_G  = E_z[softplus(-D_r(G_x(z)))] + mean_s -E_z[D_m^s(G(z))] + 2.0 * L_FM
    L_FM = mean_s sum_l | D_m^{s,l}(G(z)) - D_m^{s,l}(x, y) |_1                 feature matching, layers l < last

The paper writes L_Dm in the logistic form; the official code trains D_m with the hinge loss above and adds
the feature-matching term (pix2pixHD's, weight 2.0, scales weighted 1/3). We follow the official code: it is
what produced the paper's numbers.

Regularisers (StyleGAN2, Karras et al. 2020):

    R1 = gamma / 2 * E_x[ |grad_x D(x)|^2 ]                                     gamma = 10, on D_r and on D_m
    PL = E_{w,y}[ (|J_w^T y|_2 - a)^2 ],  y ~ N(0, I) / sqrt(H W),  a <- a + 0.01 (mean |J_w^T y| - a)

Both run lazily (every 16 and every 4 steps) and are multiplied by their interval so their weight per image
stays the same. For D_m, R1 differentiates w.r.t. the image and the mask of the real pair the score the
official code differentiates: the sum over the three scales of the logits' mean over batch and patches
(d_m_score). Each sample's gradient then carries a factor 1/B, so the penalty is 1/B^2 of the per-sample R1
that D_r gets: at the official batch of 16 per GPU, gamma 10 amounts to 10 / 256 = 0.039 per sample (and
it changes with --batch); StyleGAN2's per-sample R1 with the full gamma would be B^2 = 256 times the
official penalty at batch 16 (tried: ragged masks, docs/mask-branch-stability.md).

Masks (stage 2, train_encoder.py), as the official encoder training computes them: cross-entropy on
logits / 0.1 (binary on logits / 0.3 for K = 1) and V-Net's squared Dice on sigmoid(logits / 0.3) per channel,
    Dice = 1 - mean_{k foreground} 2 sum p_k t_k / (sum p_k^2 + sum t_k^2),
with the reconstruction terms LPIPS (the lpips package, `Perceptual`) and MSE. Then the segmentation metrics
that train_encoder.py validates with and invert.py scores with: per-image DICE and Jaccard, and the mIoU
of counts accumulated over a data set.

Needs: model.py (one_hot_mask) and ops/; the lpips package, imported when LPIPS is first built.
"""

import functools
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import ops
from model import one_hot_mask

# ----------------------------------------------------------------------------------------------------
# Adversarial losses


def d_logistic_loss(real_logits, fake_logits):
    """L_Dr: softplus(-D(x)) + softplus(D(G(z))), averaged."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_nonsaturating_loss(fake_logits):
    """The generator's part of L_Dr: softplus(-D(G(z))), averaged."""
    return F.softplus(-fake_logits).mean()


def d_hinge_loss(real_outputs, fake_outputs):
    """L_Dm: hinge loss of D_m averaged over its scales (each output a list of layer outputs, logits last),
    real and fake terms halved as the official code does: (real hinge + fake hinge) / 2."""
    terms = [F.relu(1 - real[-1]).mean() + F.relu(1 + fake[-1]).mean()
             for real, fake in zip(real_outputs, fake_outputs)]
    return sum(terms) / len(terms) / 2


def d_hinge_loss_mismatched(real_outputs, fake_outputs, mismatched_outputs):
    """L_Dm with a second kind of fake (ours, train_gan.py --dm-mismatched): real images paired with another
    labeled image's mask. Their fake hinge and the generated pairs' share the fake half, as the mismatched
    text of a matching-aware discriminator does (GAN-CLS, Reed et al. 2016):
    (real hinge + (generated hinge + mismatched hinge) / 2) / 2, averaged over the scales: the mean of
    d_hinge_loss against either kind."""
    return (d_hinge_loss(real_outputs, fake_outputs) + d_hinge_loss(real_outputs, mismatched_outputs)) / 2


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
    """The D_m scalar R1 differentiates: the sum over scales of the mean logit over batch and patches (the
    official train_seg_gan.py). The module docstring says what it amounts to per sample."""
    return sum(scale[-1].float().mean() for scale in outputs)


def path_length_penalty(images, w_plus, mean_path_length, decay=0.01, sync=True):
    """StyleGAN2's path-length regulariser.

    Returns (penalty, new running mean a, the batch's mean path length). `images` must have been made
    from `w_plus` (Generator(..., return_latents=True)). The gradient w.r.t. w reaches the convolutions
    only through their inputs (model.py modulates activations), so no_weight_gradients() is safe here.
    `sync`: under torch.distributed, every process updates the running mean with the mean over all
    processes, so all keep the same one; the official code lets each process keep its own.
    """
    noise = torch.randn_like(images) / math.sqrt(images.shape[2] * images.shape[3])
    with ops.no_weight_gradients():
        (grad,) = torch.autograd.grad((images * noise).sum(), w_plus, create_graph=True)
    path_lengths = grad.float().square().sum(2).mean(1).sqrt()
    batch_mean = path_lengths.mean().detach()
    if sync and dist.is_available() and dist.is_initialized():  # every process keeps the same running mean
        dist.all_reduce(batch_mean)
        batch_mean = batch_mean / dist.get_world_size()
    new_mean = mean_path_length + decay * (batch_mean - mean_path_length)
    penalty = (path_lengths - new_mean).square().mean()
    return penalty, new_mean, batch_mean


# ----------------------------------------------------------------------------------------------------
# Mask losses (stage 2), as the official semanticGAN/losses.py computes them


def mask_cross_entropy(mask_logits, mask, temperature=1.0):
    """Cross-entropy of logits / temperature [B, K, H, W] against a class-index mask [B, H, W]; for K = 1
    the binary cross-entropy of the single logit against (mask > 0). The official encoder uses temperature
    0.1 (K > 1; SoftmaxLoss) and 0.3 (K = 1; SoftBinaryCrossEntropyLoss)."""
    logits = mask_logits.float() / temperature
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], (mask > 0).float())
    return F.cross_entropy(logits, mask.long())


def dice_loss(mask_logits, mask, temperature=0.3, eps=1e-6):
    """The official DiceLoss (V-Net's squared form): per channel k, on p = sigmoid(logits / temperature)
    and the one-hot target t, pooled over the batch and the pixels,
        dice_k = 2 sum(p_k t_k) / max(sum(p_k^2) + sum(t_k^2), eps),
    and 1 - the mean over the foreground channels (the background channel 0 is left out; for K = 1 the
    one channel is the foreground). Each channel is its own sigmoid, not a softmax over K."""
    probabilities = torch.sigmoid(mask_logits.float() / temperature)
    target = one_hot_mask(mask, mask_logits.shape[1])
    intersection = (probabilities * target).sum([0, 2, 3])
    denominator = probabilities.square().sum([0, 2, 3]) + target.square().sum([0, 2, 3])
    dice = 2 * intersection / denominator.clamp(min=eps)
    return 1 - (dice if dice.shape[0] == 1 else dice[1:]).mean()


# ----------------------------------------------------------------------------------------------------
# LPIPS (stage 2 and inference): the lpips package, offline-safe


class LPIPSUnavailable(Exception):
    """The backbone weights of LPIPS could not be had: one line, with where to put them."""


@functools.lru_cache(maxsize=None)
def lpips_network(net):
    """The lpips package's LPIPS module for `net` (see Perceptual), built once per process: it is frozen,
    and torchvision's VGG takes seconds to build."""
    import warnings

    import lpips  # imported here: stage 1 does not need it

    try:
        with warnings.catch_warnings():  # lpips still calls torchvision's deprecated pretrained=...
            warnings.simplefilter("ignore", UserWarning)
            if net != "random":
                return lpips.LPIPS(net=net, verbose=False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    except OSError as error:  # urllib's URLError, a refused connection, a full disk
        import torchvision

        weights = {"vgg": torchvision.models.VGG16_Weights, "alex": torchvision.models.AlexNet_Weights}[net]
        url = weights.IMAGENET1K_V1.url
        folder = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise LPIPSUnavailable(
            f"LPIPS ({net}) needs torchvision's ImageNet weights {url.rsplit('/', 1)[-1]}, which could not be "
            f"downloaded ({str(error).splitlines()[0][:120]}): download {url} into {folder}/, or pass "
            f"--lpips random (an untrained backbone: for tests and offline demos)") from None


class Perceptual(torch.nn.Module):
    """LPIPS distance per image [B] between images in [-1, 1] (grey ones repeated to 3 channels), as the
    official code uses it: net-lin, v0.1 linear weights, full resolution, spatial mean.

    net: 'vgg' (the official), 'alex', or 'random': the VGG network with an untrained backbone (the same
    one every time: it is drawn from a fixed seed) and the trained linear weights, for tests and machines
    that cannot download the backbone. The backbone's ImageNet weights come from torchvision, which
    downloads them on first use into torch.hub.get_dir()/checkpoints."""

    NETS = ("vgg", "alex", "random")

    def __init__(self, net="vgg"):
        super().__init__()
        self.net = net
        self.lpips = lpips_network(net)
        self.eval().requires_grad_(False)

    def train(self, mode=True):  # always in eval mode (its dropout is for training LPIPS itself)
        return super().train(False)

    def forward(self, x, y):
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.lpips(x, y).flatten()

    def features(self, y):
        """The unit-normalised backbone features LPIPS compares, for images that stay fixed (the target of an
        inversion: computed once instead of at every step)."""
        import lpips

        y = y.expand(-1, 3, -1, -1) if y.shape[1] == 1 else y
        return [lpips.normalize_tensor(f) for f in self.lpips.net(self.lpips.scaling_layer(y))]

    def distance_to(self, x, target_features):
        """forward(x, y) from features(y): the lpips package's net-lin sum of spatially averaged, linearly
        weighted squared feature differences."""
        return sum(linear((a - b).square()).mean([2, 3]) for linear, a, b
                   in zip(self.lpips.lins, self.features(x), target_features)).flatten()


@torch.no_grad()
def reconstruction_errors(percept, reconstruction, images):
    """Per image [B]: (LPIPS, MSE) between images in [-1, 1] and their reconstructions clamped to [-1, 1]
    (the picture a reconstruction shows, as NAME_recon.png stores it), at 256 px at most (average-pooled, as
    the inversion compares them); MSE is the mean over the pixels and channels. How far an image is out of
    the generator's reach: invert.py reports it per image, and train_encoder.py stores it for the labeled
    images in model.pt, the reference an image is flagged against."""
    images, reconstruction = images.float(), reconstruction.float().clamp(-1, 1)
    if images.shape[-1] > 256:
        images, reconstruction = F.adaptive_avg_pool2d(images, 256), F.adaptive_avg_pool2d(reconstruction, 256)
    return percept(reconstruction, images).float(), (reconstruction - images).square().flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------------
# Segmentation metrics (class-index maps; background is class 0)


def label_count(num_classes):
    """The classes of a class-index map: K, or 2 (background, foreground) for a one-channel model."""
    return max(num_classes, 2)


def intersection_union(prediction, target, num_labels):
    """Per-class pixel counts (intersection [L], union [L]) of class-index maps of any shape, to be summed
    over a data set for its mIoU (the official validation: background included, accumulated, not averaged
    per image)."""
    prediction, target = prediction.flatten().long(), target.flatten().long()
    predicted = torch.bincount(prediction, minlength=num_labels)[:num_labels]
    actual = torch.bincount(target, minlength=num_labels)[:num_labels]
    hits = torch.bincount(prediction[prediction == target], minlength=num_labels)[:num_labels]
    return hits, predicted + actual - hits


def mean_iou(intersection, union):
    """mIoU from summed counts, over the classes that occur (union > 0) in prediction or truth (the official
    validation averages over all K, so a class absent from a data set counts 0 there)."""
    present = union > 0
    return (intersection[present].double() / union[present].double()).mean().item() if present.any() else 1.0


def dice_jaccard(prediction, target, cls):
    """Per-image DICE and Jaccard of class `cls` for class-index maps [B, H, W]: 2|P T| / (|P| + |T|) and
    |P T| / |P u T|; an image where the class is neither predicted nor present scores 1 (nothing to find,
    nothing found)."""
    p, t = (prediction == cls).flatten(1), (target == cls).flatten(1)
    intersection = (p & t).sum(1).double()
    total = p.sum(1).double() + t.sum(1).double()
    union = total - intersection
    empty = total == 0
    dice = torch.where(empty, torch.ones_like(total), 2 * intersection / total.clamp(min=1))
    jaccard = torch.where(empty, torch.ones_like(total), intersection / union.clamp(min=1))
    return dice, jaccard


class Scores:
    """Per-image DICE and Jaccard of each foreground class, summed intersections and unions (mIoU) and
    per-patient sums (volumetric DICE), for one kind of mask (optimised, or the encoder alone)."""

    def __init__(self, num_labels):
        self.num_labels = num_labels
        self.rows = {}
        self.intersection = torch.zeros(num_labels, dtype=torch.long)
        self.union = torch.zeros(num_labels, dtype=torch.long)
        self.patients = {}

    def add(self, name, prediction, truth):
        prediction, truth = torch.from_numpy(prediction.astype(np.int64)), torch.from_numpy(truth.astype(np.int64))
        row, patient = {}, data.patient_id(name)
        for c in range(1, self.num_labels):
            dice, jaccard = dice_jaccard(prediction[None], truth[None], c)
            row[c] = (dice.item(), jaccard.item())
            if patient is not None:  # a slice of a volume: its counts join its patient's
                p, t = prediction == c, truth == c
                sums = self.patients.setdefault(patient, np.zeros((self.num_labels, 2)))
                sums[c] += (int((p & t).sum()), int(p.sum()) + int(t.sum()))
        self.rows[name] = row
        i, u = intersection_union(prediction, truth, self.num_labels)
        self.intersection += i
        self.union += u

    def summary(self, class_names):
        classes = range(1, self.num_labels)
        dice = {class_names[c]: float(np.mean([r[c][0] for r in self.rows.values()])) for c in classes}
        jaccard = {class_names[c]: float(np.mean([r[c][1] for r in self.rows.values()])) for c in classes}
        out = {"dice": dice, "jaccard": jaccard, "mean_dice": float(np.mean(list(dice.values()))),
               "mean_jaccard": float(np.mean(list(jaccard.values()))),
               "miou": mean_iou(self.intersection, self.union)}
        if self.patients:  # slices named PATIENT_zSLICE: volumetric DICE per patient
            per_patient = [np.mean([2 * s[c, 0] / s[c, 1] if s[c, 1] else 1.0 for c in classes])
                           for s in self.patients.values()]
            out["dice_per_patient"] = float(np.mean(per_patient))
            out["patients"] = len(self.patients)
        return out
