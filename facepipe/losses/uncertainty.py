"""Uncertainty-based max-margin softmax (seed 000, Khan et al., CVPR 2019), the math.

- MC-dropout uncertainty (Sec. 3, Eq. 6-7): the output stage runs N times with fresh dropout
  masks on *one* backbone pass; a sample's uncertainty is the trace of the covariance of its N
  softmax vectors; a class's uncertainty the mean over its samples.
- UMM (Sec. 4): class margins that grow with class uncertainty.
- SUM (Sec. 5, Eq. 11-15): each sample's probability of being misclassified under its Gaussian
  embedding, used to weight how much of its class margin it gets.

The trainer (``facepipe.train.uncertainty_margins``) decides when these run; everything here is
a pure function of tensors.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

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
    (seed 000 Eq. 6: samples of the approximate posterior). The passes run as one batch of N x B."""
    if passes < 2:
        raise ValueError(f"MC dropout needs at least 2 passes to estimate a variance, got {passes}")
    batch = feature_maps.shape[0]
    with mc_dropout_mode(output_stage):
        stacked = output_stage(feature_maps.repeat(passes, *([1] * (feature_maps.dim() - 1))))
    return stacked.view(passes, batch, -1).float()


def predictive_uncertainty(probabilities: Tensor) -> Tensor:
    """Total predictive variance of each sample, [B], from N softmax vectors [N, B, C].

    Seed 000 Eq. 7: Cov = 1/N sum_n p_n p_n^T - p_bar p_bar^T; its trace is
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


def umm_integer_margins(class_uncertainty: Tensor, max_margin: int = 3) -> Tensor:
    """Per-class integer L-Softmax margins from class uncertainty (seed 000 Sec. 4).

    The paper sets m = max(1, floor(0.5 u_y)) but leaves the scale of u open. Our reading
    normalises u~_c = 2 m_max u_c / max_k u_k, so that m_c = max(1, floor(0.5 u~_c)) gives the most
    uncertain class exactly m_max (Sec. 6.1.1 fixes m_max = 3) and the margin grows with the
    uncertainty. All-zero uncertainty (no dropout) gives m = 1 everywhere: plain softmax.
    """
    if max_margin < 1:
        raise ValueError(f"max_margin must be >= 1, got {max_margin}")
    u = class_uncertainty.double().clamp_min(0.0)
    top = u.max()
    if top <= 0:
        return torch.ones_like(u, dtype=torch.long)
    scaled = 2.0 * max_margin * u / top
    # The top class lands on exactly m_max; guard against 0.5 * 2 m_max rounding below it.
    margins = torch.floor(0.5 * scaled + 1e-9).clamp(min=1, max=max_margin)
    return margins.long()


def uncertainty_additive_margins(class_uncertainty: Tensor, margin: float) -> Tensor:
    """Per-class additive margins m_c = m u_c / max_k u_k for CosFace / ArcFace ("with Uncer.",
    seed 000 Table 7); all zeros when nothing is uncertain."""
    u = class_uncertainty.float().clamp_min(0.0)
    top = u.max()
    if top <= 0:
        return torch.zeros_like(u)
    return margin * u / top


def misclassification_probability(weight: Tensor, mean: Tensor, variance: Tensor, labels: Tensor) -> Tensor:
    """Probability F that a sample with Gaussian embedding N(mean, diag(variance)) scores its most
    competitive other class above its own class (seed 000 Eq. 11-14), [B], without gradient.

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
