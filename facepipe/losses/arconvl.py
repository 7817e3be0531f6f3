"""ARConvL: adaptive region-based prototype learning for class imbalance.

Equation numbers refer to Li et al., "ARConvL: Adaptive Region-Based Convolutional
Learning for Multi-class Imbalance Classification". Every class j has a learnable centre C_j and
radius R_j in the latent feature space; distances are L2, d(f, C) = ||f - C||_2.

    L = L_R + L_D + L_M                                                         (Eq. 1)

- L_R, region loss (Eq. 2): learns the radii from the detached distances d*.
- L_D, adaptive distribution loss (Eq. 6): pulls features to their centre with a weight beta
  (Eq. 5) that grows with how far the upper-bound radius R_upp (Eq. 4) exceeds the benchmark
  radius R_ben (Eq. 3).
- L_M, adaptive-margin cross-entropy on -d^2 (Eq. 8): the margin sigma^2 (Eq. 7) is added to
  every non-target class, the class priors eta_j are in the softmax, and a class-centre term
  pushes the centres apart.

Readings chosen where the extracted text is ambiguous (each also noted where it is used):

- Eq. 2, 6 and 8 write sum_j sum_i; the inner sum runs over the samples of class j
  (x_i in j, as Eq. 2 and 6 print), so every sample contributes through its own class only.
- Eq. 4: R_upp = max_j max(R_j*, d_min(C_j)/2), i.e. the largest of all radii and all half
  nearest-centre distances; this guarantees R_ben <= R_upp, as the paper states.
- beta and sigma^2 come from detached centres and radii (the "*" variables), so they are
  constants of each step; the radii receive gradient from L_R alone and L_R sends none to the
  features or centres (d* is detached).
- alpha_j = max_j' N_j' / N_j exactly as in Eq. 2 for L_R. In L_D (Eq. 6) the weights are
  alpha_j / mean_j' alpha_j' (mean 1), as the authors' code normalises them there: with the
  literal alpha (up to 117 on MNIST-100) the pull of L_D, at lr 0.1, made features, centres and
  radii diverge from the first epoch (loss 2.8e3 after 50 steps, 1e33 by epoch 31; measured).
  eta_j = N_j / sum N in p(x in j) only; p(C_j) has no eta, as printed.
- Prediction: p(x in j) is increasing in eta_j exp(-d^2(x, C_j)), so its argmax is that of
  log eta_j - d_j^2. eta enters p(x in j) as a training-time logit adjustment (Menon et al., the
  paper's [23]), and the authors' code predicts the nearest centre; ``predict`` does the same by
  default (``use_prior=True`` gives the literal argmax with eta).
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facepipe.losses.imbalance import class_counts_tensor
from facepipe.runtime.device import float32_region

__all__ = [
    "ARConvLHead",
    "adaptive_beta",
    "adaptive_margin",
    "benchmark_and_upper_radius",
]

CountsLike = Union[Sequence[float], Tensor]


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """||a_i - b_j||^2 [A, B] through ||a||^2 + ||b||^2 - 2 a.b: no [A, B, D] intermediate,
    which thousands of identities times a batch would not fit. Clamped at 0 against rounding."""
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1).unsqueeze(0) - 2.0 * (a @ b.t())
    return sq.clamp_min(0.0)


def _centre_squared_distances(centers: Tensor) -> Tensor:
    """d^2(C_j, C_j') [C, C] with an exact zero diagonal (the expansion leaves rounding there)."""
    sq = _squared_distances(centers, centers)
    eye = torch.eye(sq.shape[0], dtype=torch.bool, device=sq.device)
    return sq.masked_fill(eye, 0.0)


def benchmark_and_upper_radius(centers: Tensor, radii: Tensor) -> tuple[Tensor, Tensor]:
    """R_ben (Eq. 3) and R_upp (Eq. 4) from detached centres [C, D] and radii [C].

    d_min(C_j) = min_{j' != j} ||C_j - C_j'||;  R_ben = min_j d_min(C_j) / 2;
    R_upp = max_j max(R_j, d_min(C_j) / 2)  (so R_ben <= R_upp always).
    Returns two 0-d tensors without gradient.
    """
    if centers.dim() != 2 or centers.shape[0] < 2:
        raise ValueError(f"centers must have shape [C, D] with C >= 2, got {list(centers.shape)}")
    if radii.shape != centers.shape[:1]:
        raise ValueError(f"radii must have shape [C] = [{centers.shape[0]}], got {list(radii.shape)}")
    with torch.no_grad():
        sq = _centre_squared_distances(centers.detach())
        eye = torch.eye(sq.shape[0], dtype=torch.bool, device=sq.device)
        half_nearest = sq.masked_fill(eye, math.inf).min(dim=1).values.sqrt() / 2.0
        r_ben = half_nearest.min()
        r_upp = torch.maximum(radii.detach().to(half_nearest.dtype).max(), half_nearest.max())
    return r_ben, r_upp


def adaptive_beta(r_ben: Tensor, r_upp: Tensor) -> Tensor:
    """beta = min(1, (R_upp / R_ben)^2 - 1) (Eq. 5), the weight of L_D; 0 when R_upp = R_ben.

    Two coincident centres give R_ben = 0: beta is then 1 (the regions overlap completely)
    unless R_upp is 0 as well (every region degenerate, nothing to pull in: beta = 0)."""
    r_ben2, r_upp2 = r_ben * r_ben, r_upp * r_upp
    ratio = (r_upp2 - r_ben2) / r_ben2.clamp_min(torch.finfo(r_ben2.dtype).tiny)
    degenerate = (r_upp2 > 0).to(r_ben2.dtype)
    return torch.where(r_ben2 > 0, ratio, degenerate).clamp(0.0, 1.0)


def adaptive_margin(r_ben: Tensor, r_upp: Tensor) -> Tensor:
    """sigma^2 = min(R_ben^2, R_upp^2 - R_ben^2) (Eq. 7), the margin in squared-distance units."""
    r_ben2, r_upp2 = r_ben * r_ben, r_upp * r_upp
    return torch.minimum(r_ben2, (r_upp2 - r_ben2).clamp_min(0.0))


class ARConvLHead(nn.Module):
    """Prototype head with class regions and the ARConvL loss (Eq. 1-8).

    Args:
        num_classes: C >= 2.
        feature_dim: D, the latent feature size (64 in the paper).
        class_counts: N_j, training samples per class [C], all > 0; fixes alpha_j = max N / N_j
            (Eq. 2, 6) and eta_j = N_j / sum N (Eq. 8).
        gamma: radius regulariser of Eq. 2 (0.05 in the paper), in [0, 1].
        radius_init: initial R_j (0.1, as the authors' code).

    Parameters ``centers`` [C, D] (uniform in +-sqrt(6 / C), the Keras He-uniform bound the
    authors' code gives a [C, D] weight) and ``radii`` [C]. The radii train with their own
    learning rate: see :meth:`parameter_groups`, :meth:`radius_lr` and :meth:`set_radius_lr`.
    Computes in float32 (float64 if given float64), also under autocast.
    """

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        class_counts: CountsLike,
        gamma: float = 0.05,
        radius_init: float = 0.1,
    ) -> None:
        super().__init__()
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2 (regions need a neighbour), got {num_classes!r}")
        if int(feature_dim) != feature_dim or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive integer, got {feature_dim!r}")
        if not (math.isfinite(gamma) and 0.0 <= gamma <= 1.0):
            raise ValueError(f"gamma must be in [0, 1] (Eq. 2), got {gamma!r}")
        if not (math.isfinite(radius_init) and radius_init >= 0):
            raise ValueError(f"radius_init must be a finite number >= 0, got {radius_init!r}")
        counts = class_counts_tensor(class_counts)
        if counts.numel() != num_classes:
            raise ValueError(f"class_counts has {counts.numel()} entries, expected num_classes = {num_classes}")
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.gamma = float(gamma)
        bound = math.sqrt(6.0 / self.num_classes)
        self.centers = nn.Parameter(torch.empty(self.num_classes, self.feature_dim).uniform_(-bound, bound))
        self.radii = nn.Parameter(torch.full((self.num_classes,), float(radius_init)))
        # Derived from the counts given at construction, so not saved in the state_dict. Kept in
        # float64 and cast where used, so a float64 head gets them to full precision.
        self.register_buffer("alpha", counts.max() / counts, persistent=False)
        self.register_buffer("alpha_distribution", self.alpha / self.alpha.mean(), persistent=False)
        self.register_buffer("log_eta", torch.log(counts / counts.sum()), persistent=False)

    # ------------------------------------------------------------------ inputs
    def _inputs(self, features: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"features must have shape [B, D] = [B, {self.feature_dim}], got {list(features.shape)}"
            )
        if labels is not None:
            if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
                raise ValueError(f"labels must have shape [B] = [{features.shape[0]}], got {list(labels.shape)}")
            if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
                raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        dtype = torch.promote_types(torch.promote_types(features.dtype, self.centers.dtype), torch.float32)
        return features.to(dtype), self.centers.to(dtype)

    # ------------------------------------------------------------------ loss
    def forward(self, features: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The ARConvL loss of a batch.

        Returns a dict: ``loss`` = region + distribution + margin (Eq. 1); ``region`` L_R (Eq. 2);
        ``distribution`` L_D (Eq. 6); ``margin`` L_M (Eq. 8), of which ``center_term`` is the
        class-centre part (1/k) sum_j -log p(C_j); and, detached, ``beta`` (Eq. 5), ``sigma2``
        (Eq. 7), ``r_ben`` (Eq. 3), ``r_upp`` (Eq. 4).
        """
        with float32_region(features.device.type):
            f, centers = self._inputs(features, labels)
            y = labels.long()
            n = f.shape[0]
            radii = self.radii.to(f.dtype)
            alpha_y = self.alpha.to(device=f.device, dtype=f.dtype)[y]

            # d^2(f_i, C_{y_i}) by direct difference: exact near zero, where the expansion is not.
            target_sq = ((f - centers[y]) ** 2).sum(1)

            # Eq. 2: (1/n) sum_i alpha_{y_i} (max(0, d*_i - R_{y_i})^2 + gamma R_{y_i}^2), where
            # d* is the detached distance, so L_R moves only the radii.
            d_star = target_sq.detach().sqrt()
            r_y = radii[y]
            region = (alpha_y * (F.relu(d_star - r_y) ** 2 + self.gamma * r_y**2)).sum() / n

            r_ben, r_upp = benchmark_and_upper_radius(centers, radii)
            beta = adaptive_beta(r_ben, r_upp)
            sigma2 = adaptive_margin(r_ben, r_upp)

            # Eq. 6: (beta / n) sum_i alpha_{y_i} d^2(f_i, C_{y_i}), alpha normalised to mean 1.
            alpha_d = self.alpha_distribution.to(device=f.device, dtype=f.dtype)[y]
            distribution = beta * (alpha_d * target_sq).sum() / n

            # Eq. 8, sample part: the printed p(x_i in y_i) is the softmax of the logits
            # log eta_j - d^2_ij + sigma^2 [j != y_i] at y_i; cross_entropy evaluates it stably.
            sq = _squared_distances(f, centers).scatter(1, y.unsqueeze(1), target_sq.unsqueeze(1))
            log_eta = self.log_eta.to(device=f.device, dtype=f.dtype)
            not_target = torch.ones_like(sq).scatter(1, y.unsqueeze(1), 0.0)
            sample_logits = log_eta.unsqueeze(0) - sq + sigma2 * not_target
            sample_term = F.cross_entropy(sample_logits, y, reduction="sum") / n

            # Eq. 8, centre part: p(C_j) = 1 / (1 + sum_{j' != j} exp(-d^2(C_j, C_j') + sigma^2)),
            # the softmax of row j of -d^2(C_j, .) + sigma^2 [j' != j] at j' = j (d^2(C_j, C_j) = 0).
            k = self.num_classes
            off_diagonal = 1.0 - torch.eye(k, dtype=f.dtype, device=f.device)
            centre_logits = -_centre_squared_distances(centers) + sigma2 * off_diagonal
            center_term = F.cross_entropy(centre_logits, torch.arange(k, device=f.device), reduction="mean")

            margin = sample_term + center_term
            return {
                "loss": region + distribution + margin,
                "region": region,
                "distribution": distribution,
                "margin": margin,
                "center_term": center_term,
                "beta": beta.detach(),
                "sigma2": sigma2.detach(),
                "r_ben": r_ben,
                "r_upp": r_upp,
            }

    # ------------------------------------------------------------------ prediction
    def scores(self, features: Tensor, use_prior: bool = False) -> Tensor:
        """Class scores [B, C] whose argmax is the prediction: -d^2(f, C_j), plus log eta_j with
        ``use_prior`` (the literal argmax of p(x in j), module docstring)."""
        with float32_region(features.device.type), torch.no_grad():
            f, centers = self._inputs(features)
            out = -_squared_distances(f, centers)
            if use_prior:
                out = out + self.log_eta.to(device=f.device, dtype=f.dtype).unsqueeze(0)
            return out

    def predict(self, features: Tensor, use_prior: bool = False) -> Tensor:
        """Predicted class indices [B]: the nearest centre (``use_prior=False``, default) or the
        class of highest p(x in j) including eta_j (``use_prior=True``)."""
        return self.scores(features, use_prior=use_prior).argmax(dim=1)

    # ------------------------------------------------------------------ optimisation
    @staticmethod
    def radius_lr(epoch: int, warmup_epochs: int = 3, warmup_lr: float = 1e-3, lr: float = 1e-2) -> float:
        """Learning rate of the radii in (0-based) ``epoch``: 0.001 for the first 3 epochs, then
        0.01 (Sec. 4.1). It does not follow the main schedule's decay."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch!r}")
        return warmup_lr if epoch < warmup_epochs else lr

    def parameter_groups(self, base_lr: float, epoch: int = 0) -> list[dict]:
        """Optimizer parameter groups: the centres at ``base_lr``, the radii at
        :meth:`radius_lr` (epoch) without weight decay (gamma R^2 of Eq. 2 already regularises
        them). Pass to ``torch.optim.SGD(groups, lr=base_lr, momentum=0.9)``."""
        if not (math.isfinite(base_lr) and base_lr > 0):
            raise ValueError(f"base_lr must be a finite positive number, got {base_lr!r}")
        return [
            {"params": [self.centers], "lr": float(base_lr)},
            {"params": [self.radii], "lr": self.radius_lr(epoch), "weight_decay": 0.0},
        ]

    def set_radius_lr(self, optimizer: torch.optim.Optimizer, epoch: int) -> float:
        """Set the learning rate of the optimizer group holding the radii for ``epoch``; call it
        at every epoch start. Returns the rate. The radii must be alone in their group."""
        lr = self.radius_lr(epoch)
        for group in optimizer.param_groups:
            if any(p is self.radii for p in group["params"]):
                if len(group["params"]) != 1:
                    raise ValueError("the radii share an optimizer group with other parameters; "
                                     "build the optimizer from parameter_groups()")
                group["lr"] = lr
                return lr
        raise ValueError("the optimizer does not hold this head's radii; build it from parameter_groups()")

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, gamma={self.gamma:g}"
