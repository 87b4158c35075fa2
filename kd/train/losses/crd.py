import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kd.errors import KDError
from kd.train.losses.base import FEATURE_LOSSES, embedding, embedding_size


def gather(t):
    """Every process's rows, so under torchrun each copy of the bank sees the whole batch's updates."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def nce_loss(scores, noise):
    """NCE over (positive, K negatives) similarity ratios: -log D(positive) - sum log(1 - D(negative)),
    with D(x) = x / (x + K * noise), batch mean."""
    k = scores.shape[1] - 1
    positive, negatives = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(positive / (positive + k * noise + 1e-7))
    log_d0 = torch.log(k * noise / (negatives + k * noise + 1e-7))
    return -(log_d1.sum() + log_d0.sum()) / len(scores)


@FEATURE_LOSSES.register("crd")
class CRD(nn.Module):
    """Tian et al. 2020, "Contrastive Representation Distillation".

    Student and teacher features (one layer each, averaged over space) are embedded by learned linear heads
    into `feat_dim` unit vectors. Each side's embedding must pick its own sample's embedding from the other
    side out of `nce_k` random others, drawn from a memory bank of every training sample's embedding (updated
    with `momentum`, indexed by the dataset indices the pipeline supplies), through NCE with temperature
    `nce_t`. Defaults are the paper's (128, 16384, 0.07, 0.5; its loss weight 0.8 is the stage's `weight`);
    `nce_k` must be below the training set size. Under torchrun the processes exchange their batch's
    embeddings, so every copy of the bank receives every update.
    """
    layers = 1

    def __init__(self, probe, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07, momentum: float = 0.5):
        super().__init__()
        n = probe.num_samples
        if not 1 <= nce_k < n:
            raise ValueError(f"nce_k must be in [1, training images={n}), got {nce_k}")
        if feat_dim < 1 or nce_t <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"need feat_dim >= 1, nce_t > 0 and momentum in [0, 1), "
                             f"got {feat_dim}, {nce_t}, {momentum}")
        self.embed_s = nn.Linear(embedding_size(probe.student_shapes[0]), feat_dim)
        self.embed_t = nn.Linear(embedding_size(probe.teacher_shapes[0]), feat_dim)
        self.nce_k, self.nce_t, self.momentum, self.noise = nce_k, nce_t, momentum, 1.0 / n
        bound = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(n, feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_t", torch.rand(n, feat_dim) * 2 * bound - bound)
        # NCE's partition constants, estimated on the first batch and then fixed (as in the paper's code)
        self.register_buffer("z", torch.full((2,), -1.0))
        self.z_known = False

    def forward(self, student_features, teacher_features, step):
        if step is None or step.index is None:
            raise KDError("crd needs each batch's dataset indices; this data pipeline supplies none")
        v_s = F.normalize(self.embed_s(embedding(student_features[0])), dim=1)
        v_t = F.normalize(self.embed_t(embedding(teacher_features[0])), dim=1)
        index = step.index.to(v_s.device).long()
        samples = torch.randint(0, len(self.memory_s), (len(index), self.nce_k + 1), device=v_s.device)
        samples[:, 0] = index
        # the teacher's embedding against the student bank's entries, and the student's against the teacher bank
        scores_t = torch.exp(torch.bmm(self.memory_s[samples], v_t[:, :, None])[:, :, 0] / self.nce_t)
        scores_s = torch.exp(torch.bmm(self.memory_t[samples], v_s[:, :, None])[:, :, 0] / self.nce_t)
        if not self.z_known:  # read once per process (a resumed run loads z), not a device sync every step
            self.z_known = bool(self.z[0] >= 0)
            if not self.z_known:
                self.z.copy_(torch.stack([scores_s.mean(), scores_t.mean()]).detach() * len(self.memory_s))
                self.z_known = True
        loss = nce_loss(scores_s / self.z[0], self.noise) + nce_loss(scores_t / self.z[1], self.noise)
        if self.training:
            with torch.no_grad():
                index, v_s, v_t = (gather(t.detach()) for t in (index, v_s, v_t))
                for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                    memory[index] = F.normalize(memory[index] * self.momentum + v * (1 - self.momentum), dim=1)
        return loss
