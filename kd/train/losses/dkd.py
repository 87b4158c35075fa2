import torch
import torch.nn.functional as F
from torch import nn

from kd.train.losses.base import LOGIT_LOSSES
from kd.train.losses.kd import check_temperature, standardize


def decoupled_kl(student_logits, teacher_logits, target, temperature):
    """Per-sample TCKD and NCKD (before T^2): KL of the binary (target, rest) split, and KL of the distributions
    over the non-target classes alone. Then KL(p_t || p_s) = TCKD + (1 - p_t[target]) * NCKD, exactly.
    Computed in log space, so confident teachers give no log(0)."""
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    is_target = F.one_hot(target, s.shape[1]).bool()

    def parts(z):
        log_all = torch.logsumexp(z, 1)
        masked = z.masked_fill(is_target, float("-inf"))
        log_rest = torch.logsumexp(masked, 1)
        log_binary = torch.stack([z.gather(1, target[:, None])[:, 0] - log_all, log_rest - log_all], 1)
        return log_binary, F.log_softmax(masked, 1)

    (b_s, q_s), (b_t, q_t) = parts(s), parts(t)
    tckd = (b_t.exp() * (b_t - b_s)).sum(1)
    nckd = (q_t.exp() * (q_t - q_s).masked_fill(is_target, 0.0)).sum(1)
    return tckd, nckd


@LOGIT_LOSSES.register("dkd")
class DKD(nn.Module):
    """Zhao et al. 2022, "Decoupled Knowledge Distillation".

    KD's KL splits into target-class KD (TCKD) and non-target-class KD (NCKD), whose weight in KD shrinks as the
    teacher grows confident; DKD weights them freely: T^2 (alpha * TCKD + beta * NCKD), batch mean, ramped in
    linearly over `warmup` epochs, plus full cross-entropy. Defaults are the paper's CIFAR ones (alpha 1, beta 8,
    T 4, warm-up 20 of 240 epochs: scale it to short schedules). `standardize` as in KD (Sun et al. 2024).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup: float = 20.0,
                 ce_weight: float = 1.0, standardize: bool = False):
        super().__init__()
        check_temperature(temperature)
        for name, value in (("alpha", alpha), ("beta", beta), ("warmup", warmup), ("ce_weight", ce_weight)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.alpha, self.beta, self.temperature, self.warmup = alpha, beta, temperature, warmup
        self.ce_weight, self.standardize = ce_weight, standardize

    def forward(self, student_logits, teacher_logits, step):
        s, t = (standardize(student_logits), standardize(teacher_logits)) if self.standardize else \
            (student_logits, teacher_logits)
        tckd, nckd = decoupled_kl(s, t, step.target, self.temperature)
        ramp = torch.as_tensor(step.epoch).div(self.warmup).clamp(max=1.0) if self.warmup else 1.0
        return ramp * self.temperature ** 2 * (self.alpha * tckd.mean() + self.beta * nckd.mean())
