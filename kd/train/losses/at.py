import torch.nn.functional as F
from torch import nn

from kd.train.losses.base import FEATURE_LOSSES, resize, spatial


def attention_map(x, p):
    """Spatial attention of a (N, C, H, W) map: the channel mean of |x|^p, L2-normalised per sample."""
    return F.normalize(x.float().abs().pow(p).mean(1).flatten(1), dim=1)


@FEATURE_LOSSES.register("at")
class AT(nn.Module):
    """Zagoruyko & Komodakis 2017, "Paying More Attention to Attention".

    beta * mean squared difference of student and teacher attention maps, summed over the listed layer pairs
    (any number, same count on both sides). Attention ignores channel count and order, so no connector is
    needed; a student map of another size is resized to the teacher's first. Defaults p = 2 and beta = 1000,
    as in the authors' code.
    """
    layers = None

    def __init__(self, probe, p: float = 2.0, beta: float = 1000.0):
        super().__init__()
        if p <= 0 or beta < 0:
            raise ValueError(f"p must be > 0 and beta >= 0, got p={p}, beta={beta}")
        self.sizes = [tuple(spatial(shape, "at")[1:]) for shape in probe.teacher_shapes]
        for shape in probe.student_shapes:
            spatial(shape, "at")
        self.p, self.beta = p, beta

    def forward(self, student_features, teacher_features, step=None):
        return self.beta * sum(
            (attention_map(resize(s.float(), size), self.p) - attention_map(t, self.p)).pow(2).mean()
            for s, t, size in zip(student_features, teacher_features, self.sizes))
