import torch.nn.functional as F
from torch import nn

from kd.train.losses.base import FEATURE_LOSSES, resize, spatial


class Connector(nn.Module):
    """Maps student features to the teacher's shape: 1x1 conv + BN for channels, then resize for space."""

    def __init__(self, student_shape, teacher_shape):
        super().__init__()
        (c_s, *_), (c_t, *hw_t) = spatial(student_shape, "fitnets"), spatial(teacher_shape, "fitnets")
        self.proj = nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t))
        self.size = tuple(hw_t)

    def forward(self, x):
        return resize(self.proj(x), self.size)


@FEATURE_LOSSES.register("fitnets")
class FitNets(nn.Module):
    """Romero et al. 2015, "FitNets: Hints for Thin Deep Nets": MSE between the teacher's map and the student's
    map passed through a learned connector (trained with the student, dropped at export)."""
    layers = 1

    def __init__(self, probe):
        super().__init__()
        self.connector = Connector(probe.student_shapes[0], probe.teacher_shapes[0])

    def forward(self, student_features, teacher_features, step=None):
        return F.mse_loss(self.connector(student_features[0]).float(), teacher_features[0].float())
