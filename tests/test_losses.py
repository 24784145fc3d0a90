"""Each loss of losses.py against a value computed by hand on a tiny input."""
import math

import pytest
import torch

import losses


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
    assert losses.d_hinge_loss(real, fake).item() == pytest.approx((scale0 + scale1) / 2)
    assert losses.g_hinge_loss(fake).item() == pytest.approx((1.5 + -0.5) / 2)


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


def test_d_m_score_is_per_sample():
    outputs = [[torch.ones(3, 1, 2, 2) * 2], [torch.ones(3, 1, 1, 1) * -1]]
    assert losses.d_m_score(outputs).item() == pytest.approx(3 * (2 - 1))


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
    # Dice with eps = 1: class 0: p0 vs 0 -> 1/(p0 + 1); class 1: (2 p1 + 1)/(p1 + 1 + 1)
    p0 = 1 - p1
    want = 1 - ((1 / (p0 + 1)) + (2 * p1 + 1) / (p1 + 2)) / 2
    assert losses.dice_loss(logits, mask).item() == pytest.approx(want)
    # one class: a sigmoid and a binary cross-entropy
    logit = torch.tensor([[[[0.3]]]])
    assert losses.mask_cross_entropy(logit, torch.tensor([[[0]]])).item() == pytest.approx(math.log(1 + math.exp(0.3)))


def test_perfect_prediction_has_near_zero_dice_loss():
    mask = torch.randint(0, 3, (2, 8, 8))
    logits = torch.nn.functional.one_hot(mask, 3).permute(0, 3, 1, 2).float() * 50
    assert losses.dice_loss(logits, mask).item() < 1e-6
