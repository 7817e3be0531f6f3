"""Tests for facepipe.losses.arconvl: R_ben / R_upp / beta / sigma^2 against hand-computed radii
(Li et al. Eq. 3-5, 7), every loss term against the printed formulas evaluated by hand (Eq. 2, 6,
8), gradient routing (radii learn from L_R only), prediction, learning-rate groups, errors.

The hand computations run in float64 (the head is converted with .double()), so they are
compared at 1e-12: the only error left is float64 rounding of a handful of O(1) terms.
"""
from __future__ import annotations

import math

import pytest
import torch

from facepipe.losses import ARConvLHead, adaptive_beta, adaptive_margin, benchmark_and_upper_radius

TIGHT = {"rel": 1e-12, "abs": 1e-12}


def make_head(centers, radii, counts, gamma=0.05) -> ARConvLHead:
    head = ARConvLHead(len(centers), len(centers[0]), counts, gamma=gamma).double()
    with torch.no_grad():
        head.centers.copy_(torch.tensor(centers, dtype=torch.float64))
        head.radii.copy_(torch.tensor(radii, dtype=torch.float64))
    return head


# ---------------------------------------------------------------- Eq. 3-5, 7 by hand
# Centres (0,0), (4,0), (2,4): d01 = 4, d02 = d12 = sqrt(20), so d_min = [4, 4, sqrt(20)],
# half of it [2, 2, sqrt(5)], R_ben = 2 and R_upp = max(max_j R_j, sqrt(5)).
TRIANGLE = [[0.0, 0.0], [4.0, 0.0], [2.0, 4.0]]
RADIUS_CASES = [
    # radii, R_upp, beta = min(1, R_upp^2/4 - 1), sigma^2 = min(4, R_upp^2 - 4)
    ([1.0, 2.2, 0.5], math.sqrt(5.0), 0.25, 1.0),  # sqrt(5) from the centres beats R_1 = 2.2
    ([1.0, 2.5, 0.5], 2.5, 0.5625, 2.25),  # 6.25/4 - 1; sigma^2 from the R_upp^2 - R_ben^2 branch
    ([1.0, 3.0, 0.5], 3.0, 1.0, 4.0),  # 9/4 - 1 = 1.25 capped at 1; sigma^2 capped at R_ben^2
]


@pytest.mark.parametrize("radii,r_upp,beta,sigma2", RADIUS_CASES)
def test_radii_beta_sigma2_hand_computed(radii, r_upp, beta, sigma2):
    centers = torch.tensor(TRIANGLE, dtype=torch.float64)
    r_ben_t, r_upp_t = benchmark_and_upper_radius(centers, torch.tensor(radii, dtype=torch.float64))
    assert r_ben_t.item() == pytest.approx(2.0, **TIGHT)
    assert r_upp_t.item() == pytest.approx(r_upp, **TIGHT)
    assert adaptive_beta(r_ben_t, r_upp_t).item() == pytest.approx(beta, **TIGHT)
    assert adaptive_margin(r_ben_t, r_upp_t).item() == pytest.approx(sigma2, **TIGHT)
    # The forward pass reports the same values.
    out = make_head(TRIANGLE, radii, [1, 1, 1])(torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0]))
    assert (out["r_ben"].item(), out["r_upp"].item()) == pytest.approx((2.0, r_upp), **TIGHT)
    assert (out["beta"].item(), out["sigma2"].item()) == pytest.approx((beta, sigma2), **TIGHT)


def test_degenerate_coincident_centres():
    zero = torch.tensor(0.0)
    assert adaptive_beta(zero, torch.tensor(1.0)).item() == 1.0
    assert adaptive_beta(zero, zero).item() == 0.0
    assert adaptive_margin(zero, torch.tensor(1.0)).item() == 0.0


def test_zero_distribution_loss_when_upper_equals_benchmark():
    # Unit-square corners 2 apart: every d_min is 2, so R_ben = 1, and radii <= 1 keep R_upp = 1.
    square = [[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]]
    head = make_head(square, [1.0, 0.5, 0.9, 0.2], [10, 5, 2, 1])
    f = torch.tensor([[0.3, 0.1], [2.5, -0.4], [0.0, 3.0], [1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    out = head(f, torch.tensor([0, 1, 2, 3]))
    assert out["r_ben"].item() == out["r_upp"].item() == pytest.approx(1.0, **TIGHT)
    assert out["beta"].item() == 0.0 and out["sigma2"].item() == 0.0
    assert out["distribution"].item() == 0.0
    (grad,) = torch.autograd.grad(out["distribution"], f)
    assert torch.count_nonzero(grad) == 0


# ---------------------------------------------------------------- Eq. 2, 6, 8 by hand
# Centres (0,0), (1,0), (0,2): d01 = 1, d02 = 2, d12 = sqrt(5); d_min/2 = [0.5, 0.5, 1], so
# R_ben = 0.5, R_upp = 1 (radii 0.2 are smaller), sigma^2 = min(0.25, 0.75) = 0.25 and
# beta = min(1, 4 - 1) = 1. Counts [4, 2, 1]: alpha = [1, 2, 4], eta = [4/7, 2/7, 1/7].
SMALL_CENTERS = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
SMALL_RADII = [0.2, 0.2, 0.2]
SMALL_COUNTS = [4, 2, 1]
FEATURES = [[0.5, 0.0], [1.0, 0.3], [0.0, 1.0], [0.1, 0.1]]
LABELS = [0, 1, 2, 0]
SIGMA2, BETA, GAMMA = 0.25, 1.0, 0.05
ALPHA = [1.0, 2.0, 4.0]
ETA = [4 / 7, 2 / 7, 1 / 7]


def sq_dist(a, b) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b))


def hand_region() -> float:  # Eq. 2
    total = 0.0
    for f, y in zip(FEATURES, LABELS):
        d = math.sqrt(sq_dist(f, SMALL_CENTERS[y]))
        total += ALPHA[y] * (max(0.0, d - SMALL_RADII[y]) ** 2 + GAMMA * SMALL_RADII[y] ** 2)
    return total / len(FEATURES)


def hand_distribution() -> float:  # Eq. 6, alpha normalised to mean 1 as in the authors' code
    mean_alpha = sum(ALPHA) / len(ALPHA)
    total = sum(ALPHA[y] / mean_alpha * sq_dist(f, SMALL_CENTERS[y]) for f, y in zip(FEATURES, LABELS))
    return BETA * total / len(FEATURES)


def hand_center_term() -> float:  # Eq. 8, second part: p(C_j) = 1 / (1 + sum_j'!=j exp(-d^2 + sigma^2))
    k = len(SMALL_CENTERS)
    terms = []
    for j in range(k):
        others = sum(math.exp(-sq_dist(SMALL_CENTERS[j], SMALL_CENTERS[o]) + SIGMA2) for o in range(k) if o != j)
        terms.append(-math.log(1.0 / (1.0 + others)))
    return sum(terms) / k


def hand_sample_term() -> float:  # Eq. 8, first part, with p(x_i in j) exactly as printed
    total = 0.0
    for f, y in zip(FEATURES, LABELS):
        own = ETA[y] * math.exp(-sq_dist(f, SMALL_CENTERS[y]))
        others = sum(
            ETA[o] * math.exp(-sq_dist(f, SMALL_CENTERS[o]) + SIGMA2) for o in range(len(SMALL_CENTERS)) if o != y
        )
        total += -math.log(own / (own + others))
    return total / len(FEATURES)


def small_forward(requires_grad: bool = False):
    head = make_head(SMALL_CENTERS, SMALL_RADII, SMALL_COUNTS, gamma=GAMMA)
    f = torch.tensor(FEATURES, dtype=torch.float64, requires_grad=requires_grad)
    return head, f, head(f, torch.tensor(LABELS))


def test_center_term_hand_computed():
    _, _, out = small_forward()
    # By hand: -log p(C_0) = log(1 + e^-0.75 + e^-3.75), -log p(C_1) = log(1 + e^-0.75 + e^-4.75),
    # -log p(C_2) = log(1 + e^-3.75 + e^-4.75); their mean is about 0.3391.
    expected = (
        math.log(1 + math.exp(-0.75) + math.exp(-3.75))
        + math.log(1 + math.exp(-0.75) + math.exp(-4.75))
        + math.log(1 + math.exp(-3.75) + math.exp(-4.75))
    ) / 3
    assert hand_center_term() == pytest.approx(expected, **TIGHT)
    assert out["center_term"].item() == pytest.approx(expected, **TIGHT)


def test_every_term_hand_computed():
    _, _, out = small_forward()
    assert (out["r_ben"].item(), out["r_upp"].item()) == pytest.approx((0.5, 1.0), **TIGHT)
    assert (out["beta"].item(), out["sigma2"].item()) == pytest.approx((BETA, SIGMA2), **TIGHT)
    assert out["region"].item() == pytest.approx(hand_region(), **TIGHT)
    assert out["distribution"].item() == pytest.approx(hand_distribution(), **TIGHT)
    assert out["margin"].item() == pytest.approx(hand_sample_term() + hand_center_term(), **TIGHT)
    assert out["loss"].item() == pytest.approx(
        hand_region() + hand_distribution() + hand_sample_term() + hand_center_term(), **TIGHT
    )


def test_center_term_pushes_centres_apart():
    head, _, out = small_forward()
    (grad,) = torch.autograd.grad(out["center_term"], head.centers)
    step = head.centers.detach() - 0.1 * grad
    before = torch.pdist(head.centers.detach()).min()
    assert torch.pdist(step).min() > before


# ---------------------------------------------------------------- gradient routing
def test_radii_learn_from_region_loss_only():
    head, f, out = small_forward(requires_grad=True)
    for name in ("distribution", "margin"):
        (grad,) = torch.autograd.grad(out[name], head.radii, retain_graph=True, allow_unused=True)
        assert grad is None, f"{name} must not reach the radii"
    # L_R uses the detached distance d*: no gradient to the features or centres.
    grads = torch.autograd.grad(out["region"], [f, head.centers], retain_graph=True, allow_unused=True)
    assert grads == (None, None)
    # dL_R/dR_j = (1/n) sum_{i in j} alpha_j (-2 max(0, d_i - R_j) + 2 gamma R_j), by hand.
    (grad_r,) = torch.autograd.grad(out["region"], head.radii, retain_graph=True)
    expected = [0.0, 0.0, 0.0]
    for feat, y in zip(FEATURES, LABELS):
        d = math.sqrt(sq_dist(feat, SMALL_CENTERS[y]))
        r = SMALL_RADII[y]
        expected[y] += ALPHA[y] * (-2 * max(0.0, d - r) + 2 * GAMMA * r) / len(FEATURES)
    assert grad_r.tolist() == pytest.approx(expected, **TIGHT)
    out["loss"].backward()
    assert head.radii.grad.tolist() == pytest.approx(expected, **TIGHT)
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    assert torch.isfinite(head.centers.grad).all() and head.centers.grad.abs().sum() > 0


def test_feature_on_its_centre_has_finite_gradients():
    head = make_head(SMALL_CENTERS, SMALL_RADII, SMALL_COUNTS)
    f = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    head(f, torch.tensor([0, 1]))["loss"].backward()
    assert torch.isfinite(f.grad).all() and torch.isfinite(head.radii.grad).all()


# ---------------------------------------------------------------- prediction
def test_predict_nearest_centre_and_with_prior():
    head = make_head([[0.0, 0.0], [1.0, 0.0]], [0.3, 0.3], [99, 1])
    f = torch.tensor([[0.1, 0.0], [0.9, 0.0], [0.6, 0.0]], dtype=torch.float64)
    assert head.predict(f).tolist() == [0, 1, 1]
    # With the prior eta = [0.99, 0.01], log eta_j - d_j^2 by hand:
    #   x = 0.9: class 0 log(.99) - 0.81 = -0.820, class 1 log(.01) - 0.01 = -4.615 -> class 0
    #   x = 0.6: class 0 log(.99) - 0.36 = -0.370, class 1 log(.01) - 0.16 = -4.765 -> class 0
    assert head.predict(f, use_prior=True).tolist() == [0, 0, 0]
    expected = [[-0.01, -0.81], [-0.81, -0.01], [-0.36, -0.16]]
    torch.testing.assert_close(head.scores(f), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    with_prior = [[math.log(0.99) + a, math.log(0.01) + b] for a, b in expected]
    torch.testing.assert_close(
        head.scores(f, use_prior=True), torch.tensor(with_prior, dtype=torch.float64), rtol=0, atol=1e-12
    )


# ---------------------------------------------------------------- optimisation helpers
def test_radius_learning_rate_groups():
    assert [ARConvLHead.radius_lr(e) for e in range(5)] == [1e-3, 1e-3, 1e-3, 1e-2, 1e-2]
    head = ARConvLHead(3, 4, [5, 3, 1])
    groups = head.parameter_groups(0.1)
    assert groups[0]["params"][0] is head.centers and groups[0]["lr"] == 0.1
    assert groups[1]["params"][0] is head.radii and groups[1]["lr"] == 1e-3 and groups[1]["weight_decay"] == 0.0
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4)
    assert head.set_radius_lr(optimizer, 3) == 1e-2
    assert optimizer.param_groups[1]["lr"] == 1e-2 and optimizer.param_groups[0]["lr"] == 0.1
    with pytest.raises(ValueError, match="parameter_groups"):
        head.set_radius_lr(torch.optim.SGD(head.parameters(), lr=0.1), 0)
    with pytest.raises(ValueError, match="parameter_groups"):
        head.set_radius_lr(torch.optim.SGD([head.centers], lr=0.1), 0)


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    head = ARConvLHead(3, 8, [20, 5, 2])
    features = torch.randn(27, 8)
    labels = torch.tensor([0] * 20 + [1] * 5 + [2] * 2)
    optimizer = torch.optim.SGD(head.parameter_groups(0.05, epoch=3), lr=0.05, momentum=0.9)
    first = head(features, labels)["loss"].item()
    for _ in range(30):
        optimizer.zero_grad()
        head(features, labels)["loss"].backward()
        optimizer.step()
    assert head(features, labels)["loss"].item() < first


def test_float32_under_autocast_and_bf16_inputs():
    head = ARConvLHead(4, 6, [4, 3, 2, 1])
    f, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 0])
    reference = head(f, y)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(f, y)
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["loss"], reference)
    assert head(f.to(torch.bfloat16), y)["loss"].dtype == torch.float32


# ---------------------------------------------------------------- argument errors
def test_bad_arguments():
    with pytest.raises(ValueError, match=r"class\(es\) 2 have 0"):
        ARConvLHead(3, 4, [5, 2, 0])
    with pytest.raises(ValueError, match="expected num_classes = 3"):
        ARConvLHead(3, 4, [5, 2])
    with pytest.raises(ValueError, match=">= 2"):
        ARConvLHead(1, 4, [5])
    with pytest.raises(ValueError, match="gamma"):
        ARConvLHead(3, 4, [5, 2, 1], gamma=1.5)
    head = ARConvLHead(3, 4, [5, 2, 1])
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        head(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must have shape \[B\] = \[2\]"):
        head(torch.randn(2, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        head(torch.randn(2, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="radii"):
        benchmark_and_upper_radius(torch.zeros(3, 2), torch.zeros(2))
