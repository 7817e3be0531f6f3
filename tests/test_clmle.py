"""Tests for facepipe.losses.clmle: Huang et al. Eq. 9 against values computed by hand (2-D angles,
math.log / math.exp), zero loss when the margins hold, dropped terms without finite-gradient
loss, the gradient direction, cost-sensitive weights (Sec. 3.3) and argument errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facepipe.losses.clmle import ClusterMarginLoss, cost_sensitive_weights


def at_angles(*angles):
    return torch.tensor([[math.cos(a), math.sin(a)] for a in angles], dtype=torch.float32)


def ids(*values):
    return torch.tensor(values, dtype=torch.int64)


def orthogonal_batch(num_identities=3, clusters_per_identity=2, samples_per_cluster=2):
    """Every sample exactly on its cluster's basis direction."""
    k = num_identities * clusters_per_identity
    clusters = torch.arange(k).repeat_interleave(samples_per_cluster)
    identities = clusters // clusters_per_identity
    return torch.eye(k + 2)[clusters], clusters, identities


# ---------------------------------------------------------------- hand-computed Eq. 9
# Clusters (centroid angle, identity): c0 (0, id 0) from samples at +-0.1, c1 (0.5, id 0),
# c2 (1.1, id 1), c3 (-0.7, id 1). s_k = scale * cos(theta_i - phi_k). The own-cluster angle:
# inclusive, c0's batch centroid (0); leave-one-out, the *other* member of c0 (-+0.1). Samples
# alone in their cluster fall back to their own feature (no stored centroids): angle theta_i.
HAND_THETA = [0.1, -0.1, 0.5, 1.1, -0.7]
HAND_OWN_PHI = {"inclusive": [0.0, 0.0, 0.5, 1.1, -0.7], "leave_one_out": [-0.1, 0.1, 0.5, 1.1, -0.7]}


# Updated for the leave-one-out own centroid (now the default): the two c0 samples' own-cluster
# angles changed from 0 to -+0.1; "inclusive" keeps the former values.
@pytest.mark.parametrize("own_centroid", ["leave_one_out", "inclusive"])
def test_hand_computed_value(own_centroid):
    scale, a1, a2 = 4.0, 0.3, 0.1
    theta = HAND_THETA
    own = [0, 0, 1, 2, 3]
    phi = [0.0, 0.5, 1.1, -0.7]
    identity_of = [0, 0, 1, 1]

    def lse(values):
        return math.log(sum(math.exp(v) for v in values))

    expected, hinges = [], []
    for t, m, own_phi in zip(theta, own, HAND_OWN_PHI[own_centroid]):
        s = [scale * math.cos(t - p) for p in phi]
        s_own = scale * math.cos(t - own_phi)
        other_id = [s[k] for k in range(4) if identity_of[k] != identity_of[m]]
        same_id = [s[k] for k in range(4) if identity_of[k] == identity_of[m] and k != m]
        inter = lse(other_id) - (s_own - scale * a1)
        intra = lse(same_id) - (s_own - scale * a2)
        hinges += [inter, intra]
        expected.append(max(0.0, inter) + max(0.0, intra))
    # the batch exercises both sides of the hinge
    assert any(h > 0.05 for h in hinges) and any(h < -0.05 for h in hinges)

    features = at_angles(*theta) * 3.0  # un-normalised input: the loss normalises
    cluster_ids, identity_ids = ids(*own), ids(0, 0, 0, 1, 1)
    loss = ClusterMarginLoss(scale, a1, a2, cost_sensitive=False, own_centroid=own_centroid)
    out = loss(features, cluster_ids, identity_ids)
    assert out.per_sample.tolist() == pytest.approx(expected, abs=1e-5)
    assert out.loss.item() == pytest.approx(sum(expected) / 5, abs=1e-5)
    assert out.weights.tolist() == [1.0] * 5
    assert out.zero_loss_fraction.item() == pytest.approx(sum(e == 0 for e in expected) / 5)

    # identity counts 3 and 2 -> raw weights 1/3, 1/2, mean (3/3 + 2/2) / 5 = 0.4
    weighted = ClusterMarginLoss(scale, a1, a2, own_centroid=own_centroid)(features, cluster_ids, identity_ids)
    w = [1 / 3 / 0.4] * 3 + [1 / 2 / 0.4] * 2
    assert weighted.weights.tolist() == pytest.approx(w, abs=1e-6)
    assert weighted.loss.item() == pytest.approx(sum(a * b for a, b in zip(w, expected)) / 5, abs=1e-5)


def test_leave_one_out_centroid_excludes_the_sample():
    # Cluster 0 has three members in the batch, cluster 1 two, cluster 2 one. Each sample's own
    # centroid must be the normalised sum of the *other* members, computed here by hand.
    torch.manual_seed(0)
    features = torch.randn(6, 5)
    clusters, identities = ids(0, 0, 0, 1, 1, 2), ids(0, 0, 0, 1, 1, 2)
    stored = torch.randn(6, 5)
    out = ClusterMarginLoss(scale=16.0)(features, clusters, identities, stored_centroids=stored)
    unit = F.normalize(features, dim=1)
    for i in range(5):
        mates = [j for j in range(6) if clusters[j] == clusters[i] and j != i]
        expected = F.normalize(unit[mates].sum(0), dim=0) @ unit[i]
        with_self = F.normalize(unit[mates + [i]].sum(0), dim=0) @ unit[i]
        assert out.own_cosine_leave_one_out[i].item() == pytest.approx(expected.item(), abs=1e-6)
        assert out.own_cosine_inclusive[i].item() == pytest.approx(with_self.item(), abs=1e-6)
        assert out.own_cosine_inclusive[i] > out.own_cosine_leave_one_out[i]  # the sample pulls its centroid
    # Alone in the batch: the stored centroid of its cluster.
    lone = F.normalize(stored[5], dim=0) @ unit[5]
    assert out.own_cosine_leave_one_out[5].item() == pytest.approx(lone.item(), abs=1e-6)
    assert out.alone.tolist() == [False] * 5 + [True]
    # The loss uses the leave-one-out similarity for the own cluster and the full batch centroids
    # for the others (one cluster per identity here: inter terms only).
    full = torch.stack([F.normalize(unit[clusters == k].sum(0), dim=0) for k in range(3)])
    expected = []
    for i in range(6):
        others = [k for k in range(3) if k != int(clusters[i])]
        lse = torch.logsumexp(16.0 * full[others] @ unit[i], 0)
        expected.append(torch.relu(lse - 16.0 * (out.own_cosine_leave_one_out[i] - 0.3)).item())
    assert max(expected) > 0
    assert out.per_sample.tolist() == pytest.approx(expected, abs=1e-4)


def test_alone_in_batch_without_stored_centroid_uses_its_own_feature():
    features = torch.randn(3, 4)
    out = ClusterMarginLoss()(features, ids(0, 1, 1), ids(0, 1, 1))
    assert out.own_cosine_leave_one_out[0].item() == pytest.approx(1.0, abs=1e-6)
    assert out.alone.tolist() == [True, False, False]


def test_stored_centroids_shape_and_own_centroid_mode_are_checked():
    with pytest.raises(ValueError, match="stored_centroids"):
        ClusterMarginLoss()(torch.randn(3, 4), ids(0, 1, 1), ids(0, 1, 1), stored_centroids=torch.randn(2, 4))
    with pytest.raises(ValueError, match="own_centroid"):
        ClusterMarginLoss(own_centroid="exclusive")


def test_literal_scale_one_cannot_reach_zero():
    # Orthogonal clusters, s_m = 1, s_k = 0: inter = log(4 other-identity clusters) - (1 - a1).
    features, clusters, identities = orthogonal_batch()
    out = ClusterMarginLoss(scale=1.0, inter_margin=0.3, intra_margin=0.1)(features, clusters, identities)
    assert out.per_sample.tolist() == pytest.approx([math.log(4) - 0.7] * 12, abs=1e-6)
    assert out.loss.item() == pytest.approx(math.log(4) - 0.7, abs=1e-6)


def test_zero_when_margins_hold_with_room():
    features, clusters, identities = orthogonal_batch()
    out = ClusterMarginLoss(scale=16.0)(features, clusters, identities)
    # inter: log 4 - 16 * 0.7 < 0; intra: log 1 - 16 * 0.9 < 0
    assert out.loss.item() == 0.0
    assert out.per_sample.abs().max().item() == 0.0


def test_positive_when_clusters_overlap():
    features, clusters, identities = orthogonal_batch()
    features = features + 3.0 * features[clusters == 2].mean(0)  # pull everything towards c2
    out = ClusterMarginLoss(scale=16.0)(features, clusters, identities)
    assert out.loss.item() > 0
    assert (out.per_sample > 0).sum() >= 4


# ---------------------------------------------------------------- dropped terms
def test_intra_term_dropped_for_single_cluster_identities():
    # Two identities, one cluster each, orthogonal: only inter = log(1) - (1 - 1.5) = 0.5 is left.
    features, clusters, identities = orthogonal_batch(num_identities=2, clusters_per_identity=1)
    features.requires_grad_(True)
    out = ClusterMarginLoss(scale=1.0, inter_margin=1.5, intra_margin=1.0)(features, clusters, identities)
    assert out.per_sample.tolist() == pytest.approx([0.5] * 4, abs=1e-6)
    out.loss.backward()
    assert torch.isfinite(features.grad).all()


def test_inter_term_dropped_for_single_identity_batch():
    # One identity, two orthogonal clusters: only intra = log(1) - (1 - 1.2) = 0.2 is left.
    features, clusters, identities = orthogonal_batch(num_identities=1, clusters_per_identity=2)
    features.requires_grad_(True)
    out = ClusterMarginLoss(scale=1.0, inter_margin=1.5, intra_margin=1.2)(features, clusters, identities)
    assert out.per_sample.tolist() == pytest.approx([0.2] * 4, abs=1e-6)
    out.loss.backward()
    assert torch.isfinite(features.grad).all()


def test_single_cluster_batch_is_zero_with_finite_gradient():
    features = torch.randn(3, 4, requires_grad=True)
    out = ClusterMarginLoss()(features, ids(7, 7, 7), ids(2, 2, 2))
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.isfinite(features.grad).all()


# ---------------------------------------------------------------- gradient
def own_centroid_cosines(features, clusters):
    unit = F.normalize(features, dim=1)
    centroids = torch.stack([F.normalize(unit[clusters == k].mean(0), dim=0) for k in range(int(clusters.max()) + 1)])
    return (unit * centroids[clusters]).sum(1)


def test_sgd_step_moves_feature_towards_own_centroid():
    # Cluster 0 (identity 0): two samples on e1 and a stray one between e1 and e2;
    # cluster 1 (identity 1) on e2. Only the stray sample has a loss (it violates a1).
    features = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0.6, 0.8, 0], [0, 1.0, 0], [0, 1.0, 0]])
    clusters = identities = ids(0, 0, 0, 1, 1)
    stray = features.clone().requires_grad_(True)
    out = ClusterMarginLoss(scale=16.0)(stray, clusters, identities)
    assert out.per_sample[2] > 0 and out.per_sample[[0, 1, 3, 4]].abs().max() == 0
    out.loss.backward()
    assert stray.grad[[0, 1]].abs().sum() > 0  # through the (leave-one-out) batch centroid
    stepped = features.clone()
    stepped[2] -= 0.01 * stray.grad[2]
    before, after = own_centroid_cosines(features, clusters), own_centroid_cosines(stepped, clusters)
    assert after[2] > before[2]
    assert F.normalize(stepped[2], dim=0)[1] < 0.8  # and away from the other identity's e2


def test_sgd_step_tightens_noisy_clusters():
    for seed in range(3):
        torch.manual_seed(seed)
        base, clusters, identities = orthogonal_batch(2, 2, samples_per_cluster=3)
        base = base + 0.6 * torch.randn_like(base)
        features = base.clone().requires_grad_(True)
        out = ClusterMarginLoss(scale=16.0)(features, clusters, identities)
        assert out.loss.item() > 0
        out.loss.backward()
        stepped = features.detach() - 0.01 * features.grad
        gain = own_centroid_cosines(stepped, clusters) - own_centroid_cosines(base, clusters)
        assert gain.mean() > 0


def test_float32_under_autocast():
    features, clusters, identities = orthogonal_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ClusterMarginLoss(scale=1.0)(features.bfloat16(), clusters, identities)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(math.log(4) - 0.7, abs=1e-6)


# ---------------------------------------------------------------- cost-sensitive weights
def test_cost_sensitive_weights():
    # raw [1/3, 1/3, 1/3, 1], mean 1/2 -> [2/3, 2/3, 2/3, 2]
    assert cost_sensitive_weights(ids(0, 0, 0, 1)).tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])
    assert cost_sensitive_weights(ids(5, 9, 5, 9)).tolist() == pytest.approx([1.0] * 4)
    assert cost_sensitive_weights(ids(4, 4, 4)).tolist() == pytest.approx([1.0] * 3)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs", [
    {"inter_margin": 0.1, "intra_margin": 0.1},
    {"inter_margin": 0.1, "intra_margin": 0.3},
    {"intra_margin": -0.1},
    {"scale": 0.0},
])
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        ClusterMarginLoss(**kwargs)


def test_margin_error_names_both_margins():
    with pytest.raises(ValueError, match="inter_margin.*intra_margin"):
        ClusterMarginLoss(inter_margin=0.2, intra_margin=0.2)


def test_invalid_batches():
    loss = ClusterMarginLoss()
    features = torch.randn(4, 3)
    with pytest.raises(ValueError, match="cluster_ids"):
        loss(features, ids(0, 0, 1), ids(0, 0, 1, 1))
    with pytest.raises(ValueError, match="integer"):
        loss(features, torch.zeros(4), ids(0, 0, 1, 1))
    with pytest.raises(ValueError, match="single identity"):
        loss(features, ids(0, 0, 1, 1), ids(0, 1, 1, 1))
    with pytest.raises(ValueError, match="features"):
        loss(torch.randn(4), ids(0, 0, 1, 1), ids(0, 0, 1, 1))


def test_identity_correct_marks_samples_nearest_to_a_cluster_of_their_identity():
    # Clusters 0 and 1 belong to identity 0, cluster 2 to identity 1. Sample 3 (cluster 2) sits
    # right on cluster 0's direction: its nearest batch centroid belongs to the wrong identity.
    features = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.05],
                             [0.0, 0.0, 1.0]])
    clusters = torch.tensor([0, 1, 2, 2, 2])
    identities = torch.tensor([0, 0, 1, 1, 1])
    out = ClusterMarginLoss()(features, clusters, identities)
    assert out.identity_correct.tolist() == [True, True, True, False, True]
