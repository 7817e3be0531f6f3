"""Imbalance-aware classification losses on logits: class weights, margins, and the
Maximum-Margin (MM) loss.

Every loss module takes ``(logits [B, C], labels [B])`` and returns a scalar (or per-sample
losses with ``reduction="none"``), like ``torch.nn.CrossEntropyLoss``. The class-count
functions turn the number of training samples per class into the quantities the losses use.

Kang, "Learning Imbalanced Datasets with Maximum Margin Loss" (ICIP 2021,
slides); its equations are unnumbered in the slide text, so they are cited by name:
"MM Delta" (the Delta^+ / Delta^- definition, which Tables 2-3 call Eq. 2 and 3), "MM loss"
(the cross-entropy with the shifted target logit) and "Algorithm 1" (DRW). The baselines follow
their own papers: LDAM (Cao et al., NeurIPS 2019, Eq. 12-13), class-balanced loss (Cui et al.,
CVPR 2019, Eq. 3-5), focal loss (Lin et al., ICCV 2017, Eq. 5) and logit adjustment (Menon et
al., ICLR 2021, Eq. 10).

Class weights and reductions: ``reduction="mean"`` is (1/B) sum_i w_{y_i} l_i, the batch mean of
Algorithm 1 line 9 (and of the class-balanced loss), *not* torch's weighted mean
sum_i w_{y_i} l_i / sum_i w_{y_i}, which would cancel the normalisation of the weights to sum to C.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MM_TABLE_SETTINGS",
    "ClassBalancedLoss",
    "ClassWeightedLoss",
    "DeferredReweighting",
    "FocalLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "MaximumMarginLoss",
    "WeightedCrossEntropyLoss",
    "class_counts_tensor",
    "drw_weights",
    "ldam_margins",
    "logit_adjustment",
    "maximum_margin_delta",
]

CountsLike = Union[Sequence[float], Tensor]
Reduction = Literal["mean", "sum", "none"]
WeightKind = Literal["effective_number", "inverse_frequency"]

# Kang, Tables 2-3: the (beta, delta_minus) with the lowest top-1 error of each MM-DRW
# setting (dataset, imbalance type, imbalance ratio); these are the MM-DRW rows of Table 1.
MM_TABLE_SETTINGS: dict[tuple[str, str, int], dict[str, float]] = {
    ("cifar10", "long_tailed", 100): {"beta": 1.5, "delta_minus": 0.6},
    ("cifar10", "step", 100): {"beta": 1.3, "delta_minus": 0.6},
    ("cifar10", "long_tailed", 10): {"beta": 1.2, "delta_minus": 0.7},
    ("cifar10", "step", 10): {"beta": 1.0, "delta_minus": 2.1},
    ("cifar100", "long_tailed", 100): {"beta": 1.3, "delta_minus": 1.2},
    ("cifar100", "step", 100): {"beta": 1.8, "delta_minus": 1.8},
    ("cifar100", "long_tailed", 10): {"beta": 1.4, "delta_minus": 1.5},
    ("cifar100", "step", 10): {"beta": 1.1, "delta_minus": 2.4},
}


# --------------------------------------------------------------------------- class counts
def class_counts_tensor(class_counts: CountsLike, name: str = "class_counts") -> Tensor:
    """``class_counts`` as a float64 CPU vector [C], checked: 1-D, non-empty, finite, all > 0."""
    counts = torch.as_tensor(class_counts).detach()
    if counts.dtype == torch.bool or counts.is_complex():
        raise ValueError(f"{name} must be real-valued sample counts, got dtype {counts.dtype}")
    counts = counts.to(device="cpu", dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"{name} must be a non-empty vector [C] of per-class counts, got shape {list(counts.shape)}")
    if not torch.isfinite(counts).all():
        raise ValueError(f"{name} must be finite")
    empty = torch.nonzero(counts <= 0).flatten().tolist()
    if empty:
        shown = ", ".join(str(c) for c in empty[:10]) + (", ..." if len(empty) > 10 else "")
        raise ValueError(
            f"{name} must be > 0 for every class (a class without samples has no prior, margin or "
            f"weight); class(es) {shown} have {counts[empty[0]].item():g}"
        )
    return counts


def ldam_margins(class_counts: CountsLike, max_margin: float = 0.5) -> Tensor:
    """LDAM per-class margins (Cao et al. Eq. 13): m_j = K / n_j^(1/4), with K chosen so that
    the rarest class gets ``max_margin``, i.e. m_j = max_margin * (n_min / n_j)^(1/4).

    Returns float32 [C]. The margins are in the units of the logits they are subtracted from:
    cosines for LDAM's normalised classifier (which then scales by s = 30).
    """
    if not (math.isfinite(max_margin) and max_margin >= 0):
        raise ValueError(f"max_margin must be a finite number >= 0, got {max_margin!r}")
    counts = class_counts_tensor(class_counts)
    return (max_margin * (counts.min() / counts) ** 0.25).to(torch.float32)


def drw_weights(
    class_counts: CountsLike, kind: WeightKind = "effective_number", beta: float = 0.9999
) -> Tensor:
    """Per-class loss weights for deferred re-weighting (Kang Algorithm 1, line 9) and the
    class-balanced loss, normalised to sum to C (float32 [C]).

    ``kind="inverse_frequency"``: w_j proportional to 1 / n_j (Algorithm 1's n_y^-1).
    ``kind="effective_number"``: w_j proportional to (1 - beta) / (1 - beta^n_j) (Cui et al. Eq. 3-4;
    beta = 0.9999 as in LDAM-DRW). beta = 0 gives equal weights; beta -> 1 approaches 1 / n_j.
    """
    counts = class_counts_tensor(class_counts)
    if kind == "inverse_frequency":
        raw = 1.0 / counts
    elif kind == "effective_number":
        if not (math.isfinite(beta) and 0.0 <= beta < 1.0):
            raise ValueError(f"beta must be in [0, 1) for effective-number weights, got {beta!r}")
        if beta == 0.0:
            raw = torch.ones_like(counts)
        else:
            # 1 - beta^n as -expm1(n log beta): beta = 0.9999 and n = 1 leave 1e-4, which the
            # direct subtraction would compute with only ~12 correct digits.
            raw = (1.0 - beta) / -torch.expm1(counts * math.log(beta))
    else:
        raise ValueError(f"kind must be 'effective_number' or 'inverse_frequency', got {kind!r}")
    return (raw * (counts.numel() / raw.sum())).to(torch.float32)


def logit_adjustment(class_counts: CountsLike, tau: float = 1.0) -> Tensor:
    """tau * log(pi_j), pi_j = n_j / sum n (Menon et al. Eq. 10): the offsets the logit-adjusted
    loss adds to the logits during training (float32 [C])."""
    if not math.isfinite(tau):
        raise ValueError(f"tau must be finite, got {tau!r}")
    counts = class_counts_tensor(class_counts)
    return (tau * torch.log(counts / counts.sum())).to(torch.float32)


class DeferredReweighting:
    """DRW schedule (Kang Algorithm 1): equal class weights before ``start_epoch``, then
    :func:`drw_weights`. Epochs are 0-based: ``start_epoch=160`` re-weights epochs 160, 161, ...
    (LDAM-DRW's CIFAR schedule over 200 epochs).

    Use: ``loss.set_class_weights(drw.weights_for_epoch(epoch))`` at every epoch start (also after
    a resume: the loss modules do not save their class weights).
    """

    def __init__(
        self,
        class_counts: CountsLike,
        start_epoch: int,
        kind: WeightKind = "effective_number",
        beta: float = 0.9999,
    ) -> None:
        if int(start_epoch) != start_epoch or start_epoch < 0:
            raise ValueError(f"start_epoch must be an integer >= 0, got {start_epoch!r}")
        self.start_epoch = int(start_epoch)
        self.reweighted = drw_weights(class_counts, kind=kind, beta=beta)
        self.kind = kind
        self.beta = beta

    @property
    def num_classes(self) -> int:
        return int(self.reweighted.numel())

    def weights_for_epoch(self, epoch: int) -> Tensor:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch!r}")
        if epoch < self.start_epoch:
            return torch.ones(self.num_classes, dtype=torch.float32)
        return self.reweighted.clone()


# --------------------------------------------------------------------------- base
def _check_reduction(reduction: str) -> str:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction


def _check_logits_labels(logits: Tensor, labels: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [B, C], got {list(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must have shape [B] = [{logits.shape[0]}], got {list(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")


def _check_class_vector(values: Tensor, num_classes: int, what: str) -> None:
    if values.shape[0] != num_classes:
        raise ValueError(f"{what} has {values.shape[0]} classes but the logits have C = {num_classes}")


class ClassWeightedLoss(nn.Module):
    """Base of the losses here: optional per-class weights and the batch reduction.

    Args:
        weight: per-class weights [C] (e.g. :func:`drw_weights`), or None for unweighted.
            Replaceable during training with :meth:`set_class_weights` (DRW). The weights are a
            non-persistent buffer: they move with ``.to(device)`` but are not in the state_dict,
            because a DRW schedule recomputes them from the epoch.
        reduction: "mean" ((1/B) sum_i w_{y_i} l_i, see the module docstring), "sum" or "none".
    """

    def __init__(self, weight: CountsLike | None = None, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)
        self.register_buffer("class_weights", None, persistent=False)
        if weight is not None:
            self.set_class_weights(weight)

    def set_class_weights(self, weights: CountsLike | None) -> None:
        """Replace the per-class weights ([C], finite, >= 0); None removes them."""
        if weights is None:
            self.class_weights = None
            return
        t = torch.as_tensor(weights).detach()
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"class weights must be real-valued, got dtype {t.dtype}")
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"class weights must be a non-empty vector [C], got shape {list(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError("class weights must be finite")
        if (t < 0).any():
            raise ValueError(f"class weights must be >= 0, got min {t.min().item():g}")
        device = self.class_weights.device if self.class_weights is not None else t.device
        self.class_weights = t.to(device=device, dtype=torch.float32).clone()

    def _reduce(self, per_sample: Tensor, labels: Tensor, num_classes: int) -> Tensor:
        if self.class_weights is not None:
            _check_class_vector(self.class_weights, num_classes, "the class-weight vector")
            per_sample = per_sample * self.class_weights.to(per_sample.device)[labels]
        if self.reduction == "mean":
            return per_sample.mean()
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample

    def extra_repr(self) -> str:
        weighted = "none" if self.class_weights is None else f"per-class[{self.class_weights.numel()}]"
        return f"weight={weighted}, reduction={self.reduction}"


def _cross_entropy_per_sample(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels.long(), reduction="none")


# --------------------------------------------------------------------------- baselines
class WeightedCrossEntropyLoss(ClassWeightedLoss):
    """Softmax cross-entropy with optional per-class weights: the ERM baseline, and with
    :class:`DeferredReweighting` the plain "DRW" baseline."""

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        _check_logits_labels(logits, labels)
        logits = logits.float()
        return self._reduce(_cross_entropy_per_sample(logits, labels), labels, logits.shape[1])


class FocalLoss(ClassWeightedLoss):
    """Softmax focal loss (Lin et al. Eq. 5): l = -w_y (1 - p_y)^gamma log p_y.
    gamma = 0 is cross-entropy."""

    def __init__(self, gamma: float = 1.0, weight: CountsLike | None = None, reduction: Reduction = "mean") -> None:
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
        super().__init__(weight=weight, reduction=reduction)
        self.gamma = float(gamma)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        _check_logits_labels(logits, labels)
        logits = logits.float()
        log_p = -_cross_entropy_per_sample(logits, labels)
        per_sample = -log_p
        if self.gamma > 0:
            # 1 - p_y as -expm1(log p_y) keeps its digits when p_y is close to 1; the clamp keeps
            # the derivative of (1 - p)^gamma finite at p = 1 for gamma < 1 (it is 0 there).
            one_minus_p = (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny)
            per_sample = one_minus_p.pow(self.gamma) * per_sample
        return self._reduce(per_sample, labels, logits.shape[1])

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:g}, {super().extra_repr()}"


class ClassBalancedLoss(FocalLoss):
    """Class-balanced loss (Cui et al. Eq. 5 with softmax): cross-entropy (gamma = 0, "CB-RW")
    or focal loss (gamma > 0, "CB-Focal") weighted per class by the inverse effective number
    (1 - beta) / (1 - beta^n_y), normalised to sum to C."""

    def __init__(
        self,
        class_counts: CountsLike,
        beta: float = 0.9999,
        gamma: float = 0.0,
        reduction: Reduction = "mean",
    ) -> None:
        weights = drw_weights(class_counts, kind="effective_number", beta=beta)
        super().__init__(gamma=gamma, weight=weights, reduction=reduction)
        self.beta = float(beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}, {super().extra_repr()}"


class LogitAdjustedLoss(ClassWeightedLoss):
    """Logit-adjusted softmax cross-entropy (Menon et al. Eq. 10): CE(z + tau log pi, y) during
    training; prediction uses the unadjusted logits z. Uniform counts reduce it to CE."""

    def __init__(
        self,
        class_counts: CountsLike,
        tau: float = 1.0,
        weight: CountsLike | None = None,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(weight=weight, reduction=reduction)
        self.tau = float(tau)
        self.register_buffer("adjustment", logit_adjustment(class_counts, tau), persistent=False)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        _check_logits_labels(logits, labels)
        _check_class_vector(self.adjustment, logits.shape[1], "class_counts")
        logits = logits.float() + self.adjustment.to(logits.device)
        return self._reduce(_cross_entropy_per_sample(logits, labels), labels, logits.shape[1])

    def extra_repr(self) -> str:
        return f"tau={self.tau:g}, classes={self.adjustment.numel()}, {super().extra_repr()}"


def _shift_target(logits: Tensor, labels: Tensor, shift: Tensor) -> Tensor:
    """logits with shift[i] subtracted from each sample's target logit."""
    y = labels.long().unsqueeze(1)
    return logits.scatter(1, y, logits.gather(1, y) - shift.unsqueeze(1))


def _check_scale(scale: float | None) -> float | None:
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number or None, got {scale!r}")
    return None if scale is None else float(scale)


class LDAMLoss(ClassWeightedLoss):
    """LDAM (Cao et al. Eq. 12-13 as in their code): inputs are cosines [B, C] from a normalised
    classifier; loss = CE(s (cos - m_y 1[j = y]), y) with :func:`ldam_margins`. With
    :class:`DeferredReweighting` it is LDAM-DRW."""

    def __init__(
        self,
        class_counts: CountsLike,
        max_margin: float = 0.5,
        scale: float = 30.0,
        weight: CountsLike | None = None,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__(weight=weight, reduction=reduction)
        self.scale = _check_scale(scale)
        self.max_margin = float(max_margin)
        self.register_buffer("class_margins", ldam_margins(class_counts, max_margin), persistent=False)

    def forward(self, cosines: Tensor, labels: Tensor) -> Tensor:
        _check_logits_labels(cosines, labels)
        _check_class_vector(self.class_margins, cosines.shape[1], "class_counts")
        cosines = cosines.float()
        margins = self.class_margins.to(cosines.device)[labels]
        logits = self.scale * _shift_target(cosines, labels, margins)
        return self._reduce(_cross_entropy_per_sample(logits, labels), labels, cosines.shape[1])

    def extra_repr(self) -> str:
        return f"s={self.scale:g}, max_margin={self.max_margin:g}, {super().extra_repr()}"


# --------------------------------------------------------------------------- Maximum-Margin
def maximum_margin_delta(logits: Tensor, labels: Tensor, delta_minus: float, beta: float) -> Tensor:
    """Kang, MM Delta: the per-sample shift of the target logit, float [B].

    With the sample margin gamma = z_y - max_{j != y} z_j:
        correctly classified (gamma > 0):  Delta^+ = exp(-max(gamma, 0) - delta^+),
        otherwise (gamma <= 0):            Delta^- = exp(-max(-gamma, 0) - delta^-),
    delta^+ = beta * delta^-. A tie (gamma = 0) is not a correct classification, so it takes
    Delta^-. Computed from detached logits: Delta is a margin set by the current prediction,
    not a quantity the network learns through, so it carries no gradient.
    """
    _check_logits_labels(logits, labels)
    with torch.no_grad():
        z = logits.detach().float()
        y = labels.long().unsqueeze(1)
        target = z.gather(1, y).squeeze(1)
        best_other = z.scatter(1, y, -math.inf).max(dim=1).values
        gap = target - best_other
        correct = gap > 0
        delta_plus = beta * delta_minus
        hard_positive = torch.exp(-gap.clamp_min(0) - delta_plus)
        hard_negative = torch.exp(-(-gap).clamp_min(0) - delta_minus)
        return torch.where(correct, hard_positive, hard_negative)


class MaximumMarginLoss(ClassWeightedLoss):
    """Maximum-Margin loss (Kang, "MM loss"): softmax cross-entropy with the target logit
    replaced by z_y - Delta_y^MM (:func:`maximum_margin_delta`), optionally with LDAM margins
    (MM-LDAM) and DRW class weights (MM-DRW, MM-LDAM-DRW via :meth:`set_class_weights`).

    Inputs: with ``scale=None`` the model's logits z [B, C] (a linear head); with ``scale=s``
    cosines from a normalised head, and z = s cos as in LDAM. ``class_margins`` [C] (e.g.
    :func:`ldam_margins`) are in input units: with them the target logit is s (x_y - m_y) - Delta.
    Delta is computed from the detached z *without* the LDAM margin: "argmax_j f_j(x) = y" in the
    definition refers to the model's prediction, which carries no training margin.

    Defaults: beta = 1.5, delta_minus = 0.6 (Kang Table 2, CIFAR-10 long-tailed ratio 100);
    :data:`MM_TABLE_SETTINGS` holds the best pair of every setting of Tables 2-3. A very large
    delta_minus makes Delta = 0, i.e. plain (LDAM) cross-entropy.
    """

    def __init__(
        self,
        delta_minus: float = 0.6,
        beta: float = 1.5,
        class_margins: CountsLike | None = None,
        scale: float | None = None,
        weight: CountsLike | None = None,
        reduction: Reduction = "mean",
    ) -> None:
        if not (math.isfinite(delta_minus) and delta_minus >= 0):
            raise ValueError(f"delta_minus must be a finite number >= 0, got {delta_minus!r}")
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta (delta_plus = beta * delta_minus) must be a finite number >= 0, got {beta!r}")
        super().__init__(weight=weight, reduction=reduction)
        self.delta_minus = float(delta_minus)
        self.beta = float(beta)
        self.scale = _check_scale(scale)
        margins = None
        if class_margins is not None:
            margins = torch.as_tensor(class_margins).detach()
            if margins.dim() != 1 or margins.numel() == 0 or margins.dtype == torch.bool or margins.is_complex():
                raise ValueError(f"class_margins must be a real vector [C], got shape {list(margins.shape)}")
            margins = margins.to(device="cpu", dtype=torch.float32)
            if not torch.isfinite(margins).all():
                raise ValueError("class_margins must be finite")
        self.register_buffer("class_margins", margins, persistent=False)

    @property
    def delta_plus(self) -> float:
        return self.beta * self.delta_minus

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        _check_logits_labels(logits, labels)
        inputs = logits.float()
        scale = 1.0 if self.scale is None else self.scale
        z = scale * inputs
        delta = maximum_margin_delta(z, labels, self.delta_minus, self.beta)
        if self.class_margins is not None:
            _check_class_vector(self.class_margins, inputs.shape[1], "class_margins")
            delta = delta + scale * self.class_margins.to(z.device)[labels]
        per_sample = _cross_entropy_per_sample(_shift_target(z, labels, delta), labels)
        return self._reduce(per_sample, labels, inputs.shape[1])

    def extra_repr(self) -> str:
        parts = [f"delta_minus={self.delta_minus:g}", f"beta={self.beta:g}"]
        if self.scale is not None:
            parts.append(f"s={self.scale:g}")
        if self.class_margins is not None:
            parts.append(f"class_margins=per-class[{self.class_margins.numel()}]")
        return ", ".join(parts + [super().extra_repr()])
