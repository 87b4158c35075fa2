"""Distillation losses. A logit method returns its distillation term and says how much cross-entropy it keeps
(`ce_weight`); a feature method owns its learnable connector, sized from the shapes of a dry forward pass."""
import torch.nn.functional as F
from torch import nn

from .registry import Registry

LOGIT_LOSSES = Registry("logit loss")
FEATURE_LOSSES = Registry("feature loss")


@LOGIT_LOSSES.register("kd")
class KD(nn.Module):
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

    alpha * T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean; the T^2 keeps gradient scale independent of T.
    The remaining (1 - alpha) goes to cross-entropy with the labels.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.temperature, self.alpha = temperature, alpha
        self.ce_weight = 1 - alpha

    def forward(self, student_logits, teacher_logits):
        t = self.temperature
        log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
        log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        return self.alpha * t * t * kl


class Connector(nn.Module):
    """Maps student features to the teacher's shape: 1x1 conv + BN for channels, then resize for space.

    Pooling when the student map is larger, bilinear upsampling when smaller: both keep spatial layout aligned.
    """

    def __init__(self, student_shape, teacher_shape):
        super().__init__()
        (c_s, *hw_s), (c_t, *hw_t) = student_shape, teacher_shape
        if len(hw_s) != 2 or len(hw_t) != 2:
            raise ValueError(f"feature matching needs 4-D feature maps (N, C, H, W), got student {tuple(student_shape)} "
                             f"and teacher {tuple(teacher_shape)}")
        self.proj = nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t))
        self.size = tuple(hw_t)

    def forward(self, x):
        x = self.proj(x)
        if x.shape[-2:] == self.size:
            return x
        if x.shape[-2] >= self.size[0] and x.shape[-1] >= self.size[1]:
            return F.adaptive_avg_pool2d(x, self.size)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


@FEATURE_LOSSES.register("fitnets")
class FitNets(nn.Module):
    """Romero et al. 2015, "FitNets: Hints for Thin Deep Nets": MSE between connected student and teacher maps."""

    def __init__(self, student_shape, teacher_shape):
        super().__init__()
        self.connector = Connector(student_shape, teacher_shape)

    def forward(self, student_feature, teacher_feature):
        return F.mse_loss(self.connector(student_feature).float(), teacher_feature.float())
