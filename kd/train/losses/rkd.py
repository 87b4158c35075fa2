import torch
import torch.nn.functional as F
from torch import nn

from kd.train.losses.base import FEATURE_LOSSES, embedding


def pairwise_distances(e):
    """Euclidean distances between the rows of `e`, with a gradient that stays finite on the diagonal."""
    sq = (e * e).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp(min=1e-12)
    return d2.sqrt() * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def distance_potential(e):
    d = pairwise_distances(e)
    return d / (d.sum() / (d > 0).sum().clamp(min=1))  # mean of the non-zero distances, without a device sync


def angle_potential(e):
    """Cosine of the angle at every anchor j between the directions to every other pair of samples (i, k)."""
    directions = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return torch.bmm(directions, directions.transpose(1, 2)).flatten()


@FEATURE_LOSSES.register("rkd")
class RKD(nn.Module):
    """Park et al. 2019, "Relational Knowledge Distillation": the student matches the structure of the batch in
    the teacher's embedding space, not the embeddings themselves, so any dimensions fit without a connector.

    distance_weight * Huber(distances / their mean) + angle_weight * Huber(angles of triplets), on one layer
    each (maps are averaged over space; typically the pooled penultimate features). Both potentials are
    invariant to a uniform scaling of the embeddings. Defaults are the paper's: 25 and 50.
    """
    layers = 1

    def __init__(self, probe, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__()
        if distance_weight < 0 or angle_weight < 0:
            raise ValueError(f"weights must be >= 0, got {distance_weight} and {angle_weight}")
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def forward(self, student_features, teacher_features, step=None):
        s, t = embedding(student_features[0]), embedding(teacher_features[0])
        loss = s.new_zeros(())
        if self.distance_weight:
            loss = loss + self.distance_weight * F.smooth_l1_loss(distance_potential(s), distance_potential(t))
        if self.angle_weight:
            loss = loss + self.angle_weight * F.smooth_l1_loss(angle_potential(s), angle_potential(t))
        return loss
