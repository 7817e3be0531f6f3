"""Uncertainty-based max-margin softmax (Khan et al., CVPR 2019), the math.

- MC-dropout uncertainty (Sec. 3, Eq. 6-7): the output stage runs N times with fresh dropout
  masks on *one* backbone pass; a sample's uncertainty is the trace of the covariance of its N
  softmax vectors; a class's uncertainty the mean over its samples.
- UMM (Sec. 4): class margins that grow with class uncertainty (two maps from uncertainty to
  margin: by uncertainty rank, the default, or scaled by the largest uncertainty).
- SUM (Sec. 5, Eq. 11-15): each sample's probability of being misclassified under its Gaussian
  embedding, used to weight how much of its class margin it gets.

The trainer's UMM and SUM plug-ins (``facepipe.train.plugins.umm``, with
``facepipe.train.uncertainty_margins``) decide when these run; everything here is a pure
function of tensors.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Keeps sigma_E > 0 when the MC embeddings do not vary (dropout p = 0): F becomes a step.
SUM_VARIANCE_EPS = 1e-12


@contextlib.contextmanager
def mc_dropout_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Everything in eval mode (BatchNorm uses, and does not update, its running statistics)
    except the dropout layers, which keep sampling masks; the previous modes come back after."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.train()
    try:
        yield module
    finally:
        for m, training in modes.items():
            m.train(training)


@torch.no_grad()
def mc_embeddings(output_stage: nn.Module, feature_maps: Tensor, passes: int) -> Tensor:
    """[N, B, D] embeddings of N dropout passes of ``output_stage`` over the same feature maps
    (Khan et al. Eq. 6: samples of the approximate posterior). The passes run as one batch of N x B."""
    if passes < 2:
        raise ValueError(f"MC dropout needs at least 2 passes to estimate a variance, got {passes}")
    batch = feature_maps.shape[0]
    with mc_dropout_mode(output_stage):
        stacked = output_stage(feature_maps.repeat(passes, *([1] * (feature_maps.dim() - 1))))
    return stacked.view(passes, batch, -1).float()


def predictive_uncertainty(probabilities: Tensor) -> Tensor:
    """Total predictive variance of each sample, [B], from N softmax vectors [N, B, C].

    Khan et al. Eq. 7: Cov = 1/N sum_n p_n p_n^T - p_bar p_bar^T; its trace is
    sum_c (mean_n p_nc^2 - p_bar_c^2), computed without forming the C x C matrix. The moments are
    taken of the differences to the first pass (the variance does not change under a shift), in
    float64: identical passes (no dropout) then give exactly zero, not rounding residue.
    """
    shifted = probabilities.double() - probabilities[:1].double()
    mean = shifted.mean(dim=0)
    return ((shifted * shifted).mean(dim=0) - mean * mean).sum(dim=1).clamp_min(0.0).to(probabilities.dtype)


def class_uncertainty(sample_uncertainty: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Mean uncertainty of each class's samples, [C]; a class without samples gets the mean of
    the classes that have some (it cannot be ranked, so it is treated as typical)."""
    sums = torch.zeros(num_classes, dtype=torch.float64, device=sample_uncertainty.device)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=sample_uncertainty.device)
    sums.index_add_(0, labels, sample_uncertainty.double())
    counts.index_add_(0, labels, torch.ones_like(sample_uncertainty, dtype=torch.float64))
    seen = counts > 0
    if not seen.any():
        raise ValueError("no samples: class uncertainty needs at least one labelled sample")
    means = torch.where(seen, sums / counts.clamp_min(1), torch.zeros_like(sums))
    means[~seen] = means[seen].mean()
    return means.float()


MarginMap = Literal["rank", "max_scaled"]
MARGIN_MAPS: tuple[str, ...] = get_args(MarginMap)


def uncertainty_rank(class_uncertainty: Tensor) -> Tensor:
    """Rank of each class's uncertainty among the C classes, [C] long in 0..C-1: the number of
    classes strictly less uncertain. Tied classes share the lowest rank of their group, so equal
    uncertainties never spread over margin levels (all-equal values are all rank 0: plain
    softmax); a class moves up only by being measurably more uncertain than others."""
    u = class_uncertainty.detach().double().flatten().clamp_min(0.0)
    ordered = torch.sort(u).values
    return torch.searchsorted(ordered, u, right=False)


def _check_margin_map(margin_map: str) -> None:
    if margin_map not in MARGIN_MAPS:
        raise ValueError(f"unknown margin_map {margin_map!r}; choose one of {list(MARGIN_MAPS)}")


def umm_integer_margins(class_uncertainty: Tensor, max_margin: int = 3, margin_map: MarginMap = "rank") -> Tensor:
    """Per-class integer L-Softmax margins from class uncertainty (UMM, Khan et al., CVPR 2019,
    Sec. 4; Sec. 6.1.1 fixes m_max = 3).

    The paper sets m = max(1, floor(0.5 u_y)) but leaves the scale of u open, and any fixed scale
    lets the uncertainty distribution of the run decide the margins. Two readings:

    - ``"rank"`` (default): r_c = rank_c / C in [0, 1), the class's uncertainty percentile
      (:func:`uncertainty_rank`, ties share the lowest rank), and m_c = 1 + floor(m_max r_c), so
      levels 1..m_max each hold about C / m_max classes and the margin still grows with the
      uncertainty. Dividing by the largest uncertainty instead let one outlier class set the
      scale: on LFW 1,238-1,260 of 1,262 classes got m = 1 at every refresh, i.e. plain softmax.
    - ``"max_scaled"``: u~_c = 2 m_max u_c / max_k u_k and m_c = max(1, floor(0.5 u~_c)); the most
      uncertain class gets exactly m_max. Kept to reproduce earlier runs.

    All-zero or constant uncertainty (no dropout) gives m = 1 everywhere under both maps: equal
    uncertainties must not be told apart by margins.
    """
    if max_margin < 1:
        raise ValueError(f"max_margin must be >= 1, got {max_margin}")
    _check_margin_map(margin_map)
    u = class_uncertainty.double().clamp_min(0.0)
    if margin_map == "rank":
        # Integer arithmetic: floor(m_max * rank / C) without a float landing just below a level.
        levels = (max_margin * uncertainty_rank(u)) // max(u.numel(), 1)
        return (1 + levels).clamp(min=1, max=max_margin).long()
    top = u.max()
    # Constant uncertainty ranks no class above another; the first version of this map gave
    # every class m_max when the constant was above zero.
    if top <= 0 or bool((u == top).all()):
        return torch.ones_like(u, dtype=torch.long)
    scaled = 2.0 * max_margin * u / top
    # The top class lands on exactly m_max; guard against 0.5 * 2 m_max rounding below it.
    margins = torch.floor(0.5 * scaled + 1e-9).clamp(min=1, max=max_margin)
    return margins.long()


def uncertainty_additive_margins(class_uncertainty: Tensor, margin: float, margin_map: MarginMap = "rank") -> Tensor:
    """Per-class additive margins for CosFace / ArcFace ("with Uncer.", Khan et al., CVPR 2019,
    Table 7), which the paper does not spell out; in both readings the most uncertain class gets
    the full ``margin``:

    - ``"rank"`` (default): m_c = m rank_c / (C - 1) (:func:`uncertainty_rank`, ties share the
      lowest rank), margins spread evenly over [0, m] by uncertainty percentile, so one outlier
      class cannot push every other margin towards 0. C - 1 rather than C so that the most
      uncertain class gets the full m, and the least uncertain none (as its plain-softmax level 1
      in :func:`umm_integer_margins`).
    - ``"max_scaled"``: m_c = m u_c / max_k u_k, the first reading, kept to reproduce runs.

    All zeros when the uncertainty is all zero or constant, under both maps.
    """
    _check_margin_map(margin_map)
    u = class_uncertainty.float().clamp_min(0.0)
    if margin_map == "rank":
        if u.numel() < 2:
            return torch.zeros_like(u)
        return (margin * uncertainty_rank(u).double() / (u.numel() - 1)).to(u.dtype)
    top = u.max()
    if top <= 0 or bool((u == top).all()):
        return torch.zeros_like(u)
    return margin * u / top


def misclassification_probability(weight: Tensor, mean: Tensor, variance: Tensor, labels: Tensor) -> Tensor:
    """Probability F that a sample with Gaussian embedding N(mean, diag(variance)) scores its most
    competitive other class above its own class (Khan et al. Eq. 11-14), [B], without gradient.

    j* = argmax_{j != y} w_j^T mu_f; E = (w_j* - w_y)^T f is Gaussian with mean
    mu_E = (w_j* - w_y)^T mu_f and variance sigma_E^2 = sum_k (w_j* - w_y)_k^2 Sigma_f,k (diagonal
    Sigma_f, so it scales to 512-d); F = P(E > 0) = 0.5 (1 + erf(mu_E / sqrt(2 sigma_E^2))).
    """
    with torch.no_grad():
        weight, mean, variance = weight.float(), mean.float(), variance.float()
        scores = mean @ weight.t()
        own = labels.long().unsqueeze(1)
        rivals = scores.scatter(1, own, float("-inf"))
        competitor = rivals.argmax(dim=1)
        direction = weight[competitor] - weight[labels]
        mu_e = (direction * mean).sum(dim=1)
        sigma2_e = (direction * direction * variance).sum(dim=1) + SUM_VARIANCE_EPS
        return 0.5 * (1.0 + torch.erf(mu_e / torch.sqrt(2.0 * sigma2_e)))


def sum_margin_weights(output_stage: nn.Module, feature_maps: Tensor, weight: Tensor, labels: Tensor,
                       passes: int, normalise: bool) -> Tensor:
    """SUM per-sample weights F [B] for one training batch: N dropout passes of the output stage
    on the batch's feature maps (the backbone is not run again), their mean and diagonal variance,
    then Eq. 14. ``normalise``: cosine heads compare normalised embeddings and class weights."""
    samples = mc_embeddings(output_stage, feature_maps.detach(), passes)
    if normalise:
        samples = F.normalize(samples, dim=2)
        weight = F.normalize(weight.detach().float(), dim=1)
    return misclassification_probability(weight, samples.mean(dim=0), samples.var(dim=0, unbiased=False), labels)
