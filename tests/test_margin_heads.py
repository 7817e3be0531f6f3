"""Tests for facepipe.losses.margin_heads: hand-computed logits at known angles, psi,
per-class margins, margin validation, weight sharing, lambda annealing, gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from facepipe.losses import (
    HEADS,
    ArcFaceHead,
    CosFaceHead,
    LSoftmaxHead,
    MarginHead,
    SoftmaxHead,
    SphereFaceHead,
    build_head,
    psi,
)

DEG = math.pi / 180.0


def unit(angle_deg: float, norm: float = 1.0) -> list[float]:
    return [norm * math.cos(angle_deg * DEG), norm * math.sin(angle_deg * DEG)]


# Class weights at 30, 100 and 170 degrees with deliberately unequal norms; the embedding
# sits at 0 degrees with norm 2, so theta_j is the angle of row j.
ANGLES = [30.0, 100.0, 170.0]
W_NORMS = [3.0, 0.5, 1.5]
F_NORM = 2.0


def set_geometry(head: MarginHead) -> torch.Tensor:
    with torch.no_grad():
        head.weight.copy_(torch.tensor([unit(a, n) for a, n in zip(ANGLES, W_NORMS)]))
    return torch.tensor([unit(0.0, F_NORM)] * len(ANGLES))  # one sample per target class


LABELS = torch.tensor([0, 1, 2])


# ---------------------------------------------------------------- hand-computed logits
def test_softmax_is_plain_dot_product():
    head = SoftmaxHead(3, 2)
    f = set_geometry(head)
    out = head(f, LABELS)
    expected = [F_NORM * n * math.cos(a * DEG) for a, n in zip(ANGLES, W_NORMS)]
    for i in range(3):
        assert out[i].tolist() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(head.margin, torch.zeros(3))
    torch.testing.assert_close(head.inference_logits(f), out)


def test_cosface_hand_computed():
    s, m = 10.0, 0.35
    head = CosFaceHead(3, 2, s=s, m=m)
    f = set_geometry(head)
    out = head(f, LABELS)
    for i, y in enumerate(LABELS.tolist()):
        expected = [s * math.cos(a * DEG) for a in ANGLES]
        expected[y] = s * (math.cos(ANGLES[y] * DEG) - m)
        assert out[i].tolist() == pytest.approx(expected, abs=1e-4)


def test_arcface_hand_computed_including_fallback():
    s, m = 10.0, 0.5
    head = ArcFaceHead(3, 2, s=s, m=m)
    f = set_geometry(head)
    out = head(f, LABELS)
    # 30 and 100 degrees: theta + m < pi, plain cos(theta + m).
    assert out[0, 0].item() == pytest.approx(s * math.cos(30 * DEG + m), abs=1e-4)
    assert out[1, 1].item() == pytest.approx(s * math.cos(100 * DEG + m), abs=1e-4)
    # 170 degrees + 0.5 rad (28.6 deg) > pi: fallback cos(theta) - m sin(m).
    assert 170 * DEG + m > math.pi
    fallback = s * (math.cos(170 * DEG) - m * math.sin(m))
    assert out[2, 2].item() == pytest.approx(fallback, abs=1e-4)
    assert out[2, 2].item() != pytest.approx(s * math.cos(170 * DEG + m), abs=1e-2)
    # Non-target logits carry no margin.
    assert out[0, 1].item() == pytest.approx(s * math.cos(100 * DEG), abs=1e-4)
    assert out[2, 0].item() == pytest.approx(s * math.cos(30 * DEG), abs=1e-4)


def test_arcface_target_monotonically_decreasing_in_theta():
    s, m = 1.0, 0.5
    head = ArcFaceHead(1, 2, s=s, m=m)
    angles = torch.linspace(0.0, math.pi, 721, dtype=torch.float64)
    f = torch.stack([torch.cos(angles), torch.sin(angles)], 1).float()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0]]))
    target = head(f, torch.zeros(len(angles), dtype=torch.long))[:, 0]
    assert (target[1:] - target[:-1] <= 1e-6).all()


# (m, theta in degrees, r) with r = floor(theta m / 180) worked out by hand:
#   m=2: 30 -> r=0, 100 -> r=1, 170 -> r=1
#   m=3: 30 -> r=0, 100 -> r=1, 170 -> r=2
#   m=4: 30 -> r=0, 100 -> r=2, 170 -> r=3
LSOFTMAX_R = {2: [0, 1, 1], 3: [0, 1, 2], 4: [0, 2, 3]}


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("sphere", [False, True])
def test_lsoftmax_hand_computed(m, sphere):
    cls = SphereFaceHead if sphere else LSoftmaxHead
    head = cls(3, 2, m=m, lambda_base=0.0, lambda_min=0.0)
    assert head.current_lambda == 0.0
    f = set_geometry(head)
    out = head(f, LABELS)
    norms = [1.0] * 3 if sphere else W_NORMS
    for i, y in enumerate(LABELS.tolist()):
        theta = ANGLES[y] * DEG
        r = LSOFTMAX_R[m][y]
        psi_y = (-1) ** r * math.cos(m * theta) - 2 * r
        expected = [F_NORM * n * math.cos(a * DEG) for a, n in zip(ANGLES, norms)]
        expected[y] = F_NORM * norms[y] * psi_y
        assert out[i].tolist() == pytest.approx(expected, abs=1e-4), (m, y)


def test_lsoftmax_lambda_blends_target():
    lam = 3.0
    head = LSoftmaxHead(3, 2, m=2, lambda_base=lam, lambda_gamma=0.0, lambda_min=0.0)
    f = set_geometry(head)
    out = head(f, LABELS)
    theta = 30 * DEG
    wf = F_NORM * W_NORMS[0] * math.cos(theta)
    psi_y = F_NORM * W_NORMS[0] * math.cos(2 * theta)
    assert out[0, 0].item() == pytest.approx((lam * wf + psi_y) / (1 + lam), abs=1e-4)


# ---------------------------------------------------------------- psi
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_psi_continuous_monotone_endpoints(m):
    theta = torch.linspace(0.0, math.pi, 20001, dtype=torch.float64)
    values = psi(theta, m)
    assert values.dtype == torch.float64
    assert (values[1:] - values[:-1] < 0).all(), "psi must be strictly decreasing on [0, pi]"
    # Largest step on this grid is bounded by max |psi'| * dtheta = m * dtheta.
    assert (values[1:] - values[:-1]).abs().max() <= m * (math.pi / 20000) + 1e-9
    assert psi(torch.tensor(0.0, dtype=torch.float64), m).item() == pytest.approx(1.0, abs=1e-12)
    assert psi(torch.tensor(math.pi, dtype=torch.float64), m).item() == pytest.approx(-(2 * m - 1), abs=1e-9)
    for r in range(1, m):
        b = r * math.pi / m
        left = psi(torch.tensor(b - 1e-9, dtype=torch.float64), m).item()
        right = psi(torch.tensor(b + 1e-9, dtype=torch.float64), m).item()
        assert left == pytest.approx(1 - 2 * r, abs=1e-6)
        assert right == pytest.approx(1 - 2 * r, abs=1e-6)
    # Chebyshev evaluation equals the closed form (-1)^r cos(m theta) - 2r.
    r = torch.clamp(torch.floor(theta * m / math.pi), max=m - 1)
    closed = torch.where(r % 2 == 0, 1.0, -1.0) * torch.cos(m * theta) - 2 * r
    torch.testing.assert_close(values, closed, atol=1e-9, rtol=0)


def test_psi_m1_is_cos_and_tensor_m_broadcasts():
    theta = torch.linspace(0.0, math.pi, 101, dtype=torch.float64)
    torch.testing.assert_close(psi(theta, 1), torch.cos(theta))
    ms = torch.tensor([1, 2, 3, 4])
    grid = psi(theta[:, None], ms[None, :])
    for j, m in enumerate(ms.tolist()):
        torch.testing.assert_close(grid[:, j], psi(theta, m))
    with pytest.raises(ValueError):
        psi(theta, 0)
    with pytest.raises(ValueError):
        psi(theta, 2.5)


def test_psi_gradient_finite():
    theta = torch.tensor([0.0, 0.5, math.pi / 2, math.pi], requires_grad=True)
    psi(theta, 4).sum().backward()
    assert torch.isfinite(theta.grad).all()


# ---------------------------------------------------------------- per-class margins
@pytest.mark.parametrize(
    "name,margins,extra",
    [
        ("cosface", [0.1, 0.2, 0.3, 0.4], {"s": 16.0}),
        ("arcface", [0.1, 0.3, 0.5, 0.7], {"s": 16.0}),
        ("lsoftmax", [1, 2, 3, 4], {"lambda_base": 2.0, "lambda_min": 2.0}),
        ("sphereface", [4, 3, 2, 1], {"lambda_base": 0.0, "lambda_min": 0.0}),
    ],
)
def test_vector_margin_uses_each_samples_own_class(name, margins, extra):
    torch.manual_seed(0)
    C, D, B = 4, 6, 16
    vec = build_head(name, C, D, m=margins, **extra)
    f = torch.randn(B, D)
    labels = torch.arange(B) % C
    out = vec(f, labels)
    for c, m in enumerate(margins):
        scalar = build_head(name, C, D, weight=vec.weight, m=m, **extra)
        ref = scalar(f, labels)
        rows = labels == c
        torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)
    assert vec.margin.dtype == torch.float32 and vec.margin.shape == (C,)
    assert "margin" in vec.state_dict()


def test_margin_vector_actually_differs_per_class():
    head = CosFaceHead(2, 2, s=1.0, m=[0.0, 0.5])
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = head(f, torch.tensor([0, 1]))
    assert out[0, 0].item() == pytest.approx(1.0)
    assert out[1, 1].item() == pytest.approx(0.5)


# ---------------------------------------------------------------- set_margins
def test_set_margins_scalar_broadcast_and_vector():
    head = CosFaceHead(3, 4)
    head.set_margins(0.2)
    torch.testing.assert_close(head.margin, torch.full((3,), 0.2))
    head.set_margins([0.1, 0.2, 0.3])
    torch.testing.assert_close(head.margin, torch.tensor([0.1, 0.2, 0.3]))
    head.set_margins(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    assert head.margin.dtype == torch.float32


def test_set_margins_errors():
    head = ArcFaceHead(3, 4)
    with pytest.raises(ValueError, match=r"\[C\]"):
        head.set_margins([0.1, 0.2])
    with pytest.raises(ValueError, match=r"\[C\]"):
        head.set_margins(torch.zeros(3, 1))
    with pytest.raises(ValueError):
        head.set_margins([0.1, -0.2, 0.3])
    with pytest.raises(ValueError):
        head.set_margins([0.1, float("nan"), 0.3])
    with pytest.raises(ValueError):
        head.set_margins(float("inf"))
    before = head.margin.clone()
    with pytest.raises(ValueError):
        head.set_margins([0.1, -0.2, 0.3])
    assert torch.equal(head.margin, before), "a rejected update must not change the margins"

    ls = LSoftmaxHead(3, 4)
    with pytest.raises(ValueError):
        ls.set_margins(2.5)
    with pytest.raises(ValueError):
        ls.set_margins([1, 2, 0])
    with pytest.raises(ValueError):
        LSoftmaxHead(3, 4, m=1.5)
    ls.set_margins([1.0, 2.0, 3.0])  # integer-valued floats are fine
    assert ls.margin.tolist() == [1.0, 2.0, 3.0]

    with pytest.raises(ValueError, match="softmax has no margin"):
        SoftmaxHead(3, 4).set_margins(0.1)


# ---------------------------------------------------------------- weight sharing
def test_shared_weight_is_same_parameter_and_keeps_optimizer_state():
    soft = build_head("softmax", 5, 8)
    opt = torch.optim.SGD(soft.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(soft(torch.randn(4, 8), torch.tensor([0, 1, 2, 3])), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    arc = build_head("arcface", 5, 8, weight=soft.weight, s=30.0, m=0.4)
    assert arc.weight is soft.weight
    assert list(arc.parameters())[0] is soft.weight
    assert arc.weight in opt.state  # momentum buffer carries over
    with pytest.raises(ValueError):
        build_head("cosface", 6, 8, weight=soft.weight)
    with pytest.raises(TypeError):
        build_head("cosface", 5, 8, weight=torch.zeros(5, 8))


def test_default_init_and_buffers():
    torch.manual_seed(0)
    head = CosFaceHead(2000, 64)
    assert isinstance(head.weight, nn.Parameter) and head.weight.shape == (2000, 64)
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert abs(head.weight.mean().item()) < 1e-3


# ---------------------------------------------------------------- lambda annealing
def test_lambda_annealing_and_state_dict_round_trip():
    base, gamma, power, lmin = 1000.0, 0.12, 1.0, 5.0
    head = SphereFaceHead(4, 3, lambda_base=base, lambda_gamma=gamma, lambda_power=power, lambda_min=lmin)
    assert head.current_lambda == pytest.approx(base)
    for k in range(1, 40):
        head.step()
        assert int(head.it) == k
        expected = max(lmin, base * (1 + gamma * k) ** (-power))
        assert head.current_lambda == pytest.approx(expected, rel=1e-6)
    for _ in range(2000):
        head.step()
    assert head.current_lambda == pytest.approx(lmin)

    head2 = LSoftmaxHead(4, 3, m=2, lambda_base=100.0, lambda_gamma=0.5, lambda_power=2.0, lambda_min=0.0)
    for _ in range(7):
        head2.step()
    assert head2.current_lambda == pytest.approx(100.0 * (1 + 0.5 * 7) ** -2.0, rel=1e-6)
    state = head2.state_dict()
    assert int(state["it"]) == 7
    resumed = LSoftmaxHead(4, 3, m=2, lambda_base=100.0, lambda_gamma=0.5, lambda_power=2.0, lambda_min=0.0)
    resumed.load_state_dict(state)
    assert int(resumed.it) == 7
    f, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    torch.testing.assert_close(resumed(f, y), head2(f, y))


def test_state_dict_restores_larger_margins():
    src = LSoftmaxHead(3, 2, m=[1, 2, 4], lambda_base=0.0, lambda_min=0.0)
    dst = LSoftmaxHead(3, 2, m=1, lambda_base=0.0, lambda_min=0.0)
    dst.load_state_dict(src.state_dict())
    f, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 2, 1, 0])
    torch.testing.assert_close(dst(f, y), src(f, y))


def test_step_is_noop_for_other_heads():
    for name in ("softmax", "cosface", "arcface"):
        head = build_head(name, 3, 2)
        before = {k: v.clone() for k, v in head.state_dict().items()}
        head.step()
        after = head.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------- gradients
NO_LAMBDA = {"lambda_base": 0.0, "lambda_min": 0.0}


@pytest.mark.parametrize(
    "name,extra",
    [(name, {}) for name in sorted(HEADS)] + [("lsoftmax", NO_LAMBDA), ("sphereface", NO_LAMBDA)],
)
def test_gradients_finite_and_flowing_at_theta_0_and_pi(name, extra):
    head = build_head(name, 3, 2, **extra)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]))
    # theta_y exactly 0 (sample 0, 1) and exactly pi (sample 2), plus a generic sample.
    f = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], requires_grad=True)
    labels = torch.tensor([0, 1, 2, 1])
    logits = head(f, labels)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, labels).backward()
    assert torch.isfinite(f.grad).all() and torch.isfinite(head.weight.grad).all()
    assert f.grad.abs().sum() > 0 and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(HEADS))
def test_gradients_finite_random_and_zero_embedding(name):
    torch.manual_seed(1)
    head = build_head(name, 10, 16)
    f = torch.randn(32, 16)
    f[0] = 0.0  # degenerate embedding must not produce NaNs
    f.requires_grad_(True)
    labels = torch.randint(0, 10, (32,))
    F.cross_entropy(head(f, labels), labels).backward()
    assert torch.isfinite(f.grad).all() and torch.isfinite(head.weight.grad).all()
    assert head.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- inference / dtype
def test_inference_logits_have_no_margin():
    torch.manual_seed(0)
    f = torch.randn(8, 5)
    for cls in (CosFaceHead, ArcFaceHead):
        head = cls(4, 5, s=32.0, m=0.4)
        cos = F.normalize(f) @ F.normalize(head.weight).t()
        torch.testing.assert_close(head.inference_logits(f), 32.0 * cos)
        zero = cls(4, 5, s=32.0, m=0.0, weight=head.weight)
        torch.testing.assert_close(zero(f, torch.arange(8) % 4), head.inference_logits(f), atol=1e-4, rtol=1e-5)
    ls = LSoftmaxHead(4, 5, m=3)
    torch.testing.assert_close(ls.inference_logits(f), f @ ls.weight.t())
    sp = SphereFaceHead(4, 5, m=3)
    torch.testing.assert_close(sp.inference_logits(f), f @ F.normalize(sp.weight).t())


@pytest.mark.parametrize("name", sorted(HEADS))
def test_float32_under_autocast_and_half_inputs(name):
    torch.manual_seed(0)
    head = build_head(name, 6, 8)
    f, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 5])
    ref = head(f, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(f, y)
        inf = head.inference_logits(f)
    assert out.dtype == torch.float32 and inf.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    half = head(f.to(torch.bfloat16), y)
    assert half.dtype == torch.float32


def test_input_shape_errors():
    head = CosFaceHead(3, 4)
    with pytest.raises(ValueError):
        head(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        head(torch.randn(2, 4), torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------- registry
def test_registry_and_build_head_errors():
    assert set(HEADS) == {"softmax", "cosface", "arcface", "lsoftmax", "sphereface", "prototype"}
    assert build_head("lsoftmax", 3, 2).normalize_weights is False
    assert build_head("sphereface", 3, 2).normalize_weights is True
    head = build_head("cosface", 3, 2, s=8.0, m=0.2)
    assert head.s == 8.0 and torch.allclose(head.margin, torch.full((3,), 0.2))
    assert "s=8" in repr(head) and "m=0.2" in repr(head)
    with pytest.raises(ValueError, match="arcface") as err:
        build_head("nosuchhead", 3, 2)
    assert all(n in str(err.value) for n in HEADS)
    with pytest.raises((TypeError, ValueError), match="scale") as err:
        build_head("arcface", 3, 2, scale=30.0)
    assert "s" in str(err.value) and "m" in str(err.value)
    with pytest.raises((TypeError, ValueError), match="normalize_weights"):
        build_head("sphereface", 3, 2, normalize_weights=False)
    with pytest.raises((TypeError, ValueError), match="m"):
        build_head("softmax", 3, 2, m=0.3)
    with pytest.raises(ValueError):
        build_head("cosface", 3, 2, s=0.0)
