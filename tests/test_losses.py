"""Each loss of losses.py against a value computed by hand on a tiny input."""
import math

import pytest
import torch

import losses
import model


def test_d_logistic_loss_by_hand():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5])
    want = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0))) / 2 + math.log(1 + math.exp(0.5))
    assert losses.d_logistic_loss(real, fake).item() == pytest.approx(want)


def test_g_nonsaturating_loss_by_hand():
    fake = torch.tensor([0.0, 3.0])
    want = (math.log(2) + math.log(1 + math.exp(-3.0))) / 2
    assert losses.g_nonsaturating_loss(fake).item() == pytest.approx(want)


def test_hinge_losses_by_hand():
    # two scales, each a list of [feature, logits]
    real = [[torch.zeros(1), torch.tensor([0.5, 2.0])], [torch.zeros(1), torch.tensor([-1.0])]]
    fake = [[torch.zeros(1), torch.tensor([-3.0, 0.0])], [torch.zeros(1), torch.tensor([0.5])]]
    scale0 = (0.5 + 0.0) / 2 + (0.0 + 1.0) / 2   # relu(1 - real) mean + relu(1 + fake) mean
    scale1 = 2.0 + 1.5
    # the official (real hinge + fake hinge) / 2, each averaged over the two scales
    assert losses.d_hinge_loss(real, fake).item() == pytest.approx((scale0 + scale1) / 2 / 2)
    assert losses.g_hinge_loss(fake).item() == pytest.approx((1.5 + -0.5) / 2)


def test_mismatched_hinge_loss_by_hand():
    real = [[torch.tensor([0.5, 2.0])], [torch.tensor([-1.0])]]
    fake = [[torch.tensor([-3.0, 0.0])], [torch.tensor([0.5])]]
    mismatched = [[torch.tensor([1.0, -0.5])], [torch.tensor([-2.0])]]
    # per scale: relu(1 - real) mean + (relu(1 + fake) mean + relu(1 + mismatched) mean) / 2
    scale0 = (0.5 + 0.0) / 2 + ((0.0 + 1.0) / 2 + (2.0 + 0.5) / 2) / 2
    scale1 = 2.0 + (1.5 + 0.0) / 2
    assert losses.d_hinge_loss_mismatched(real, fake, mismatched).item() == pytest.approx((scale0 + scale1) / 2 / 2)


def test_feature_matching_by_hand():
    real = [[torch.tensor([1.0, 2.0]), torch.tensor([[0.0, 0.0]]), torch.tensor([9.0])]]
    fake = [[torch.tensor([1.5, 1.0]), torch.tensor([[2.0, -2.0]]), torch.tensor([-9.0])]]  # logits ignored
    assert losses.feature_matching_loss(fake, real).item() == pytest.approx((0.5 + 1.0) / 2 + (2 + 2) / 2)
    two_scales = losses.feature_matching_loss(fake * 2, real * 2)
    assert two_scales.item() == pytest.approx((0.5 + 1.0) / 2 + (2 + 2) / 2)  # averaged over scales


def test_r1_penalty_by_hand():
    # D(x) = sum(a * x^2) per sample: grad = 2 a x, |grad|^2 = 4 a^2 x^2 summed per sample, then the batch mean
    a = torch.tensor([1.0, -2.0])
    x = torch.tensor([[1.0, 3.0], [0.5, 0.0]], requires_grad=True)
    score = (a * x.square()).sum()
    want = ((4 * 1 * 1 + 4 * 4 * 9) + (4 * 1 * 0.25)) / 2
    assert losses.r1_penalty(score, x).item() == pytest.approx(want)
    # two inputs (D_m's image and mask): the squared norms add up
    y = torch.tensor([[2.0], [1.0]], requires_grad=True)
    score = (a * x.square()).sum() + (3 * y).sum()
    assert losses.r1_penalty(score, [x, y]).item() == pytest.approx(want + 9)


def test_d_m_score_is_the_sum_over_scales_of_the_mean_logit():
    outputs = [[torch.ones(3, 1, 2, 2) * 2], [torch.ones(3, 1, 1, 1) * -1]]
    assert losses.d_m_score(outputs).item() == pytest.approx(2 - 1)


def official_d_seg_r1(D_m, seg_img, seg_mask):
    """A transcription of the official R1 on D_m (nv-tlabs/semanticGAN_code, semanticGAN/train_seg_gan.py,
    the `if d_regularize:` block: prep_dseg_input = torch.cat([img, mask], dim=1), requires_grad, the
    "select three D" line real_pred[0][-1].mean() + real_pred[1][-1].mean() + real_pred[2][-1].mean(), and
    d_r1_loss: autograd.grad(real_pred.sum(), real_img_seg), grad.pow(2).reshape(B, -1).sum(1).mean())."""
    real_img_seg = torch.cat([seg_img, seg_mask], dim=1).detach()
    real_img_seg.requires_grad = True
    channels = seg_img.shape[1]
    real_pred = D_m(real_img_seg[:, :channels], real_img_seg[:, channels:])
    real_pred = real_pred[0][-1].mean() + real_pred[1][-1].mean() + real_pred[2][-1].mean()
    grad_real, = torch.autograd.grad(outputs=real_pred.sum(), inputs=real_img_seg, create_graph=True)
    return grad_real.pow(2).reshape(grad_real.shape[0], -1).sum(1).mean()


def test_r1_on_d_m_equals_the_official_formula_and_per_sample_is_b_squared_times_it():
    torch.manual_seed(0)
    B = 4
    D_m = model.MaskDiscriminator(image_channels=1, num_classes=2, base_channels=4, max_channels=8).double().eval()
    image = torch.randn(B, 1, 32, 32, dtype=torch.float64)
    mask = model.real_mask_input(torch.randint(0, 2, (B, 32, 32)), 2).double()
    want = official_d_seg_r1(D_m, image, mask)

    pair = [image.clone().requires_grad_(True), mask.clone().requires_grad_(True)]
    ours = losses.r1_penalty(losses.d_m_score(D_m(*pair)), pair)
    torch.testing.assert_close(ours.double(), want, rtol=1e-6, atol=0)  # scores are summed in fp32
    pair = [image.clone().requires_grad_(True), mask.clone().requires_grad_(True)]
    per_sample = losses.r1_penalty(losses.d_m_score(D_m(*pair)) * B, pair)  # each sample's own gradient
    torch.testing.assert_close(per_sample.double(), B ** 2 * want, rtol=1e-6, atol=0)


def test_path_length_penalty_by_hand():
    # images = w_plus @ A with A fixed: the Jacobian is known, |J^T y| is computable directly
    torch.manual_seed(0)
    w_plus = torch.randn(2, 3, 4, requires_grad=True)
    A = torch.randn(4, 5)
    images = (w_plus.sum(1) @ A).reshape(2, 1, 1, 5)  # [B, 1, 1, 5]: "5 pixels"
    torch.manual_seed(1)
    penalty, new_mean, batch_mean = losses.path_length_penalty(images, w_plus, torch.tensor(0.5), decay=0.1)
    torch.manual_seed(1)
    y = torch.randn(2, 1, 1, 5) / math.sqrt(5)
    grad = (y.reshape(2, 5) @ A.t())[:, None].expand(2, 3, 4)   # d(sum images * y) / d w_plus
    lengths = grad.square().sum(2).mean(1).sqrt()
    mean = 0.5 + 0.1 * (lengths.mean() - 0.5)
    torch.testing.assert_close(batch_mean, lengths.mean())
    torch.testing.assert_close(new_mean, mean)
    torch.testing.assert_close(penalty, (lengths - mean).square().mean())


def test_mask_losses_by_hand():
    logits = torch.tensor([[[[2.0]], [[0.0]]]])  # one pixel, two classes
    mask = torch.tensor([[[1]]])
    p1 = math.exp(0) / (math.exp(2) + math.exp(0))
    assert losses.mask_cross_entropy(logits, mask).item() == pytest.approx(-math.log(p1))
    # the official temperature divides the logits: 2 / 0.1 = 20 against 0
    p1_sharp = 1 / (math.exp(20) + 1)
    assert losses.mask_cross_entropy(logits, mask, 0.1).item() == pytest.approx(-math.log(p1_sharp))
    # one class: a sigmoid and a binary cross-entropy
    logit = torch.tensor([[[[0.3]]]])
    assert losses.mask_cross_entropy(logit, torch.tensor([[[0]]])).item() == pytest.approx(math.log(1 + math.exp(0.3)))
    assert losses.mask_cross_entropy(logit, torch.tensor([[[0]]]), 0.3).item() == pytest.approx(math.log(1 + math.e))


def test_dice_loss_is_the_official_squared_sigmoid_form_by_hand():
    # two pixels in two images, three classes; sigmoid(logits / 0.5) per channel, background left out
    logits = torch.tensor([[[[1.0, -1.0]], [[0.0, 2.0]], [[-2.0, 0.5]]],
                           [[[0.0, 0.0]], [[1.0, -1.0]], [[3.0, 0.0]]]])  # [B=2, K=3, H=1, W=2]
    mask = torch.tensor([[[0, 1]], [[2, 1]]])
    p = torch.sigmoid(logits / 0.5)
    t = torch.nn.functional.one_hot(mask, 3).permute(0, 3, 1, 2).float()
    dice = []
    for k in (1, 2):  # pooled over the batch and the pixels
        dice.append(2 * (p[:, k] * t[:, k]).sum() / ((p[:, k] ** 2).sum() + (t[:, k] ** 2).sum()))
    assert losses.dice_loss(logits, mask, temperature=0.5).item() == pytest.approx(1 - (dice[0] + dice[1]).item() / 2)
    # one class: the single channel counts
    one = logits[:, 1:2]
    q, target = torch.sigmoid(one / 0.3), (mask > 0).float()[:, None]
    want = 1 - 2 * (q * target).sum() / ((q ** 2).sum() + (target ** 2).sum())
    assert losses.dice_loss(one, mask).item() == pytest.approx(want.item())


def test_perfect_prediction_has_near_zero_dice_loss():
    mask = torch.randint(0, 3, (2, 8, 8))
    logits = (torch.nn.functional.one_hot(mask, 3).permute(0, 3, 1, 2).float() * 2 - 1) * 50
    assert losses.dice_loss(logits, mask).item() < 1e-6


# ----------------------------------------------------------------------------------------------------
# LPIPS and the metrics


def test_random_lpips_is_one_fixed_network_zero_on_equal_images_and_takes_grey():
    torch.manual_seed(5)
    a, b = losses.Perceptual("random"), losses.Perceptual("random")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(a(x, y), b(x, y)) and a(x, y).shape == (2,) and (a(x, y) > 0).all()
    assert torch.allclose(a(x, x), torch.zeros(2))
    grey, grey2 = x[:, :1], y[:, :1]
    torch.testing.assert_close(a(grey, grey2), a(grey.expand(-1, 3, -1, -1), grey2.expand(-1, 3, -1, -1)))
    # the inversion's cached-target form gives the same distance
    torch.testing.assert_close(a.distance_to(x, a.features(y)), a(x, y))
    torch.testing.assert_close(a.distance_to(grey, a.features(grey2)), a(grey, grey2))
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    a.train()
    assert not a.lpips.training  # dropout stays off


def test_metrics_by_hand():
    prediction = torch.tensor([[[0, 1, 1], [2, 2, 0]],
                               [[0, 0, 0], [0, 0, 0]]])
    target = torch.tensor([[[0, 1, 0], [2, 1, 0]],
                           [[0, 0, 0], [0, 0, 0]]])
    dice, jaccard = losses.dice_jaccard(prediction, target, 1)
    # image 0: P = {01, 02}, T = {01, 11}: |PT| = 1, |P| + |T| = 4; image 1: neither has class 1 -> 1
    assert dice.tolist() == pytest.approx([2 * 1 / 4, 1.0])
    assert jaccard.tolist() == pytest.approx([1 / 3, 1.0])
    dice, _ = losses.dice_jaccard(prediction, target, 2)  # image 0: P = {10, 11}, T = {10}
    assert dice.tolist() == pytest.approx([2 / 3, 1.0])
    # predicted but absent: 0
    assert losses.dice_jaccard(torch.ones(1, 2, 2), torch.zeros(1, 2, 2), 1)[0].tolist() == [0.0]

    intersection, union = losses.intersection_union(prediction, target, 4)
    # class 0: P 8 pixels (00,05,10..15 -> 2 + 6), T 9; both 8 -> I 8, U 9; class 1: I 1, U 3; class 2: I 1, U 2
    assert intersection.tolist() == [8, 1, 1, 0] and union.tolist() == [9, 3, 2, 0]
    # class 3 occurs nowhere: left out of the mean
    assert losses.mean_iou(intersection, union) == pytest.approx((8 / 9 + 1 / 3 + 1 / 2) / 3)
    assert losses.label_count(1) == 2 and losses.label_count(8) == 8
