"""Tests for facepipe.losses.imbalance: MM Delta and loss against hand-computed values, LDAM
margins and DRW / class-balanced weights against their closed forms, the baselines' reductions
to cross-entropy, gradients, and argument errors.

Tolerances: values computed in float32 from O(1) inputs are compared at rel/abs 1e-6 (float32
has ~7 significant digits; these few operations lose at most one or two); the closed forms are
evaluated in Python float64.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facepipe.losses import (
    MM_TABLE_SETTINGS,
    ClassBalancedLoss,
    DeferredReweighting,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    MaximumMarginLoss,
    WeightedCrossEntropyLoss,
    drw_weights,
    ldam_margins,
    logit_adjustment,
    maximum_margin_delta,
)

F32 = {"rel": 1e-6, "abs": 1e-6}


def ce_with_target(row: list[float], y: int, target_value: float) -> float:
    """-log softmax at y of ``row`` with row[y] replaced, in float64."""
    shifted = list(row)
    shifted[y] = target_value
    return -(shifted[y] - math.log(sum(math.exp(v) for v in shifted)))


def random_batch(seed: int = 0, b: int = 12, c: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * 3.0, torch.randint(0, c, (b,), generator=g)


# ---------------------------------------------------------------- MM Delta, hand-computed
# delta^- = 0.6, beta = 1.5, so delta^+ = 0.9.
#   correct: z = [3.0, 1.0, 0.5], y = 0: gamma = 3 - 1 = 2      -> Delta^+ = exp(-2 - 0.9) = exp(-2.9)
#   wrong:   z = [0.2, 1.5, -1.0], y = 0: max_j!=y - z_y = 1.3  -> Delta^- = exp(-1.3 - 0.6) = exp(-1.9)
#   tie:     z = [1.0, 1.0, 0.0], y = 1: gamma = 0 (not correct) -> Delta^- = exp(-0.6)
MM_LOGITS = [[3.0, 1.0, 0.5], [0.2, 1.5, -1.0], [1.0, 1.0, 0.0]]
MM_LABELS = [0, 0, 1]
MM_DELTAS = [math.exp(-2.9), math.exp(-1.9), math.exp(-0.6)]


def test_mm_delta_hand_computed_correct_wrong_and_tie():
    delta = maximum_margin_delta(torch.tensor(MM_LOGITS), torch.tensor(MM_LABELS), delta_minus=0.6, beta=1.5)
    assert delta.tolist() == pytest.approx(MM_DELTAS, **F32)
    assert MaximumMarginLoss(delta_minus=0.6, beta=1.5).delta_plus == pytest.approx(0.9)


def test_mm_loss_hand_computed():
    loss = MaximumMarginLoss(delta_minus=0.6, beta=1.5, reduction="none")
    per_sample = loss(torch.tensor(MM_LOGITS), torch.tensor(MM_LABELS))
    expected = [ce_with_target(z, y, z[y] - d) for z, y, d in zip(MM_LOGITS, MM_LABELS, MM_DELTAS)]
    assert per_sample.tolist() == pytest.approx(expected, **F32)
    mean = MaximumMarginLoss(delta_minus=0.6, beta=1.5)(torch.tensor(MM_LOGITS), torch.tensor(MM_LABELS))
    assert mean.item() == pytest.approx(sum(expected) / 3, **F32)


def test_mm_delta_is_detached_gradient_is_softmax_of_shifted_logits():
    logits = torch.tensor(MM_LOGITS, requires_grad=True)
    MaximumMarginLoss(delta_minus=0.6, beta=1.5, reduction="sum")(logits, torch.tensor(MM_LABELS)).backward()
    # With Delta a constant, d CE / d z = softmax(z - Delta e_y) - e_y.
    for i, (z, y, d) in enumerate(zip(MM_LOGITS, MM_LABELS, MM_DELTAS)):
        shifted = list(z)
        shifted[y] -= d
        total = sum(math.exp(v) for v in shifted)
        expected = [math.exp(v) / total - (1.0 if j == y else 0.0) for j, v in enumerate(shifted)]
        assert logits.grad[i].tolist() == pytest.approx(expected, **F32)


def test_mm_with_huge_delta_is_cross_entropy():
    logits, labels = random_batch()
    mm = MaximumMarginLoss(delta_minus=1e4, beta=1.0)
    torch.testing.assert_close(mm(logits, labels), F.cross_entropy(logits, labels))
    # Same with LDAM margins and a scale: MM-LDAM without Delta is LDAM.
    counts = [50, 20, 8, 3, 1]
    cosines = torch.tanh(logits)
    mm_ldam = MaximumMarginLoss(delta_minus=1e4, beta=1.0, class_margins=ldam_margins(counts), scale=30.0)
    torch.testing.assert_close(mm_ldam(cosines, labels), LDAMLoss(counts, scale=30.0)(cosines, labels))


def test_mm_ldam_hand_computed_delta_from_unmargined_logits():
    # cos = [0.5, 0.4], y = 0, s = 10, m_0 = 0.2: z = [5, 4], gamma = 1 > 0 (correct, judged
    # without the LDAM margin) -> Delta^+ = exp(-1 - 1.5 * 0.6); target = 10 (0.5 - 0.2) - Delta.
    loss = MaximumMarginLoss(delta_minus=0.6, beta=1.5, class_margins=[0.2, 0.1], scale=10.0)
    value = loss(torch.tensor([[0.5, 0.4]]), torch.tensor([0]))
    delta = math.exp(-1.0 - 0.9)
    assert value.item() == pytest.approx(ce_with_target([5.0, 4.0], 0, 3.0 - delta), **F32)


def test_mm_table_settings_are_the_best_rows():
    assert MM_TABLE_SETTINGS[("cifar10", "long_tailed", 100)] == {"beta": 1.5, "delta_minus": 0.6}
    assert MM_TABLE_SETTINGS[("cifar100", "step", 10)] == {"beta": 1.1, "delta_minus": 2.4}
    assert len(MM_TABLE_SETTINGS) == 8
    default = MaximumMarginLoss()
    assert (default.beta, default.delta_minus) == (1.5, 0.6)


# ---------------------------------------------------------------- LDAM margins, closed form
def test_ldam_margins_closed_form():
    counts = [100, 10, 1]
    margins = ldam_margins(counts, max_margin=0.5)
    expected = [0.5 * (1 / n) ** 0.25 for n in counts]  # n_min = 1
    assert margins.tolist() == pytest.approx(expected, **F32)
    assert margins.dtype == torch.float32 and margins.max().item() == pytest.approx(0.5)
    # m_j n_j^(1/4) is the same constant for every class.
    products = [m * n**0.25 for m, n in zip(margins.tolist(), counts)]
    assert products == pytest.approx([products[0]] * 3, **F32)
    assert ldam_margins([7, 7, 7]).tolist() == pytest.approx([0.5] * 3)


def test_ldam_loss_hand_computed():
    loss = LDAMLoss([16, 1], max_margin=0.5, scale=30.0)
    # m = [0.5 (1/16)^(1/4), 0.5] = [0.25, 0.5]
    value = loss(torch.tensor([[0.6, 0.1]]), torch.tensor([0]))
    assert value.item() == pytest.approx(ce_with_target([18.0, 3.0], 0, 30 * (0.6 - 0.25)), **F32)


# ---------------------------------------------------------------- DRW / CB weights, closed form
def test_drw_inverse_frequency_closed_form():
    weights = drw_weights([100, 10, 1], kind="inverse_frequency")
    raw = [1 / 100, 1 / 10, 1.0]
    expected = [3 * r / sum(raw) for r in raw]  # [0.02703, 0.2703, 2.703]
    assert weights.tolist() == pytest.approx(expected, **F32)
    assert weights.sum().item() == pytest.approx(3.0, **F32)


def test_drw_effective_number_closed_form():
    beta = 0.9999
    counts = [100, 10, 1]
    weights = drw_weights(counts, kind="effective_number", beta=beta)
    raw = [(1 - beta) / (1 - beta**n) for n in counts]  # [0.010050, 0.100045, 1.0]
    expected = [3 * r / sum(raw) for r in raw]
    assert weights.tolist() == pytest.approx(expected, **F32)
    assert weights.sum().item() == pytest.approx(3.0, **F32)
    # beta = 0 weighs every class equally; beta -> 1 approaches inverse frequency.
    assert drw_weights(counts, beta=0.0).tolist() == pytest.approx([1.0, 1.0, 1.0])
    near_one = drw_weights(counts, beta=1 - 1e-9)
    torch.testing.assert_close(near_one, drw_weights(counts, kind="inverse_frequency"), rtol=1e-5, atol=0)


def test_deferred_reweighting_schedule():
    drw = DeferredReweighting([100, 10, 1], start_epoch=2)
    assert drw.weights_for_epoch(0).tolist() == [1.0, 1.0, 1.0]
    assert drw.weights_for_epoch(1).tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(drw.weights_for_epoch(2), drw_weights([100, 10, 1]))
    torch.testing.assert_close(drw.weights_for_epoch(9), drw_weights([100, 10, 1]))


def test_set_class_weights_batch_mean_of_weighted_losses():
    logits, labels = random_batch(c=3)
    loss = MaximumMarginLoss(delta_minus=1e4, beta=1.0)
    weights = torch.tensor([0.5, 1.0, 1.5])
    loss.set_class_weights(weights)
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    # Algorithm 1 line 9: (1/m) sum w_y l, not torch's sum w_y l / sum w_y.
    torch.testing.assert_close(loss(logits, labels), (weights[labels] * per_sample).mean())
    loss.set_class_weights(None)
    torch.testing.assert_close(loss(logits, labels), per_sample.mean())
    assert "class_weights" not in loss.state_dict()


# ---------------------------------------------------------------- baselines
def test_focal_gamma_zero_is_cross_entropy_and_hand_computed():
    logits, labels = random_batch()
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, labels), F.cross_entropy(logits, labels))
    # logits [2, 0, -1], y = 0: p = e^2 / (e^2 + 1 + e^-1), loss = (1 - p)^2 (-log p).
    p = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))
    value = FocalLoss(gamma=2.0)(torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0]))
    assert value.item() == pytest.approx((1 - p) ** 2 * -math.log(p), **F32)


def test_focal_gradient_finite_when_confident_and_gamma_below_one():
    logits = torch.tensor([[60.0, -60.0, 0.0]], requires_grad=True)
    FocalLoss(gamma=0.5)(logits, torch.tensor([0])).backward()
    assert torch.isfinite(logits.grad).all()


def test_class_balanced_loss_closed_form():
    counts = [100, 10, 1]
    logits, labels = random_batch(c=3)
    weights = torch.tensor([(1 - 0.9999) / (1 - 0.9999**n) for n in counts], dtype=torch.float64)
    weights = (weights * 3 / weights.sum()).float()
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(ClassBalancedLoss(counts)(logits, labels), (weights[labels] * per_sample).mean())
    p = torch.softmax(logits, 1).gather(1, labels[:, None]).squeeze(1)
    focal = (1 - p) ** 2 * per_sample
    torch.testing.assert_close(ClassBalancedLoss(counts, gamma=2.0)(logits, labels), (weights[labels] * focal).mean())


def test_logit_adjustment_closed_form_and_uniform_counts_give_cross_entropy():
    assert logit_adjustment([3, 1], tau=2.0).tolist() == pytest.approx([2 * math.log(0.75), 2 * math.log(0.25)], **F32)
    logits, labels = random_batch()
    torch.testing.assert_close(LogitAdjustedLoss([4] * 5)(logits, labels), F.cross_entropy(logits, labels))
    # counts [3, 1], tau = 1: CE of [z0 + log .75, z1 + log .25].
    value = LogitAdjustedLoss([3, 1])(torch.tensor([[0.5, 1.0]]), torch.tensor([1]))
    row = [0.5 + math.log(0.75), 1.0 + math.log(0.25)]
    assert value.item() == pytest.approx(ce_with_target(row, 1, row[1]), **F32)


def test_weighted_cross_entropy_and_reductions():
    logits, labels = random_batch()
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(WeightedCrossEntropyLoss()(logits, labels), per_sample.mean())
    torch.testing.assert_close(WeightedCrossEntropyLoss(reduction="sum")(logits, labels), per_sample.sum())
    torch.testing.assert_close(WeightedCrossEntropyLoss(reduction="none")(logits, labels), per_sample)


def test_half_precision_logits_computed_in_float32():
    logits, labels = random_batch()
    for loss in (FocalLoss(2.0), MaximumMarginLoss(), LogitAdjustedLoss([1, 2, 3, 4, 5])):
        out = loss(logits.to(torch.bfloat16), labels)
        assert out.dtype == torch.float32 and torch.isfinite(out)


# ---------------------------------------------------------------- argument errors
def test_bad_class_counts():
    with pytest.raises(ValueError, match=r"class\(es\) 1 have 0"):
        drw_weights([5, 0, 3])
    with pytest.raises(ValueError, match="> 0"):
        ldam_margins([5, -1])
    with pytest.raises(ValueError, match=r"vector \[C\]"):
        logit_adjustment([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match=r"vector \[C\]"):
        LogitAdjustedLoss([])
    with pytest.raises(ValueError, match="finite"):
        ClassBalancedLoss([1.0, float("nan")])


def test_bad_arguments():
    with pytest.raises(ValueError, match="beta must be in"):
        drw_weights([1, 2], beta=1.0)
    with pytest.raises(ValueError, match="kind"):
        drw_weights([1, 2], kind="sqrt")
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1.0)
    with pytest.raises(ValueError, match="delta_minus"):
        MaximumMarginLoss(delta_minus=float("inf"))
    with pytest.raises(ValueError, match="beta"):
        MaximumMarginLoss(beta=-0.5)
    with pytest.raises(ValueError, match="scale"):
        MaximumMarginLoss(scale=0.0)
    with pytest.raises(ValueError, match="reduction"):
        WeightedCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="start_epoch"):
        DeferredReweighting([1, 2], start_epoch=-1)
    with pytest.raises(ValueError, match=">= 0"):
        WeightedCrossEntropyLoss(weight=[1.0, -1.0])


def test_mismatched_shapes():
    logits, labels = random_batch(c=5)
    with pytest.raises(ValueError, match="C = 5"):
        WeightedCrossEntropyLoss(weight=[1.0, 2.0, 3.0])(logits, labels)
    with pytest.raises(ValueError, match="C = 5"):
        LogitAdjustedLoss([1, 2, 3])(logits, labels)
    with pytest.raises(ValueError, match="C = 5"):
        MaximumMarginLoss(class_margins=[0.1, 0.2])(logits, labels)
    with pytest.raises(ValueError, match=r"labels must have shape \[B\]"):
        FocalLoss()(logits, labels[:3])
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        FocalLoss()(logits[0], labels)
    with pytest.raises(ValueError, match="integer"):
        MaximumMarginLoss()(logits, labels.float())
