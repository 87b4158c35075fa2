import torch.nn.functional as F
from torch import nn

from kd.train.losses.base import LOGIT_LOSSES
from kd.train.losses.kd import check_temperature


def pearson(a, b, eps=1e-8):
    """Row-wise Pearson correlation of two (N, D) matrices."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@LOGIT_LOSSES.register("dist")
class DIST(nn.Module):
    """Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher".

    Matches relations instead of exact probabilities: T^2 (beta * inter + gamma * intra), where inter is
    1 - Pearson correlation of each sample's class probabilities with the teacher's, and intra the same over each
    class's probabilities across the batch; plus full cross-entropy. Defaults: beta = gamma = 1 and the
    authors' CIFAR temperature 4 (their ImageNet setting is T = 1).
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 4.0, ce_weight: float = 1.0):
        super().__init__()
        check_temperature(temperature)
        for name, value in (("beta", beta), ("gamma", gamma), ("ce_weight", ce_weight)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.beta, self.gamma, self.temperature, self.ce_weight = beta, gamma, temperature, ce_weight

    def forward(self, student_logits, teacher_logits, step=None):
        p_s = F.softmax(student_logits.float() / self.temperature, 1)
        p_t = F.softmax(teacher_logits.float() / self.temperature, 1)
        inter = 1 - pearson(p_s, p_t).mean()
        intra = 1 - pearson(p_s.T, p_t.T).mean()
        return self.temperature ** 2 * (self.beta * inter + self.gamma * intra)
