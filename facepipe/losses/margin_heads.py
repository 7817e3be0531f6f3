"""Classifier heads with per-class margins for face-embedding training.

Every head owns (or shares) a classifier weight ``W`` of shape ``[C, D]`` and a float32
buffer ``margin`` of shape ``[C]``; the margin of a sample is the margin of its own class,
which is what class-level, imbalance-aware margins need (rare identities get larger margins).

``forward(embeddings, labels)`` returns *training* logits ``[B, C]`` with the margin applied
to each sample's target class and the scale included; the caller applies
``F.cross_entropy``. ``inference_logits(embeddings)`` returns the same logits without any
margin, for prediction and accuracy.

Equation numbers "Khan et al. Eq. N" refer to the uncertainty-based max-margin paper this package
implements (Khan et al., "Striking the Right Balance with Uncertainty", CVPR 2019).
"""
from __future__ import annotations

import abc
import inspect
import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facepipe.runtime.device import float32_region

__all__ = [
    "MarginHead",
    "SoftmaxHead",
    "CosFaceHead",
    "ArcFaceHead",
    "LSoftmaxHead",
    "SphereFaceHead",
    "PrototypeHead",
    "HEADS",
    "UnknownParameterError",
    "build_head",
    "head_params",
    "psi",
]

MarginLike = Union[float, int, Sequence[float], Tensor, None]

# Keeps acos/sqrt away from +-1, where their derivatives are infinite. Float32 resolves
# 1 - 1e-7 as 1 - 2**-23, so this is the smallest useful clamp for float32 arithmetic.
_COS_EPS = 1e-7
# Guards divisions by a vector norm (zero embeddings, zero weight rows).
_NORM_EPS = 1e-12


class UnknownParameterError(TypeError, ValueError):
    """A head was given a keyword it does not take (both a TypeError and a ValueError, so
    config validation code catching either sees it)."""


class MarginHead(nn.Module, metaclass=abc.ABCMeta):
    """Base: classifier weight W [C, D] + per-class margins.

    Subclasses implement :meth:`forward` (training logits, margin on the target class) and
    :meth:`inference_logits` (no margin). Both compute in float32, also under autocast.

    Args:
        num_classes: C.
        embedding_size: D.
        margin: scalar (broadcast to all classes) or per-class vector of shape [C];
            ``None`` leaves all margins at zero.
        weight: an existing ``nn.Parameter`` of shape [C, D] to *share* (the same object
            is registered, so switching heads mid-training keeps the classifier weights and
            their optimizer state). Otherwise a new one is initialised from N(0, 0.01).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: MarginLike = None,
        weight: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if int(embedding_size) != embedding_size or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive integer, got {embedding_size!r}")
        self.num_classes = int(num_classes)
        self.embedding_size = int(embedding_size)
        if weight is None:
            weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_size).normal_(0.0, 0.01))
        else:
            if not isinstance(weight, nn.Parameter):
                raise TypeError(
                    f"weight must be an nn.Parameter to be shared, got {type(weight).__name__}"
                )
            if tuple(weight.shape) != (self.num_classes, self.embedding_size):
                raise ValueError(
                    f"shared weight has shape {list(weight.shape)}, expected "
                    f"[C, D] = [{self.num_classes}, {self.embedding_size}]"
                )
        self.weight = weight
        # Created next to the weight so a head built around an already-moved shared
        # Parameter is usable without another .to(device).
        self.register_buffer(
            "margin", torch.zeros(self.num_classes, dtype=torch.float32, device=weight.device)
        )
        if margin is not None:
            self.set_margins(margin)

    # ------------------------------------------------------------------ margins
    def set_margins(self, margin: MarginLike) -> None:
        """Set the margins: a scalar (broadcast to [C]) or a vector of shape [C]."""
        if margin is None:
            raise ValueError(f"margin must be a scalar or have shape [C] = [{self.num_classes}], got None")
        t = torch.as_tensor(margin).detach()
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"margin must be real-valued, got dtype {t.dtype}")
        t = t.to(device="cpu", dtype=torch.float64)
        if t.dim() == 0:
            t = t.expand(self.num_classes)
        elif tuple(t.shape) != (self.num_classes,):
            raise ValueError(
                f"margin must be a scalar or have shape [C] = [{self.num_classes}], "
                f"got shape {list(t.shape)}"
            )
        if not torch.isfinite(t).all():
            raise ValueError("margin values must be finite")
        if (t < 0).any():
            raise ValueError(f"margin values must be >= 0, got min {t.min().item():g}")
        self._check_margin_values(t)
        with torch.no_grad():
            self.margin.copy_(t.to(dtype=torch.float32))
        self._on_margins_changed()

    def _check_margin_values(self, margin: Tensor) -> None:
        """Hook for head-specific constraints; ``margin`` is float64 [C], finite, >= 0."""

    def _on_margins_changed(self) -> None:
        """Hook run after the margin buffer changed (set_margins or load_state_dict)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._on_margins_changed()

    # ------------------------------------------------------------------ forward
    def _inputs(self, embeddings: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must have shape [B, D] = [B, {self.embedding_size}], "
                f"got {list(embeddings.shape)}"
            )
        if labels is not None:
            if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
                raise ValueError(
                    f"labels must have shape [B] = [{embeddings.shape[0]}], got {list(labels.shape)}"
                )
            if labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        return embeddings.float(), self.weight.float()

    @abc.abstractmethod
    def forward(self, embeddings: Tensor, labels: Tensor, margin_weight: Tensor | None = None) -> Tensor:
        """Training logits; ``margin_weight`` [B] in [0, 1] gives each sample that fraction of its
        class margin (Khan et al. SUM: the probability it is misclassified); None = the full margin."""

    @abc.abstractmethod
    def inference_logits(self, embeddings: Tensor) -> Tensor:
        """Logits without any margin (prediction, accuracy, uncertainty)."""

    def _sample_margins(self, labels: Tensor, margin_weight: Tensor | None) -> Tensor:
        m = self.margin[labels]
        return m if margin_weight is None else m * margin_weight.to(m.dtype)

    def step(self) -> None:
        """Called once per optimisation step (schedules such as lambda annealing)."""

    def _margin_repr(self) -> str:
        m = self.margin
        if m.numel() == 0:
            return "m=[]"
        lo, hi = m.min().item(), m.max().item()
        if lo == hi:
            return f"m={lo:g}"
        return f"m=per-class[{lo:g}..{hi:g}]"

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, {self._margin_repr()}"


class SoftmaxHead(MarginHead):
    """Plain softmax classifier: logits = f W^T, no bias (Khan et al. Eq. 8). No margin."""

    def __init__(self, num_classes: int, embedding_size: int, weight: nn.Parameter | None = None) -> None:
        super().__init__(num_classes, embedding_size, margin=None, weight=weight)

    def set_margins(self, margin: MarginLike) -> None:
        raise ValueError("softmax has no margin")

    def forward(self, embeddings: Tensor, labels: Tensor, margin_weight: Tensor | None = None) -> Tensor:
        # labels (and margin weights) are accepted for interface symmetry; there is no margin.
        with float32_region(embeddings.device.type):
            f, w = self._inputs(embeddings, labels)
            return f @ w.t()

    def inference_logits(self, embeddings: Tensor) -> Tensor:
        with float32_region(embeddings.device.type):
            f, w = self._inputs(embeddings)
            return f @ w.t()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}"


class PrototypeHead(MarginHead):
    """Convolutional prototype learning (Yang et al. 2018, Li et al. ref. [40]): the rows of W are
    class centres C_j and the logits are -||f - C_j||^2, so cross-entropy on them is CPL's
    distance-based loss and the prediction is the nearest centre. Li et al. train every method
    in this framework ("all methods are set under the same CPL framework"). No margin."""

    def __init__(self, num_classes: int, embedding_size: int, weight: nn.Parameter | None = None) -> None:
        super().__init__(num_classes, embedding_size, margin=None, weight=weight)

    def set_margins(self, margin: MarginLike) -> None:
        raise ValueError("the prototype head has no margin")

    def _negative_squared_distances(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        f, w = self._inputs(embeddings, labels)
        # Expanded form: no [B, C, D] intermediate; clamped because rounding can go below zero.
        squared = (f * f).sum(1, keepdim=True) + (w * w).sum(1).unsqueeze(0) - 2.0 * (f @ w.t())
        return -squared.clamp_min(0.0)

    def forward(self, embeddings: Tensor, labels: Tensor, margin_weight: Tensor | None = None) -> Tensor:
        with float32_region(embeddings.device.type):
            return self._negative_squared_distances(embeddings, labels)

    def inference_logits(self, embeddings: Tensor) -> Tensor:
        with float32_region(embeddings.device.type):
            return self._negative_squared_distances(embeddings)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}"


class _NormalizedHead(MarginHead):
    """Shared part of the cosine heads: logits on the hypersphere, scaled by s."""

    def __init__(
        self, num_classes: int, embedding_size: int, s: float, m: MarginLike, weight: nn.Parameter | None
    ) -> None:
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"scale s must be a finite positive number, got {s!r}")
        super().__init__(num_classes, embedding_size, margin=m, weight=weight)
        self.s = float(s)

    def _cosine(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        f, w = self._inputs(embeddings, labels)
        return F.normalize(f, dim=1, eps=_NORM_EPS) @ F.normalize(w, dim=1, eps=_NORM_EPS).t()

    def inference_logits(self, embeddings: Tensor) -> Tensor:
        """s cos(theta_j): the training logits with every margin set to zero."""
        with float32_region(embeddings.device.type):
            return self.s * self._cosine(embeddings)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"s={self.s:g}, {self._margin_repr()}"
        )


class CosFaceHead(_NormalizedHead):
    """CosFace / LMCL (additive cosine margin).

    logits_j = s (cos theta_j - m_y [j == y]), with cos theta_j = <f/||f||, w_j/||w_j||>
    and m_y the margin of the sample's own class.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        s: float = 64.0,
        m: MarginLike = 0.35,
        weight: nn.Parameter | None = None,
    ) -> None:
        super().__init__(num_classes, embedding_size, s=s, m=m, weight=weight)

    def forward(self, embeddings: Tensor, labels: Tensor, margin_weight: Tensor | None = None) -> Tensor:
        with float32_region(embeddings.device.type):
            cos = self._cosine(embeddings, labels)
            y = labels.long().unsqueeze(1)
            target = cos.gather(1, y) - self._sample_margins(labels, margin_weight).unsqueeze(1)
            return self.s * cos.scatter(1, y, target)


class ArcFaceHead(_NormalizedHead):
    """ArcFace (additive angular margin).

    Target logit s cos(theta_y + m_y); non-target logits s cos theta_j. When
    theta_y + m_y > pi, i.e. cos theta_y <= cos(pi - m_y), cos(theta_y + m_y) would start
    increasing again, so the target logit falls back to s (cos theta_y - m_y sin m_y)
    (insightface: th = cos(pi - m), mm = sin(pi - m) m), which keeps it monotonically
    decreasing in theta_y.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        s: float = 64.0,
        m: MarginLike = 0.5,
        weight: nn.Parameter | None = None,
    ) -> None:
        super().__init__(num_classes, embedding_size, s=s, m=m, weight=weight)

    def forward(self, embeddings: Tensor, labels: Tensor, margin_weight: Tensor | None = None) -> Tensor:
        with float32_region(embeddings.device.type):
            cos = self._cosine(embeddings, labels)
            y = labels.long().unsqueeze(1)
            m = self._sample_margins(labels, margin_weight)
            # Without the clamp, sqrt(1 - cos^2) has an infinite derivative at theta = 0, pi.
            cos_y = cos.gather(1, y).squeeze(1).clamp(-1.0 + _COS_EPS, 1.0 - _COS_EPS)
            sin_y = torch.sqrt(1.0 - cos_y * cos_y)
            cos_m, sin_m = torch.cos(m), torch.sin(m)
            th = torch.cos(math.pi - m)
            mm = torch.sin(math.pi - m) * m
            target = torch.where(cos_y > th, cos_y * cos_m - sin_y * sin_m, cos_y - mm)
            return self.s * cos.scatter(1, y, target.unsqueeze(1))


# --------------------------------------------------------------------------- L-Softmax
def _chebyshev(x: Tensor, m: Tensor, max_m: int) -> Tensor:
    """T_m(x) elementwise, for integer m (broadcast with x) in [0, max_m].

    Uses T_0 = 1, T_1 = x, T_{k+1} = 2 x T_k - T_{k-1}, so T_m(cos theta) = cos(m theta) is a
    polynomial in cos theta and thus in w^T f: its gradient stays finite at theta = 0, pi,
    unlike cos(m acos(x)).
    """
    terms = [torch.ones_like(x), x]
    for _ in range(2, max_m + 1):
        terms.append(2.0 * x * terms[-1] - terms[-2])
    stacked = torch.stack(terms[: max(max_m, 0) + 1], dim=-1)
    index = m.expand(x.shape).unsqueeze(-1)
    return stacked.gather(-1, index).squeeze(-1)


def _psi_from_cos(cos: Tensor, theta: Tensor, m: Tensor, max_m: int) -> Tensor:
    # r only selects the branch; it is piecewise constant, so it carries no gradient.
    with torch.no_grad():
        r = torch.floor(theta * m / math.pi)
        r = torch.minimum(r.clamp_min(0), (m - 1).to(r.dtype))
        sign = 1.0 - 2.0 * torch.remainder(r, 2)
    return sign * _chebyshev(cos, m, max_m) - 2.0 * r


def _as_integer_margin(m: Tensor | int | float, device: torch.device | None = None) -> Tensor:
    t = torch.as_tensor(m, device=device)
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"m must be a positive integer, got dtype {t.dtype}")
    if t.is_floating_point():
        if not torch.isfinite(t).all() or (t != torch.round(t)).any():
            raise ValueError("m must be a positive integer (or a tensor of positive integers)")
    if (t < 1).any():
        raise ValueError("m must be >= 1")
    return t.to(torch.long)


def psi(theta: Tensor, m: Tensor | int) -> Tensor:
    """Angular margin function of L-Softmax / SphereFace (Khan et al. Eq. 10).

    psi(theta) = (-1)^r cos(m theta) - 2r  for theta in [r pi/m, (r+1) pi/m],
    r in {0, ..., m-1}; continuous and monotonically decreasing on [0, pi], with
    psi(0) = 1, psi(pi) = -(2m - 1) and psi = cos for m = 1. cos(m theta) is evaluated as
    the Chebyshev polynomial T_m(cos theta).

    Args:
        theta: angles in [0, pi] (any shape, floating point; gradients flow through it).
        m: positive integer, or an integer-valued tensor broadcastable with ``theta``.
    """
    theta = torch.as_tensor(theta)
    if not theta.is_floating_point():
        theta = theta.to(torch.get_default_dtype())
    m_t = _as_integer_margin(m, device=theta.device)
    max_m = int(m_t.max().item()) if m_t.numel() else 1
    theta_b, m_b = torch.broadcast_tensors(theta, m_t)
    return _psi_from_cos(torch.cos(theta_b), theta_b.detach(), m_b, max_m)


class LSoftmaxHead(MarginHead):
    """L-Softmax (large-margin softmax) with per-class integer margins; SphereFace when
    ``normalize_weights=True`` (A-Softmax: ||w_j|| = 1).

    Target logit (Khan et al. Eq. 10 with the L-Softmax / SphereFace annealing):
        (lambda ||w_y|| ||f|| cos theta_y + ||w_y|| ||f|| psi(theta_y)) / (1 + lambda),
        lambda = max(lambda_min, lambda_base (1 + lambda_gamma it)^(-lambda_power)),
    non-target logits ||w_j|| ||f|| cos theta_j. ``it`` is a buffer (saved in the
    state_dict, so resumed training continues the schedule) advanced by :meth:`step`.
    Early in training lambda is large and the head behaves like plain softmax; the margin
    is phased in as lambda decays to lambda_min.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        m: MarginLike = 4,
        normalize_weights: bool = False,
        lambda_base: float = 1000.0,
        lambda_gamma: float = 0.12,
        lambda_power: float = 1.0,
        lambda_min: float = 5.0,
        weight: nn.Parameter | None = None,
    ) -> None:
        for name, value in (
            ("lambda_base", lambda_base),
            ("lambda_gamma", lambda_gamma),
            ("lambda_power", lambda_power),
            ("lambda_min", lambda_min),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if m is None:
            # The base class would leave margins at 0, which is no valid multiplicative margin.
            raise ValueError("L-Softmax/SphereFace needs integer margins m >= 1, got None")
        self._max_margin = 1
        super().__init__(num_classes, embedding_size, margin=m, weight=weight)
        self.normalize_weights = bool(normalize_weights)
        self.lambda_base = float(lambda_base)
        self.lambda_gamma = float(lambda_gamma)
        self.lambda_power = float(lambda_power)
        self.lambda_min = float(lambda_min)
        self.register_buffer("it", torch.zeros((), dtype=torch.long, device=self.weight.device))

    def _check_margin_values(self, margin: Tensor) -> None:
        if (margin != torch.round(margin)).any():
            raise ValueError("L-Softmax/SphereFace margins must be integers (shape [C] or scalar)")
        if (margin < 1).any():
            raise ValueError(f"L-Softmax/SphereFace margins must be >= 1, got min {margin.min().item():g}")

    def _on_margins_changed(self) -> None:
        # Cached as a Python int so forward needs no device sync to size the Chebyshev loop.
        self._max_margin = max(1, int(self.margin.max().item())) if self.margin.numel() else 1

    def step(self) -> None:
        with torch.no_grad():
            self.it += 1

    def _lambda(self) -> Tensor:
        it = self.it.to(torch.float64)
        lam = self.lambda_base * torch.pow(1.0 + self.lambda_gamma * it, -self.lambda_power)
        return lam.clamp_min(self.lambda_min).to(torch.float32)

    @property
    def current_lambda(self) -> float:
        """lambda at the current iteration (a Python float; syncs the device)."""
        return float(self._lambda().item())

    def _weight(self, w: Tensor) -> Tensor:
        return F.normalize(w, dim=1, eps=_NORM_EPS) if self.normalize_weights else w

    def forward(self, embeddings: Tensor, labels: Tensor, margin_weight: Tensor | None = None) -> Tensor:
        """With ``margin_weight`` F, the target uses psi_F = cos - F (cos - psi_m): our reading of
        Khan et al. Eq. 15, whose printed form would pull a confident correct sample's target logit
        to zero, against the paper's statement that zero uncertainty with m = 1 is plain softmax.
        F = 0 gives softmax, F = 1 the full class margin."""
        with float32_region(embeddings.device.type):
            f, w = self._inputs(embeddings, labels)
            w = self._weight(w)
            logits = f @ w.t()
            y = labels.long().unsqueeze(1)
            wf = logits.gather(1, y).squeeze(1)  # ||w_y|| ||f|| cos theta_y
            norms = f.norm(dim=1) * w.norm(dim=1)[labels]
            cos_y = wf / norms.clamp_min(_NORM_EPS)
            with torch.no_grad():
                theta = torch.acos(cos_y.clamp(-1.0, 1.0))
            m = self.margin[labels].long()
            psi_y = _psi_from_cos(cos_y, theta, m, self._max_margin)
            if margin_weight is not None:
                psi_y = cos_y - margin_weight.to(cos_y.dtype) * (cos_y - psi_y)
            lam = self._lambda()
            target = (lam * wf + norms * psi_y) / (1.0 + lam)
            return logits.scatter(1, y, target.unsqueeze(1))

    def inference_logits(self, embeddings: Tensor) -> Tensor:
        """||w_j|| ||f|| cos theta_j (w normalised for SphereFace), no margin."""
        with float32_region(embeddings.device.type):
            f, w = self._inputs(embeddings)
            return f @ self._weight(w).t()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"{self._margin_repr()}, normalize_weights={self.normalize_weights}, "
            f"lambda_base={self.lambda_base:g}, lambda_gamma={self.lambda_gamma:g}, "
            f"lambda_power={self.lambda_power:g}, lambda_min={self.lambda_min:g}"
        )


class SphereFaceHead(LSoftmaxHead):
    """SphereFace / A-Softmax: :class:`LSoftmaxHead` with unit-norm class weights."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        m: MarginLike = 4,
        lambda_base: float = 1000.0,
        lambda_gamma: float = 0.12,
        lambda_power: float = 1.0,
        lambda_min: float = 5.0,
        weight: nn.Parameter | None = None,
    ) -> None:
        super().__init__(
            num_classes,
            embedding_size,
            m=m,
            normalize_weights=True,
            lambda_base=lambda_base,
            lambda_gamma=lambda_gamma,
            lambda_power=lambda_power,
            lambda_min=lambda_min,
            weight=weight,
        )


HEADS: dict[str, type] = {
    "softmax": SoftmaxHead,
    "cosface": CosFaceHead,
    "arcface": ArcFaceHead,
    "lsoftmax": LSoftmaxHead,
    "sphereface": SphereFaceHead,
    "prototype": PrototypeHead,
}

_FIXED_ARGS = ("self", "num_classes", "embedding_size", "weight")


def head_params(name: str) -> dict[str, object]:
    """The tunable keyword parameters of a registered head and their defaults."""
    cls = _lookup(name)
    return {
        p.name: p.default
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name not in _FIXED_ARGS
    }


def _lookup(name: str) -> type:
    key = str(name).strip().lower()
    if key not in HEADS:
        raise ValueError(f"unknown head {name!r}; valid names: {', '.join(sorted(HEADS))}")
    return HEADS[key]


def build_head(
    name: str,
    num_classes: int,
    embedding_size: int,
    weight: nn.Parameter | None = None,
    **params,
) -> MarginHead:
    """Build a registered head by name ("softmax", "cosface", "arcface", "lsoftmax",
    "sphereface"). ``weight`` shares an existing classifier Parameter (head switching);
    ``params`` are the head's own keywords, e.g. ``s``/``m`` or the lambda schedule."""
    cls = _lookup(name)
    valid = head_params(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise UnknownParameterError(
            f"head {name!r} got unknown parameter(s) {', '.join(unknown)}; "
            f"valid parameters: {', '.join(valid) if valid else '(none)'}"
        )
    return cls(num_classes, embedding_size, weight=weight, **params)
