import torch.nn.functional as F
from torch import nn

from kd.train.losses.base import LOGIT_LOSSES


def standardize(logits):
    """Sun et al. 2024, "Logit Standardization in Knowledge Distillation": z-score each sample's logits, so the
    student matches the teacher's logit relations rather than their scale (the temperature becomes a base one)."""
    logits = logits.float()
    return (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + 1e-7)


MAX_TEMPERATURE = 100.0  # past any published use; far larger ones overflow the T**2 gradient scale


def check_temperature(temperature):
    if not 0 < temperature <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be in (0, {MAX_TEMPERATURE}], got {temperature}")


@LOGIT_LOSSES.register("kd")
class KD(nn.Module):
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

    scale * alpha * T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean; the T^2 keeps gradient scale
    independent of T. The remaining (1 - alpha) goes to cross-entropy with the labels. `standardize: true`
    applies logit standardization (Sun et al. 2024) to both sides first; that paper uses a base temperature
    of 2 and weights KD 9 against CE 0.1 (alpha 0.9, scale 10), as standardized logits give smaller KLs.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, standardize: bool = False, scale: float = 1.0):
        super().__init__()
        check_temperature(temperature)
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if scale < 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        self.temperature, self.alpha, self.standardize, self.scale = temperature, alpha, standardize, scale
        self.ce_weight = 1 - alpha

    def forward(self, student_logits, teacher_logits, step=None):
        s, t = (standardize(student_logits), standardize(teacher_logits)) if self.standardize else \
            (student_logits.float(), teacher_logits.float())
        temp = self.temperature
        kl = F.kl_div(F.log_softmax(s / temp, dim=1), F.log_softmax(t / temp, dim=1), reduction="batchmean",
                      log_target=True)
        return self.scale * self.alpha * temp * temp * kl
