import torch
import torch.nn.functional as F
from torch import nn

from kd.train.losses.base import FEATURE_LOSSES, resize, spatial


class ABF(nn.Module):
    """Attention-based fusion: a student level, reduced to `mid` channels, merged with the fused output of the
    deeper level through two per-pixel attention weights, then mapped to the teacher level's channels and size."""

    def __init__(self, in_channels, mid, out_channels, out_size, fuse):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.out = nn.Sequential(nn.Conv2d(mid, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None
        self.out_size = out_size

    def forward(self, x, deeper=None):
        x = self.reduce(x)
        if self.attention is not None:
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            w = self.attention(torch.cat([x, deeper], 1))
            x = x * w[:, :1] + deeper * w[:, 1:]
        return resize(self.out(x), self.out_size), x


def hcl(student, teacher, levels=(4, 2, 1)):
    """Hierarchical context loss: MSE at full resolution plus MSE of 4x4, 2x2 and 1x1 average-pooled maps
    (those smaller than the map), with weights halving at each level, normalised to sum to one."""
    loss, total, weight = F.mse_loss(student, teacher), 1.0, 1.0
    for size in levels:
        if size >= student.shape[-1]:
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size))
        total += weight
    return loss / total


@FEATURE_LOSSES.register("reviewkd")
class ReviewKD(nn.Module):
    """Chen et al. 2021, "Distilling Knowledge via Knowledge Review".

    Layers listed shallow to deep, same count on both sides. From the deepest level up, each student level is
    fused (ABF) with the fused result of the level below it, so a shallow teacher level is matched by
    information from several student levels; every fused map is compared with its teacher level by the
    hierarchical context loss (HCL), summed over levels. The pooled penultimate features (e.g. `pool` ->
    `avgpool`) make a good deepest level, as in the paper. Default mid_channels 64 (the authors' CIFAR
    setting; they use 256 on ImageNet); loss weight 1 (the stage's `weight`).
    """
    layers = None

    def __init__(self, probe, mid_channels: int = 64):
        super().__init__()
        if mid_channels < 1:
            raise ValueError(f"mid_channels must be >= 1, got {mid_channels}")
        s_shapes = [spatial(s, "reviewkd") for s in probe.student_shapes]
        t_shapes = [spatial(t, "reviewkd") for t in probe.teacher_shapes]
        last = len(s_shapes) - 1
        self.fusions = nn.ModuleList(ABF(s[0], mid_channels, t[0], tuple(t[1:]), fuse=i < last)
                                     for i, (s, t) in enumerate(zip(s_shapes, t_shapes)))

    def forward(self, student_features, teacher_features, step=None):
        loss, deeper = 0.0, None
        for fusion, s, t in reversed(list(zip(self.fusions, student_features, teacher_features))):
            out, deeper = fusion(s, deeper)
            loss = loss + hcl(out.float(), t.float())
        return loss
