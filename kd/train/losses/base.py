"""What every method shares: the two registries, what a training step tells a method, what the dry forward
pass tells it, and the shape helpers for matching maps of different sizes.

A logit method is an nn.Module with a `ce_weight` attribute (how much label cross-entropy it keeps) and
`forward(student_logits, teacher_logits, step)`. A feature method is built from a `Probe` plus its own typed
parameters, declares `layers` (how many student and teacher layers it matches: an int, or None for any equal
number), and has `forward(student_features, teacher_features, step)` taking lists in the configured order.
Both return one scalar; the stage's `weight` multiplies a feature method's term.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kd.registry import Registry

LOGIT_LOSSES = Registry("logit loss")
FEATURE_LOSSES = Registry("feature loss", context=("probe",))


@dataclass
class Step:
    """Per-step facts beyond the outputs: labels (DKD splits target from non-target classes), dataset indices
    of the batch (CRD's memory bank), and training progress in epochs, fractional (warm-ups). In training,
    `epoch` is a 0-d tensor on the device: a step captured in a CUDA graph replays it with each step's value, so
    use it in tensor ops (`clamp`, not `min`, whose comparison would read it on the host)."""
    target: torch.Tensor
    index: torch.Tensor | None = None
    epoch: float | torch.Tensor = 0.0


@dataclass
class Probe:
    """Shapes from the dry forward pass (per hooked layer, without the batch dimension) and data facts, from
    which a feature method sizes its own modules."""
    student_shapes: list[tuple]
    teacher_shapes: list[tuple]
    num_samples: int
    num_classes: int


def resize(x, size):
    """Bring a (N, C, H, W) map to `size`: average pooling when it is larger, bilinear upsampling when smaller;
    both keep the spatial layout aligned."""
    if x.shape[-2:] == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def embedding(x):
    """A feature as one vector per sample: maps are averaged over space (what a classifier's pooling does)."""
    return x.float().flatten(2).mean(2) if x.ndim == 4 else x.float().flatten(1)


def embedding_size(shape):
    return shape[0] if len(shape) == 3 else int(torch.Size(shape).numel())


def spatial(shape, method):
    if len(shape) != 3:
        dims = ", ".join(map(str, shape))
        raise ValueError(f"{method} needs 4-D feature maps (N, C, H, W), got a layer of shape (N, {dims})")
    return shape
